"""PlacidDreamer's steps before the 3DGS stage (steps 0-2 of :mod:`.method`).

* :func:`reference_image`: the reference image of the prompt (``--image`` or a teacher sample).
* :func:`prepare_init`: 8 novel views on the Latent-Plane ring from the novel-view teacher, the
  Latent-Plane density grid -> mesh -> initial Gaussians.
* :func:`personalise_teacher`: DreamBooth-LoRA of the text-to-image teacher on the views.

Each writes its results into the run folder and, with ``resume``, reuses them instead of recomputing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from studio.errors import UserError
from studio.io import atomic_write_text, write_png
from studio.io.video import make_grid
from studio.runs.text_to_3d import load_teacher_cached
from studio.students.gaussians import GaussianModel
from studio.teachers.novel_view import sample_novel_views
from studio.teachers.registry import default_guidance, load_teacher
from studio.teachers.sampling import ddim_sample
from studio.train.personalize import DreamBoothConfig, dreambooth_lora

from .enhance import enhanced_sample
from .latent_plane.gaussian_init import density_to_mesh, init_from_ring_views, mesh_to_gaussian_init
from .latent_plane.ring import FOCAL_256, PRINCIPAL_256, RING_ELEVATION, RING_N, RING_RADIUS, SHAPEWORLD_CUBE_SCALE
from .latent_plane.weights import load_latent_plane


def load_image(path: str | Path, size: int | None = None) -> Tensor:
    """An image file -> ``[1,3,H,W]`` in [0,1]; RGBA is composited on white; resized to ``size``."""
    import imageio.v3 as iio

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--image {str(path)!r} does not exist; give the path of a PNG/JPEG of the object on white")
    try:
        arr = np.asarray(iio.imread(p))
    except Exception as e:  # noqa: BLE001 - any decoder error is a user error here
        raise UserError(f"--image {str(path)!r} could not be read as an image ({e}); use a PNG or JPEG") from None
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise UserError(f"--image {str(path)!r} has shape {arr.shape}; expected an RGB or RGBA image")
    x = torch.from_numpy(arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 else 255.0))
    if x.shape[-1] == 4:
        x = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
    x = x.permute(2, 0, 1)[None]
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def reference_image(cfg, teacher, run_dir: Path, resume: bool) -> Tensor:
    """Step 0: ``cfg.image`` or a DDIM sample of ``"<prompt>, front view"`` from the text-to-image teacher at
    the teacher's default sampling guidance (written to ``reference.png``; reused on resume)."""
    path = run_dir / "reference.png"
    if cfg.image:
        ref = load_image(cfg.image)
    elif resume and path.is_file():
        ref = load_image(path)
    else:
        guidance = default_guidance(cfg.teacher, "sample")
        ref = ddim_sample(teacher, [f"{cfg.prompt}, front view"], steps=cfg.nv_steps, guidance_scale=guidance,
                          seed=cfg.seed, negative=cfg.stage.negative_prompt or None)
    write_png(path, ref[0].permute(1, 2, 0))
    return ref


#: Zero123's relative elevation of the 8 generated views (official README: ``--elev 10``); the relation to
#: the Latent-Plane ring's fixed 30 deg is undocumented upstream (spec 2.7)
ZERO123_RELATIVE_ELEVATION = 10.0


def ring_poses(nv_teacher) -> tuple[Tensor, Tensor, Tensor]:
    """Relative poses ``(d_polar, d_azimuth, d_radius)`` of the 8 Latent-Plane ring views.

    For ``shapeworld-nv-exact`` (reference camera known) they land exactly on the ring in world units:
    elevation 30, azimuth 45 k, and the ring's 49.1 deg field of view emulated at the teacher's fovy by
    moving the camera to the radius with the same framing (``r tan(fovy/2)`` kept). For Zero123 the views
    are at relative elevation ``ZERO123_RELATIVE_ELEVATION`` and the input distance, as the official code.
    """
    az = torch.arange(RING_N, dtype=torch.float32) * (360.0 / RING_N)
    if hasattr(nv_teacher, "reference_camera"):
        half = math.atan(PRINCIPAL_256 / FOCAL_256)
        radius = RING_RADIUS / SHAPEWORLD_CUBE_SCALE * math.tan(half) / math.tan(math.radians(nv_teacher.fovy / 2))
        d_polar = torch.full_like(az, nv_teacher.reference_elevation - RING_ELEVATION)
        return d_polar, az, torch.full_like(az, radius - nv_teacher.reference_radius)
    return torch.full_like(az, -ZERO123_RELATIVE_ELEVATION), az, torch.zeros_like(az)


def hooked_views(nv, cond, plane, lp_cfg, cfg):
    """Official stage 1: sample the 8 ring views with the Latent-Plane hooked into the novel-view UNet's
    ``up_blocks[block_index]`` (conditional branch only) for the first ``cfg.latent_plane_steps`` of
    ``cfg.nv_steps`` steps; the coarse plane's 64^3 density grid of the last hooked step gives the mesh.
    Returns ``(views, mesh)``."""
    if getattr(nv, "unet", None) is None:
        raise UserError(f"the Latent-Plane {cfg.latent_plane!r} reads UNet features, but the novel-view teacher "
                        f"{cfg.novel_view_teacher!r} has no UNet; use a Zero123 teacher (zero123-xl or a folder)")
    grid: dict[str, Tensor] = {}

    def switch(k: int, t: int) -> None:
        if plane.enabled and "voxel_sigma" in plane.last:
            grid["sigma"] = plane.last["voxel_sigma"]
        plane.enabled = k < cfg.latent_plane_steps

    plane.record_grid = True
    plane.attach(nv.unet, lp_cfg.block_index)
    try:
        views = sample_novel_views(nv, cond, steps=cfg.nv_steps, guidance_scale=cfg.nv_guidance, seed=cfg.seed,
                                   callback=switch)
        switch(cfg.nv_steps, 0)
    finally:
        plane.detach()
        plane.enabled = True
    if "sigma" not in grid:
        raise UserError("the Latent-Plane never ran (its hook saw no conditional batch of 8 views)")
    try:
        mesh = density_to_mesh(grid["sigma"][-1], level=lp_cfg.level)
    except ValueError as e:
        raise UserError(f"the Latent-Plane found no surface ({e}); try another --seed or --init random") from None
    return views, mesh


def ring_views_and_init(cfg, ref: Tensor, progress: bool = True):
    """The 8 ring views from the novel-view teacher, then the Latent-Plane density grid -> mesh -> Gaussians.

    The shipped Latent-Plane (``assets/latent-plane``) is our ShapeWorld-trained plane that reads the ring
    *images* (RGB + fixed random-conv features); it serves any novel-view teacher. With ``cfg.enhance_views``
    its fine plane rewrites the predicted views inside the sampling (:func:`.enhance.enhanced_sample`: the
    enhanced multi-view images that personalise the teacher); its coarse plane then reads the final views
    for the mesh. A plane
    that reads UNet features (``host == "unet"``, e.g. the official checkpoints) is instead hooked into
    the novel-view UNet while the views are sampled (:func:`hooked_views`). Returns
    ``(views [8,3,H,W], GaussianModel, info)`` with ``info["mesh"]`` the trimesh of the init.
    """

    nv = load_teacher_cached(cfg.novel_view_teacher)
    if not hasattr(nv, "encode_view"):
        raise UserError(f"--novel-view-teacher {cfg.novel_view_teacher!r} is not a novel-view teacher (no encode_view); "
                        "use shapeworld-nv-exact, zero123-xl or a Zero123 diffusers folder")
    d_polar, d_az, d_r = ring_poses(nv)
    cond = nv.encode_view(ref.expand(len(d_az), -1, -1, -1), d_polar, d_az, d_r)
    info: dict[str, Any] = {"novel_view_teacher": cfg.novel_view_teacher}
    if hasattr(nv, "posterior"):
        w = nv.posterior(ref)[0]
        info["posterior_object"] = nv.objects[int(w.argmax())].name if hasattr(nv, "objects") else int(w.argmax())
        info["posterior_weight"] = round(float(w.max()), 4)
    plane, features, lp_cfg = (load_latent_plane(cfg.latent_plane) if cfg.init == "latent_plane"
                               else (None, None, None))
    enhance = bool(getattr(cfg, "enhance_views", False)) and plane is not None and plane.fine is not None
    info["enhanced_views"] = enhance
    if plane is not None and lp_cfg.host == "unet":
        fine = plane.fine
        if not enhance:  # coarse plane only (the density for the mesh), views left as the UNet samples them
            plane.fine = None
        try:
            views, mesh = hooked_views(nv, cond, plane, lp_cfg, cfg)
        finally:
            plane.fine = fine
        model = mesh_to_gaussian_init(mesh, cfg.init_points, cfg.seed)  # unit cube, as the official init
        lp_info = {"latent_plane": "hooked into the novel-view UNet", "n_faces": int(len(mesh.faces))}
    else:
        if enhance:  # the fine plane inside the sampling (.enhance): the enhanced multi-view images
            active = max(1, round(cfg.latent_plane_steps * cfg.nv_steps / 50))
            views, calls = enhanced_sample(nv, cond, plane, features, lp_cfg, steps=cfg.nv_steps,
                                           guidance_scale=cfg.nv_guidance, seed=cfg.seed, active_steps=active,
                                           every=cfg.enhance_every, n_samples=cfg.enhance_samples)
            info["enhance_plane_calls"] = calls
        else:
            views = sample_novel_views(nv, cond, steps=cfg.nv_steps, guidance_scale=cfg.nv_guidance, seed=cfg.seed)
        if plane is None:
            return views, None, info
        try:
            model, mesh, lp_info = init_from_ring_views(views, plane, features, lp_cfg, n_points=cfg.init_points,
                                                        seed=cfg.seed)
        except ValueError as e:
            raise UserError(f"the Latent-Plane found no surface in the 8 generated views ({e}); try another "
                            "--seed, --image, or --init random") from None
    info.update(lp_info)
    info["init_points"] = model.num_gaussians
    info["mesh"] = mesh
    return views, model, info


def prepare_init(cfg, ref: Tensor, run_dir: Path, resume: bool, progress: bool = True):
    """Step 1: ``(GaussianModel | None, views [8,3,H,W], info)``; writes ``views.png``, ``views.pt``,
    ``init_mesh.ply`` and ``init.ply``."""
    views_path, init_path = run_dir / "views.safetensors", run_dir / "init.ply"
    if resume and views_path.is_file() and (init_path.is_file() or cfg.init == "random"):
        from safetensors.torch import load_file

        views = load_file(str(views_path))["views"]
        model = GaussianModel.from_ply(init_path) if cfg.init == "latent_plane" else None
        info = json.loads((run_dir / "init.json").read_text()) if (run_dir / "init.json").is_file() else {}
        return model, views, {**info, "resumed": True}
    views, model, info = ring_views_and_init(cfg, ref, progress=progress)
    from safetensors.torch import save_file

    tmp = views_path.with_name(views_path.name + ".tmp")
    save_file({"views": views.contiguous()}, str(tmp))
    tmp.replace(views_path)
    write_png(run_dir / "views.png", make_grid(views.permute(0, 2, 3, 1), ncols=len(views)))
    if info.get("mesh") is not None:
        info.pop("mesh").export(run_dir / "init_mesh.ply")
    if cfg.init == "random":
        model = None
    if model is not None:
        model.save_ply(init_path)
    atomic_write_text(run_dir / "init.json", json.dumps(info, indent=2))
    return model, views, info


def personalise_teacher(cfg, teacher, views: Tensor, run_dir: Path, resume: bool, progress: bool = True):
    """Step 2: ``(personalised teacher | None, info)``. A fresh (uncached) copy of the text-to-image
    teacher gets the DreamBooth-LoRA, so shared teachers stay untouched. Teachers without a UNet
    (``shapeworld-exact``) are used as they are (reported in ``info``)."""
    if not cfg.personalize:
        return None, {"personalised": False, "reason": "--personalize False"}
    if getattr(teacher, "unet", None) is None:
        return None, {"personalised": False, "reason": f"teacher {cfg.teacher!r} has no UNet to carry a LoRA"}
    lora_dir = run_dir / "lora"
    if resume and lora_dir.exists():
        fresh = load_teacher(cfg.teacher, lora=str(lora_dir), lora_scale=1.0)
        return fresh, {"personalised": True, "resumed": True}
    fresh = load_teacher(cfg.teacher)
    db = DreamBoothConfig(rank=cfg.dreambooth_rank, lr=cfg.dreambooth_lr, steps=cfg.dreambooth_steps, seed=cfg.seed)
    summary = dreambooth_lora(fresh, views, cfg.prompt, db, out=lora_dir)
    return fresh, {"personalised": True, **{f"dreambooth_{k}": v for k, v in summary.items()}}
