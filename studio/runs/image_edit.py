"""Personalised image editing: the ``image-edit`` kind (``studio edit SOURCE ...``, the app's Image editing tab).

An image-edit method subclasses :class:`ImageEditMethod`, extends :class:`ImageEditConfig` and implements
``edit(cfg, job) -> dict``; the kind does the rest once: reading the source (``source`` is an image file, or
``shapeworld:<concept>[@<azimuth>]`` for the embedded default: a ShapeWorld render of the concept's base object
with an exact answer), the concept (``--concept``: a saved personalisation folder, a folder of 3-8 reference
images, or a ShapeWorld concept name such as ``striped_cube``), loading a **fresh** teacher (personalisation
changes it in place), the metrics and the artefacts::

    studio edit SOURCE.png --source-prompt "a photo of a cat" --subject cat --concept my_cat_photos/ \
        --method dreamsteerer --teacher /path/to/sd15

Artefacts in ``out/<slug>/``: ``edited.png``, ``source.png``, ``mask.png`` (the subject mask at image
resolution), ``comparison.png`` (source | edited | mask [| ground truth]) and what the method adds (DreamSteerer:
``personalization/``, ``steered/``); the skeleton adds ``config.yaml`` and ``metrics.json``.

Metrics (:mod:`studio.world.edit_metrics`, :mod:`studio.teachers.clip_image`): ``ssim_outside_mask`` (paper:
SSIM to the source; here outside the subject mask), ``ssim_full``; with ``--clip-model``: ``clip_i`` (paper:
CLIP-I to the concept's reference images) and ``feature_distance_outside`` (non-paper: LPIPS-style CLIP-feature
distance to the source, with the subject region replaced by the source in both); for ShapeWorld sources the exact
non-paper metrics ``concept_fidelity_exact`` / ``concept_error`` (edit vs the concept's ground-truth render inside
the silhouette), ``concept_palette_distance`` (colour-set Chamfer distance to it, pose-free) and ``source_error`` (RMSE to the source outside the silhouette: background and pose); and the
non-paper no-reference quality score ``nr_denoise_error`` (the pretrained teacher's denoising error on the edit at
fixed timesteps and noise; lower = more like the images the teacher knows; the paper's TOPIQ / MUSIQ / LIQE need
pyiqa weights).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..cameras import HELDOUT_AZIMUTH
from ..errors import UserError
from ..io import write_png, write_png_grid
from .gaussian_edit import is_ply
from .protocol import Method

SHAPEWORLD_PREFIX = "shapeworld:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGE_BYTES = 50 * 1024 * 1024


@dataclass
class ImageEditConfig:
    source: str = "shapeworld:striped_cube@30"
    """source image (PNG / JPEG), or shapeworld:<concept>[@<azimuth>] (a ShapeWorld render with an exact answer)"""
    source_prompt: str = ""
    """prompt describing the source, e.g. "a photo of a cat"; empty: the ShapeWorld source's own prompt"""
    subject: str = ""
    """the subject's class noun in the source prompt (its cross-attention gives the mask); empty: the last word"""
    target_prompt: str = ""
    """the edit prompt ({token} is replaced by the concept token); empty: the source prompt with the subject noun
    turned into "<token> <noun>" (ShapeWorld sources: "a <token> <noun>")"""
    concept: str = "striped_cube"
    """a saved personalisation folder, a folder of 3-8 reference images, or a ShapeWorld concept name"""
    teacher: str = "shapeworld-unet"
    """text-to-image teacher (SD 1.x/2.x folder or HF id, or shapeworld-unet)"""
    clip_model: str = ""
    """CLIP model (folder or id, e.g. openai/clip-vit-base-patch32) for CLIP-I and the feature distance; empty: off"""
    num_references: int = 6
    """reference renders of a ShapeWorld concept"""
    seed: int = 0
    # -- 3D sources only (SOURCE = a model.ply; studio.runs.gaussian_edit) --
    heldout_azimuth: tuple[float, float] = HELDOUT_AZIMUTH
    """3D: azimuth sector (start, end), degrees, that no editing camera sees; concept fidelity is measured inside it
    (equal ends: off)"""
    view_azimuth: float = 0.0
    """3D: azimuth of the source view the concept is personalised / steered on (outside the held-out sector)"""
    view_elevation: float = 10.0
    orbit_radius: float = 3.0
    """3D: camera distance of the editing, evaluation and turntable cameras (ShapeWorld renders: 3.0)"""
    orbit_fovy: float = 40.0
    orbit_elevation: tuple[float, float] = (0.0, 30.0)
    """3D: elevation range (degrees) of the random editing cameras"""
    mask_views: int = 6
    """3D: views (a ring from the source view, held-out ones dropped) whose subject masks are lifted to the Gaussians"""
    eval_views: int = 4
    eval_size: int = 64
    turntable_frames: int = 36
    turntable_size: int = 128


@dataclass
class EditJob:
    """What the kind hands to ``edit``: the loaded teacher, the source image ``[1,3,H,W]`` at the teacher's
    resolution, prompts, the concept's reference images (or saved personalisation folder) and the run folder."""

    teacher: Any
    source: Tensor
    source_prompt: str
    subject: str
    target_prompt: str
    references: Tensor | None
    personalization_dir: Path | None
    run_dir: Path
    callbacks: list
    progress: bool
    resume: bool
    truth: dict | None = None  # ShapeWorld: {"target", "mask"} at image resolution


def read_image(path: str | Path) -> Tensor:
    """An image file -> ``[1,3,H,W]`` float in [0, 1] (alpha composited on white). UserError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"source image {str(p)!r} does not exist; give a PNG/JPEG file or shapeworld:<concept>")
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{str(p)!r} is not an image ({', '.join(IMAGE_SUFFIXES)})")
    if p.stat().st_size > MAX_IMAGE_BYTES:
        raise UserError(f"{str(p)!r} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im = im.convert("RGBA")
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{str(p)!r} could not be read as an image ({e})") from None
    rgb, a = arr[..., :3], arr[..., 3:]
    rgb = rgb * a + (1 - a)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


def square(images: Tensor, size: int) -> Tensor:
    """Centre crop to a square, resize (bilinear, antialiased when shrinking) to ``size``."""
    h, w = images.shape[-2:]
    s = min(h, w)
    x = images[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=s > size).clamp(0, 1)
    return x


def parse_shapeworld_source(source: str) -> tuple[str, float]:
    spec = source[len(SHAPEWORLD_PREFIX):]
    name, _, az = spec.partition("@")
    from ..world.concepts import CONCEPTS

    if name not in CONCEPTS:
        raise UserError(f"unknown ShapeWorld concept {name!r} in {source!r}; choose one of {', '.join(CONCEPTS)} "
                        "(e.g. shapeworld:striped_cube@30)")
    try:
        return name, float(az) if az else 30.0
    except ValueError:
        raise UserError(f"the azimuth in {source!r} must be a number of degrees, e.g. shapeworld:{name}@30") from None


def read_reference_folder(folder: Path, size: int) -> Tensor:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"concept folder {str(folder)!r} has no images and no personalization.json; give 3-8 "
                        "reference images of the concept or a saved personalisation")
    return torch.cat([square(read_image(f), size) for f in files[:16]])


def default_target_prompt(source_prompt: str, subject: str, token: str, template: str = "") -> str:
    """``template`` with ``{token}`` filled in when given; else the source prompt with ``token`` inserted before
    the last occurrence of the subject noun ("a photo of a cat" -> "a photo of a <v*> cat")."""
    if template:
        return template.replace("{token}", token)
    words = source_prompt.split()
    for i in range(len(words) - 1, -1, -1):
        if words[i].strip(".,") == subject:
            return " ".join(words[:i] + [token] + words[i:])
    raise UserError(f"the subject {subject!r} is not a word of the source prompt {source_prompt!r}; give --subject")


class ImageEditMethod(Method):
    """Base of image-edit methods (module doc); subclasses implement :meth:`edit`."""

    kind = "image-edit"
    kind_title = "Image editing"
    input = "source"
    verb = ("edit",)
    Config = ImageEditConfig

    @classmethod
    def examples(cls) -> list[str]:
        return ["shapeworld:striped_cube@30", "shapeworld:checker_ball@0"]

    def run_name(self, cfg) -> str:
        from .protocol import slugify

        src = str(cfg.source)
        if is_ply(src):
            return slugify(f"{Path(src).parent.name}-{Path(src).stem}-edit")
        return slugify(src[len(SHAPEWORLD_PREFIX):] if src.startswith(SHAPEWORLD_PREFIX) else Path(src).stem)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        src = str(cfg.source)
        if src.startswith(SHAPEWORLD_PREFIX):
            parse_shapeworld_source(src)
        elif is_ply(src):
            from ..world.concepts import CONCEPTS
            from .gaussian_edit import load_asset

            load_asset(src)
            if not cfg.source_prompt.strip() and str(cfg.concept).strip() not in CONCEPTS:
                raise UserError("--source-prompt is empty; describe the asset, e.g. \"a red cube\"")
            if int(cfg.mask_views) < 1 or int(cfg.eval_views) < 1:
                raise UserError("--mask-views and --eval-views must be >= 1")
        else:
            read_image(src)
            if not cfg.source_prompt.strip():
                raise UserError("--source-prompt is empty; describe the source image, e.g. \"a photo of a cat\"")
        c = str(cfg.concept).strip()
        if not c:
            raise UserError("--concept is empty; give reference images (a folder), a saved personalisation or a "
                            "ShapeWorld concept name")
        from ..world.concepts import CONCEPTS

        if c not in CONCEPTS and not Path(c).is_dir():
            raise UserError(f"concept {c!r} is neither a folder nor a ShapeWorld concept ({', '.join(CONCEPTS)})")
        if int(cfg.num_references) < 1:
            raise UserError(f"--num-references must be >= 1, got {cfg.num_references}")

    def edit(self, cfg, job: EditJob) -> dict:
        raise NotImplementedError

    def edit_3d(self, cfg, job: EditJob, model, *, sampler, mask_cameras) -> dict:
        """Edit a Gaussian asset's colours in place (``studio edit model.ply``, :mod:`studio.runs.gaussian_edit`);
        returns metrics plus ``mask`` (the source view's 2D mask) and ``gaussian_mask`` ([N] or None)."""
        raise UserError(f"method {self.name!r} edits images only; give a PNG / JPEG source")

    def run(self, cfg, run_dir: Path, *, callbacks=None, resume: bool = False, progress: bool = True) -> dict:
        from ..teachers.registry import load_teacher
        from ..world.concepts import CONCEPTS, concept_views, edit_pair

        t0 = time.perf_counter()
        teacher = load_teacher(cfg.teacher)  # fresh: personalisation changes it in place
        res = int(teacher.native_resolution)
        src, truth, target = str(cfg.source), None, cfg.target_prompt.strip()
        source_prompt, subject = cfg.source_prompt.strip(), cfg.subject.strip()
        asset = None
        if is_ply(src):
            from .gaussian_edit import load_asset, render_source_view

            asset = load_asset(src)
            image = render_source_view(asset, cfg, res)
            c = CONCEPTS.get(str(cfg.concept).strip())
            if c is not None and not source_prompt:  # a ShapeWorld concept on its base object's asset
                source_prompt, subject = c.source_prompt, subject or c.noun
                target = target or "a {token} " + c.noun
        elif src.startswith(SHAPEWORLD_PREFIX):
            name, az = parse_shapeworld_source(src)
            pair = edit_pair(name, az, size=res)
            image = pair["source"]
            truth = {"target": pair["target"], "mask": pair["mask"], "concept": name}
            c = CONCEPTS[name]
            if not source_prompt:  # the base object's own prompt; the edit drops its colour words
                source_prompt, subject = c.source_prompt, subject or c.noun
                target = target or "a {token} " + c.noun
            subject = subject or c.noun
        else:
            image = square(read_image(src), res)
        subject = subject or source_prompt.split()[-1].strip(".,")
        if subject not in [w.strip(".,") for w in source_prompt.split()]:
            raise UserError(f"the subject {subject!r} is not a word of the source prompt {source_prompt!r}; give "
                            "--subject")
        concept = str(cfg.concept).strip()
        refs, pdir = None, None
        if concept in CONCEPTS and not Path(concept).is_dir():
            refs = concept_views(concept, int(cfg.num_references), size=res)
        elif (Path(concept) / "personalization.json").is_file():
            pdir = Path(concept)
        else:
            refs = read_reference_folder(Path(concept), res)
        job = EditJob(teacher, image, source_prompt, subject, target, refs, pdir, Path(run_dir),
                      list(callbacks or []), progress, resume, truth)
        if asset is not None:
            from .gaussian_edit import finish

            return finish(self, cfg, job, asset, Path(run_dir), t0)
        out = self.edit(cfg, job)
        edited, mask, pre = out.pop("edited"), out.pop("mask"), out.pop("_pretrained", None)
        mask_img = torch.nn.functional.interpolate(mask.float(), size=edited.shape[-2:], mode="nearest")
        write_png(run_dir / "edited.png", edited[0].permute(1, 2, 0))
        write_png(run_dir / "source.png", image[0].permute(1, 2, 0))
        write_png(run_dir / "mask.png", mask_img[0, 0])
        tiles = [image, edited, mask_img.expand(-1, 3, -1, -1)] + ([truth["target"]] if truth else [])
        write_png_grid(run_dir / "comparison.png", torch.cat(tiles).permute(0, 2, 3, 1), ncols=len(tiles), pad=1)
        metrics = dict(out)
        metrics.update(edit_metrics(edited, image, mask_img, teacher=teacher, truth=truth, references=refs,
                                    clip_model=cfg.clip_model or None, seed=cfg.seed, pretrained=pre))
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        return metrics

    def summary(self, metrics: dict, run_dir: Path) -> str:
        if "alpha_iou_ring" in metrics:
            extra = (f", held-out concept fidelity {metrics['edit_3d_concept_fidelity_heldout']:.3f}"
                     if "edit_3d_concept_fidelity_heldout" in metrics else "")
            return f"edited the asset in {metrics.get('seconds', 0):.0f}s{extra}: {run_dir}/model.ply"
        extra = f", concept fidelity {metrics['concept_fidelity_exact']:.3f}" if "concept_fidelity_exact" in metrics else ""
        return f"edited in {metrics.get('seconds', 0):.0f}s{extra}: {run_dir}/edited.png"


@torch.no_grad()
def nr_denoise_error(teacher: Any, images: Tensor, timesteps=(100, 300, 500), seed: int = 0) -> float:
    """Non-paper no-reference quality: mean squared error of the teacher's unconditional epsilon prediction on
    the image noised at ``timesteps`` with seeded noise (lower = closer to what the teacher models)."""
    x = teacher.encode(images.to(torch.float32))
    g = torch.Generator().manual_seed(int(seed))
    cond = teacher.encode_prompt([""] * x.shape[0])
    errs = []
    for tv in timesteps:
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
        t = torch.full((x.shape[0],), int(tv), dtype=torch.long)
        pred = teacher.predict(teacher.schedule.add_noise(x, noise, t), t, cond, guidance_scale=1.0, output="epsilon")
        errs.append(float((pred - noise).pow(2).mean()))
    return sum(errs) / len(errs)


def edit_metrics(edited: Tensor, source: Tensor, mask: Tensor, *, teacher: Any = None, truth: dict | None = None,
                 references: Tensor | None = None, clip_model: str | None = None, seed: int = 0,
                 pretrained: Any = None) -> dict:
    """The kind's metrics (module doc) of one edit; ``mask`` at image resolution. ``pretrained``: a context
    manager factory giving the teacher's pretrained model for the no-reference score (default: as is)."""
    from ..world.edit_metrics import background_error, concept_error, masked_ssim, palette_distance

    m: dict[str, Any] = {
        "ssim_outside_mask": float(masked_ssim(edited, source, mask).mean()),
        "ssim_full": float(masked_ssim(edited, source, None).mean()),
        "mask_fraction": float(mask.float().mean()),
    }
    if truth is not None:
        gm = truth["mask"]
        ce = concept_error(edited, truth["target"], gm)
        m["concept_error"] = float(ce.mean())
        m["concept_fidelity_exact"] = float(1 - ce.mean())
        m["concept_palette_distance"] = float(palette_distance(edited, truth["target"], gm).mean())
        m["source_error"] = float(background_error(edited, source, gm).mean())
        m["ssim_outside_subject"] = float(masked_ssim(edited, source, gm).mean())
        inter = (mask * gm).sum()
        m["mask_iou"] = float(inter / (mask + gm).clamp(max=1).sum().clamp_min(1))
    if clip_model:
        from ..teachers.clip_image import ClipImageScorer

        scorer = ClipImageScorer.from_pretrained(clip_model)
        if references is not None:
            m["clip_i"] = float(scorer.clip_i(edited, references).mean())
        keep = mask.float()
        m["feature_distance_outside"] = float(scorer.feature_distance(edited * (1 - keep) + source * keep, source).mean())
    if teacher is not None:
        import contextlib

        with (pretrained() if pretrained is not None else contextlib.nullcontext()):
            m["nr_denoise_error"] = nr_denoise_error(teacher, edited, seed=seed)
    return m
