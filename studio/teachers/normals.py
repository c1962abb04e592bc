"""Monocular normal estimators behind one protocol (DreamPolish's surface-polishing prior).

Spec: ``specs/placiddreamer_dreampolish.md`` section 3.3.1: polishing renders the mesh's shaded RGB and
its camera-space normal map ``n_r``, asks a frozen normal estimator for ``n_hat`` (stop-gradient) and pulls
``n_r`` towards it. "Align the estimator's normal convention with the renderer's" is the most common bug,
so every estimator here returns **one** convention:

Camera-space normal convention (the studio's, ``studio.cameras``)
    Unit *outward* surface normals in the **OpenCV camera frame** of the image: x right, y down, z forward
    (the viewing direction). A surface seen head-on is ``(0, 0, -1)``; the right-hand rim of a ball is
    ``(+1, 0, 0)``, its top rim (up in the image) ``(0, -1, 0)``. The renderers return *world*-frame
    normals (``render_mesh(...)["normal"]``, ``render_gaussian_views(..., normals=...)``);
    ``studio.cameras.world_to_camera_normals(n, viewmats)`` takes them here, ``camera_to_world_normals``
    back.

Protocol (:class:`NormalEstimator`, a frozen ``nn.Module`` like the image teachers)
    ``estimate(images [B,3,H,W] in [0,1], *, seed=0, cameras=None) -> normals [B,3,H,W]`` (unit vectors
    everywhere, background included: mask the loss with the render's silhouette),
    ``estimate_with_mask`` (also a foreground probability ``[B,1,H,W]`` or ``None``), ``name``,
    ``native_resolution``, ``ablation_only``. Estimates run under ``no_grad`` (the stop-gradient of the
    polishing loss). ``cameras`` is ignored by image-only estimators; the oracle needs it.

Implementations
    * :class:`MarigoldNormalEstimator` -- ``prs-eth/marigold-normals-v1-1`` (or any folder of the same
      layout) through diffusers' ``MarigoldNormalsPipeline``. Marigold's frame is x right, **y up, z
      towards the viewer** (diffusers' Marigold guide: "X axis points right, Y axis points up, and Z axis
      points at the viewer"; a nose tip facing the viewer is ``[0, 0, 1]``), i.e. the OpenGL camera frame.
      :func:`marigold_to_camera_normals` maps it to ours: ``(x, y, z) -> (x, -y, -z)``.
    * :class:`ShapeWorldNormalEstimator` -- a tiny *trained* diffusers ``UNet2DModel`` regressing
      camera-space normals (+ a foreground logit) from 32x32 ShapeWorld renders, shipped in
      ``assets/shapeworld-normals`` and trained by ``scripts/train_shapeworld_normals.py``.
    * :class:`OracleNormalEstimator` -- **ablation only**: the ground-truth normals of a ShapeWorld object
      (or a mesh) rendered in the given cameras; it ignores the image content.

:func:`load_normal_estimator` takes a registered name (``marigold-normals``, ``marigold-normals-lcm``,
``shapeworld-normals``, ``oracle``), a folder (a ``MarigoldNormalsPipeline`` layout or a
``shapeworld-normals`` layout) or a Hugging Face id of a Marigold normals model.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .base import FrozenModule

CAMERA_CONVENTION = "opencv"  # x right, y down, z forward; outward normals; head-on surface = (0, 0, -1)
MARIGOLD_NORMALS_ID = "prs-eth/marigold-normals-v1-1"
MARIGOLD_NORMALS_LCM_ID = "prs-eth/marigold-normals-lcm-v0-1"
SHAPEWORLD_NORMALS = "shapeworld-normals"
#: marker file of a shapeworld-normals folder (kind, convention, resolution, channels)
ESTIMATOR_CONFIG = "normal_estimator.json"
#: axis signs taking Marigold's (OpenGL camera frame) normals to the studio's OpenCV camera frame
MARIGOLD_AXIS_SIGNS = (1.0, -1.0, -1.0)

__all__ = [
    "CAMERA_CONVENTION",
    "MARIGOLD_NORMALS_ID",
    "MARIGOLD_NORMALS_LCM_ID",
    "SHAPEWORLD_NORMALS",
    "MarigoldNormalEstimator",
    "NormalEstimator",
    "OracleNormalEstimator",
    "ShapeWorldNormalEstimator",
    "build_shapeworld_normals_unet",
    "facing_camera_normals",
    "list_normal_estimators",
    "load_normal_estimator",
    "marigold_to_camera_normals",
    "mean_angular_error_deg",
    "normalize_normals",
    "shapeworld_normals_path",
    "view_ray_normals",
]


# ------------------------------------------------------------------------------------------------ helpers
def normalize_normals(normals: Tensor, dim: int = 1, eps: float = 1e-6) -> Tensor:
    """Unit vectors along ``dim``; (near-)zero vectors become ``(0, 0, -1)`` (facing the camera)."""
    norm = normals.norm(dim=dim, keepdim=True)
    shape = [1] * normals.dim()
    shape[dim] = 3
    facing = torch.tensor([0.0, 0.0, -1.0], dtype=normals.dtype, device=normals.device).reshape(shape)
    return torch.where(norm > eps, normals / norm.clamp_min(eps), facing.expand_as(normals))


def marigold_to_camera_normals(prediction: Tensor, channel_dim: int = 1) -> Tensor:
    """Marigold normals (x right, y up, z towards the viewer: the OpenGL camera frame) -> the studio's
    OpenCV camera frame (x right, y down, z forward): ``(x, y, z) -> (x, -y, -z)``, a rotation by 180
    degrees about x (so unit length and handedness are kept). The map is its own inverse."""
    if prediction.shape[channel_dim] != 3:
        raise ValueError(f"Marigold normals need 3 channels at dim {channel_dim}, got {tuple(prediction.shape)}")
    shape = [1] * prediction.dim()
    shape[channel_dim] = 3
    signs = torch.tensor(MARIGOLD_AXIS_SIGNS, dtype=prediction.dtype, device=prediction.device).reshape(shape)
    return prediction * signs


def facing_camera_normals(batch: int, height: int, width: int, dtype=torch.float32, device=None) -> Tensor:
    """The trivial baseline "every pixel faces the camera": ``(0, 0, -1)`` everywhere, ``[B,3,H,W]``."""
    n = torch.zeros(batch, 3, height, width, dtype=dtype, device=device)
    n[:, 2] = -1
    return n


def view_ray_normals(cameras) -> Tensor:
    """The baseline "every pixel faces its own view ray": ``-normalize(K^-1 (j + 0.5, i + 0.5, 1))`` in the
    camera frame, ``[C,3,H,W]`` (differs from :func:`facing_camera_normals` off-axis at wide FoV)."""
    H, W = cameras.height, cameras.width
    K = cameras.Ks
    j = torch.arange(W, dtype=K.dtype, device=K.device) + 0.5
    i = torch.arange(H, dtype=K.dtype, device=K.device) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")
    y = (ii[None] - K[:, 1, 2, None, None]) / K[:, 1, 1, None, None]
    x = (jj[None] - K[:, 0, 2, None, None] - K[:, 0, 1, None, None] * y) / K[:, 0, 0, None, None]
    rays = torch.stack([x, y, torch.ones_like(x)], dim=1)
    return -rays / rays.norm(dim=1, keepdim=True)


def mean_angular_error_deg(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean angle in degrees between normal maps ``[B,3,H,W]`` (renormalised first) over ``mask``
    (``[B,1,H,W]`` / ``[B,H,W]``, bool or weights; all pixels when ``None``)."""
    if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
        raise ValueError(f"pred and target must both be [B,3,H,W], got {tuple(pred.shape)} and {tuple(target.shape)}")
    cos = (F.normalize(pred.float(), dim=1) * F.normalize(target.float(), dim=1)).sum(1).clamp(-1, 1)
    ang = torch.rad2deg(torch.acos(cos))
    if mask is None:
        return ang.mean()
    w = (mask[:, 0] if mask.dim() == 4 else mask).to(ang)
    return (ang * w).sum() / w.sum().clamp_min(1e-8)


def _check_images(images: Any) -> Tensor:
    if not isinstance(images, Tensor):
        raise UserError(f"images must be a torch.Tensor [B,3,H,W] in [0, 1], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise UserError(f"images must have shape [B,3,H,W] (RGB, channels first), got {tuple(images.shape)}; "
                        "for [B,H,W,3] renders use images.permute(0, 3, 1, 2)")
    if not images.is_floating_point():
        raise UserError(f"images must be floating point in [0, 1], got dtype {images.dtype}; divide uint8 by 255")
    if images.numel() and not bool(torch.isfinite(images).all()):
        raise UserError("images contain NaN or Inf values")
    if images.numel() and (float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3):
        raise UserError(f"images must be in [0, 1], got values in [{float(images.min()):.3f}, "
                        f"{float(images.max()):.3f}]; map [-1, 1] images with (x + 1) / 2")
    return images.clamp(0, 1)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-1] > size[1] or x.shape[-2] > size[0]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


# ------------------------------------------------------------------------------------------------ protocol
class NormalEstimator(FrozenModule):
    """Abstract frozen normal estimator (module doc: the camera-space convention and the protocol).

    Subclasses implement :meth:`_estimate` (``images [B,3,H,W]`` in [0, 1] -> ``(normals [B,3,H,W]``
    in the studio convention, not necessarily unit, ``mask [B,1,H,W] or None)``); the base class checks
    inputs, runs it under ``no_grad`` and renormalises.

    Attributes:
        name: how the estimator was loaded (id, path or registered name).
        native_resolution: the image side the model works at (inputs of other sizes are resized inside
            and the outputs resized back to the input size).
        convention: always ``"opencv"`` (:data:`CAMERA_CONVENTION`).
        ablation_only: ``True`` for the ground-truth oracle (never a method's default).
    """

    name: str = "normal-estimator"
    native_resolution: int = 512
    convention: str = CAMERA_CONVENTION
    ablation_only: bool = False

    def _estimate(self, images: Tensor, seed: int, cameras) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def estimate_with_mask(self, images: Tensor, *, seed: int = 0, cameras=None) -> tuple[Tensor, Tensor | None]:
        """``(normals [B,3,H,W], foreground probability [B,1,H,W] or None)``; see :meth:`estimate`."""
        images = _check_images(images)
        normals, mask = self._estimate(images.detach(), int(seed), cameras)
        B, _, H, W = images.shape
        if tuple(normals.shape) != (B, 3, H, W):
            raise RuntimeError(f"{type(self).__name__} returned normals {tuple(normals.shape)}, expected {(B, 3, H, W)}")
        normals = normalize_normals(normals.to(images.device, torch.float32), dim=1)
        if mask is not None:
            mask = mask.to(images.device, torch.float32)
        return normals, mask

    def estimate(self, images: Tensor, *, seed: int = 0, cameras=None) -> Tensor:
        """Unit camera-space normals ``[B,3,H,W]`` (OpenCV frame, outward; module doc) of ``images
        [B,3,H,W]`` in [0, 1]. ``seed`` fixes stochastic estimators (Marigold's diffusion noise);
        ``cameras`` (``studio.cameras.Cameras``, one per image) is needed by the oracle only."""
        return self.estimate_with_mask(images, seed=seed, cameras=cameras)[0]

    def forward(self, images: Tensor, *, seed: int = 0, cameras=None) -> Tensor:
        return self.estimate(images, seed=seed, cameras=cameras)

    # ------------------------------------------------------------------ frozen module
    def extra_repr(self) -> str:
        return (f"name={self.name!r}, native_resolution={self.native_resolution}, convention={self.convention!r}"
                + (", ablation_only=True" if self.ablation_only else ""))


# ------------------------------------------------------------------------------------------------ Marigold
def _pipeline_dtype_kw(dtype: torch.dtype) -> dict:
    """``DiffusionPipeline.from_pretrained``'s dtype keyword: ``dtype`` where diffusers has it (it deprecates
    ``torch_dtype``), else ``torch_dtype``."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}


class MarigoldNormalEstimator(NormalEstimator):
    """Marigold normals (``MarigoldNormalsPipeline``: VAE-encoded image latent concatenated with the
    noisy normals latent into an 8-channel ``UNet2DConditionModel``, empty-text CLIP conditioning, DDIM or
    LCM steps, VAE-decoded and renormalised), with its output mapped to the studio convention by
    :func:`marigold_to_camera_normals`. Build it with :meth:`from_pretrained`."""

    def __init__(self, pipe, *, name: str = MARIGOLD_NORMALS_ID, steps: int | None = None, ensemble_size: int = 1,
                 processing_resolution: int | None = None, batch_size: int = 1):
        super().__init__()
        if int(ensemble_size) < 1:
            raise UserError(f"ensemble_size must be >= 1, got {ensemble_size}")
        if steps is not None and int(steps) < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        # the pipeline's modules become submodules (so .to(), parameters() and freeze() see them)
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self._pipe = [pipe]  # a list: not an nn.Module attribute
        pipe.set_progress_bar_config(disable=True)
        self.name = name
        self.steps = int(steps) if steps is not None else int(pipe.default_denoising_steps or 10)
        self.ensemble_size = int(ensemble_size)
        self.batch_size = int(batch_size)
        res = processing_resolution if processing_resolution is not None else pipe.default_processing_resolution
        self.processing_resolution = int(res) if res is not None else 768
        self.native_resolution = self.processing_resolution or 768
        self.freeze()

    @property
    def pipe(self):
        """The diffusers ``MarigoldNormalsPipeline``."""
        return self._pipe[0]

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike = MARIGOLD_NORMALS_ID, *, steps: int | None = None,
                        ensemble_size: int = 1, processing_resolution: int | None = None, batch_size: int = 1,
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        local_files_only: bool | None = None, revision: str | None = None,
                        variant: str | None = None) -> MarigoldNormalEstimator:
        """Load a ``MarigoldNormalsPipeline`` folder or Hugging Face id (default
        ``prs-eth/marigold-normals-v1-1``).

        ``steps`` (default: the model's ``default_denoising_steps``), ``ensemble_size`` (predictions per
        image, merged by the pipeline's "closest" rule), ``processing_resolution`` (default: the model's,
        768 for v1-1; 0 = the input size), ``device`` (default CUDA when available), ``dtype`` (fp16 on
        CUDA, else fp32), ``variant`` (e.g. ``"fp16"``), ``local_files_only`` as for the teachers.

        Raises:
            UserError: the folder / id does not exist or cannot be downloaded, or is not a Marigold normals
                layout.
        """
        from .diffusers_sd import load_model_index_file, load_plan, load_with_attempts

        name, dev, dt, _, local, src, attempts = load_plan(path_or_id, device, dtype, False, local_files_only)
        if local:
            cls_name = load_model_index_file(Path(src) / "model_index.json").get("_class_name")
            if cls_name != "MarigoldNormalsPipeline":
                raise UserError(f"normal estimator {name!r} is a {cls_name or 'pipeline without _class_name'}, not a "
                                "MarigoldNormalsPipeline folder; give a Marigold normals model (e.g. "
                                f"{MARIGOLD_NORMALS_ID}) or a shapeworld-normals folder")

        def load(lfo: bool):
            from diffusers import MarigoldNormalsPipeline

            pipe = MarigoldNormalsPipeline.from_pretrained(src, local_files_only=lfo, revision=revision,
                                                           variant=variant, **_pipeline_dtype_kw(dt))
            if not isinstance(pipe, MarigoldNormalsPipeline):
                raise UserError(f"normal estimator {name!r} loaded as {type(pipe).__name__}, not a "
                                "MarigoldNormalsPipeline")
            return pipe

        pipe = load_with_attempts(load, attempts, local, name, src,
                                  "give a MarigoldNormalsPipeline folder (unet, vae, text_encoder, tokenizer, "
                                  "scheduler, model_index.json)")
        est = cls(pipe, name=name, steps=steps, ensemble_size=ensemble_size,
                  processing_resolution=processing_resolution, batch_size=batch_size)
        return est.to(dev)

    def marigold_prediction(self, images: Tensor, seed: int = 0) -> Tensor:
        """The pipeline's raw output ``[B,3,H,W]`` in **Marigold's** frame (x right, y up, z to the viewer)."""
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        out = self.pipe(images.to(dev, self.dtype), num_inference_steps=self.steps, ensemble_size=self.ensemble_size,
                        processing_resolution=self.processing_resolution, match_input_resolution=True,
                        batch_size=self.batch_size, generator=gen, output_type="pt")
        return out.prediction

    def _estimate(self, images: Tensor, seed: int, cameras) -> tuple[Tensor, None]:
        return marigold_to_camera_normals(self.marigold_prediction(images, seed).float()), None


# ------------------------------------------------------------------------------------------------ ShapeWorld
def build_shapeworld_normals_unet(resolution: int = 32, seed: int = 0, with_mask: bool = True):
    """The ``UNet2DModel`` of ``shapeworld-normals`` (blocks 32/48/64, no attention, ~0.9 M parameters):
    RGB ``image * 2 - 1`` in, ``3 + with_mask`` channels out (unnormalised normals, foreground logit),
    built after ``torch.manual_seed(seed)``. The timestep input is unused (always 0)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3 + int(with_mask), layers_per_block=1,
                       block_out_channels=(32, 48, 64), down_block_types=("DownBlock2D",) * 3,
                       up_block_types=("UpBlock2D",) * 3, norm_num_groups=8)


def shapeworld_normals_path() -> Path:
    """Folder of the shipped ``shapeworld-normals`` weights (``UserError`` naming the fix when missing)."""
    from ..assets import shipped_model_path

    return shipped_model_path(SHAPEWORLD_NORMALS, "train_shapeworld_normals.py", marker=ESTIMATOR_CONFIG,
                              kind="normal estimator")


class ShapeWorldNormalEstimator(NormalEstimator):
    """Tiny trained estimator of ShapeWorld camera-space normals (tier 2; see
    ``scripts/train_shapeworld_normals.py`` and ``assets/shapeworld-normals/training.json`` for its data,
    training and held-out error). Inputs are resized to ``native_resolution`` (32), the UNet predicts
    normals in the studio convention directly (its training targets were ``world_to_camera_normals`` of
    the ground truth) and a foreground logit; outputs are resized back (bilinear) and renormalised."""

    def __init__(self, unet, *, name: str = SHAPEWORLD_NORMALS):
        super().__init__()
        self.unet = unet
        self.name = name
        self.native_resolution = int(unet.config.sample_size)
        self.with_mask = int(unet.config.out_channels) == 4
        self.freeze()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None) -> ShapeWorldNormalEstimator:
        """Load a ``shapeworld-normals`` folder (default: the shipped ``assets/shapeworld-normals``)."""
        from diffusers import UNet2DModel

        from .diffusers_sd import parse_dtype

        folder = shapeworld_normals_path() if path is None else Path(path).expanduser()
        name = SHAPEWORLD_NORMALS if path is None else os.fspath(path)
        cfg_file = folder / ESTIMATOR_CONFIG
        if not cfg_file.is_file():
            raise UserError(f"normal estimator {name!r}: {cfg_file} not found; give a folder written by "
                            "scripts/train_shapeworld_normals.py")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("convention") != CAMERA_CONVENTION:
            raise UserError(f"normal estimator {name!r} predicts normals in the {cfg.get('convention')!r} convention; "
                            f"only {CAMERA_CONVENTION!r} folders are supported")
        try:
            unet = UNet2DModel.from_pretrained(str(folder), use_safetensors=True)
        except Exception as e:  # noqa: BLE001 - one clear message
            raise UserError(f"normal estimator {name!r} could not be loaded from {folder}: {type(e).__name__}: {e}; "
                            "retrain it with scripts/train_shapeworld_normals.py") from None
        est = cls(unet, name=name)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return est.to(device=dev, dtype=parse_dtype(dtype) if dtype is not None else torch.float32)

    def predict_native(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Differentiable forward at the native resolution (used by the training script):
        ``images [B,3,R,R]`` in [0, 1] -> ``(unit normals [B,3,R,R], foreground logits [B,1,R,R] or None)``."""
        t = torch.zeros(images.shape[0], device=images.device, dtype=torch.long)
        raw = self.unet(images.to(self.dtype) * 2 - 1, t).sample.float()
        return F.normalize(raw[:, :3], dim=1, eps=1e-6), (raw[:, 3:4] if self.with_mask else None)

    def _estimate(self, images: Tensor, seed: int, cameras) -> tuple[Tensor, Tensor | None]:
        H, W = images.shape[-2:]
        R = self.native_resolution
        x = _resize(images.to(self.device, torch.float32), (R, R)).clamp(0, 1)
        n, logit = self.predict_native(x)
        n = _resize(n, (H, W))
        mask = None if logit is None else torch.sigmoid(_resize(logit, (H, W)))
        return n, mask

    def write_files(self, folder: str | os.PathLike, extra: dict | None = None) -> None:
        """Write the UNet (``save_pretrained``, safetensors) and the ``normal_estimator.json`` marker into
        ``folder`` (wrap in ``write_folder_atomically`` for an atomic replace)."""
        folder = Path(folder)
        self.unet.save_pretrained(str(folder), safe_serialization=True)
        cfg = {"kind": SHAPEWORLD_NORMALS, "convention": CAMERA_CONVENTION,
               "convention_doc": "unit outward normals in the OpenCV camera frame (x right, y down, z forward); "
                                 "a surface seen head-on is (0, 0, -1)",
               "resolution": self.native_resolution, "input": "RGB in [0, 1], fed as image * 2 - 1",
               "outputs": ["normal_x", "normal_y", "normal_z"] + (["foreground_logit"] if self.with_mask else []),
               **(extra or {})}
        (folder / ESTIMATOR_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ oracle
class OracleNormalEstimator(NormalEstimator):
    """**Ablation only.** Ground-truth camera-space normals in the given cameras, ignoring the image
    content: of a ShapeWorld object (its reference Gaussian set, rendered as in
    ``studio.world.references``; the maps equal ``camera_normals(render_reference(obj, cams)["normals"])``)
    or of a triangle mesh ``(verts, faces)`` (``render_mesh`` vertex normals). Background pixels (nothing
    rendered) get ``(0, 0, -1)``; the mask is ``alpha > alpha_threshold``. ``estimate`` needs
    ``cameras=`` (one per image; resized to the image size when it differs)."""

    ablation_only = True

    def __init__(self, obj=None, *, mesh: tuple[Tensor, Tensor] | None = None, n_gaussians: int | None = None,
                 seed: int = 0, alpha_threshold: float = 0.5, backend: str = "auto"):
        super().__init__()
        if (obj is None) == (mesh is None):
            raise UserError("the oracle normal estimator needs exactly one of obj=<ShapeWorld object or name> and "
                            "mesh=(verts, faces); it is meant for ablations only")
        self.backend = backend
        self.alpha_threshold = float(alpha_threshold)
        self.gaussians = None
        self.mesh = None
        if obj is not None:
            from ..world.objects import ShapeObject, get_object
            from ..world.references import REFERENCE_N_GAUSSIANS, reference_gaussians

            if not isinstance(obj, ShapeObject):
                try:
                    obj = get_object(str(obj))
                except Exception as e:  # noqa: BLE001
                    raise UserError(f"oracle normal estimator: unknown ShapeWorld object {obj!r} ({e})") from None
            self.gaussians = reference_gaussians(obj, n_gaussians or REFERENCE_N_GAUSSIANS, seed)
            self.name = f"oracle:{obj.name} (ablation only)"
        else:
            verts, faces = mesh
            self.mesh = (verts.detach(), faces)
            self.name = "oracle:mesh (ablation only)"
        self.native_resolution = 0  # any resolution

    def _estimate(self, images: Tensor, seed: int, cameras) -> tuple[Tensor, Tensor]:
        from ..cameras import Cameras, world_to_camera_normals

        B, _, H, W = images.shape
        if not isinstance(cameras, Cameras) or len(cameras) != B:
            raise UserError(f"the oracle normal estimator needs cameras= (a studio.cameras.Cameras with {B} cameras, "
                            f"one per image), got {type(cameras).__name__ if not isinstance(cameras, Cameras) else len(cameras)}")
        if (cameras.width, cameras.height) != (W, H):
            cameras = cameras.resized(W, H)
        if self.gaussians is not None:
            from ..world.references import render_gaussian_views

            out = render_gaussian_views(self.gaussians, cameras, background=(0.0, 0.0, 0.0),
                                        normals=self.gaussians["normals"], backend=self.backend)
            n_world, alpha = out["normals"], out["alphas"]
        else:
            from ..render.mesh import render_mesh

            verts, faces = self.mesh
            cams = cameras.to(verts.device, verts.dtype)
            out = render_mesh(verts, faces, cams, normals=True, antialias=False, backend=self.backend)
            n_world, alpha = out["normal"], out["alpha"]
        n_cam = world_to_camera_normals(n_world.float().cpu(), cameras.viewmats.float().cpu())
        mask = (alpha.float().cpu() > self.alpha_threshold).float().permute(0, 3, 1, 2)
        return n_cam.permute(0, 3, 1, 2).to(images.device), mask.to(images.device)


# ------------------------------------------------------------------------------------------------ loading
def _marigold_factory(repo_id: str) -> Callable[..., NormalEstimator]:
    def factory(**kw: Any) -> NormalEstimator:
        return MarigoldNormalEstimator.from_pretrained(repo_id, **kw)
    return factory


def _oracle_factory(**kw: Any) -> NormalEstimator:
    if "obj" not in kw and "mesh" not in kw:
        raise UserError("normal estimator 'oracle' (ablation only) needs obj=<ShapeWorld object name> or "
                        "mesh=(verts, faces): it returns ground-truth normals, not estimates")
    return OracleNormalEstimator(**kw)


_ESTIMATORS: dict[str, tuple[Callable[..., NormalEstimator], str]] = {
    "marigold-normals": (_marigold_factory(MARIGOLD_NORMALS_ID),
                         f"Marigold normals v1-1 ({MARIGOLD_NORMALS_ID}), MarigoldNormalsPipeline, 768 px"),
    "marigold-normals-lcm": (_marigold_factory(MARIGOLD_NORMALS_LCM_ID),
                             f"Marigold normals LCM v0-1 ({MARIGOLD_NORMALS_LCM_ID}), 1-4 steps"),
    SHAPEWORLD_NORMALS: (lambda **kw: ShapeWorldNormalEstimator.from_pretrained(None, **kw),
                         "ShapeWorld tiny trained normal estimator, 32 px (shipped in assets/)"),
    "oracle": (_oracle_factory, "ground-truth ShapeWorld / mesh normals in the given cameras (ablation only)"),
}


def list_normal_estimators() -> dict[str, str]:
    """Registered normal-estimator names -> descriptions."""
    return {k: v[1] for k, v in sorted(_ESTIMATORS.items())}


def load_normal_estimator(name_or_path: str | os.PathLike, **kw: Any) -> NormalEstimator:
    """A normal estimator by registered name (:func:`list_normal_estimators`), local folder (a
    ``MarigoldNormalsPipeline`` layout with ``model_index.json``, or a ``shapeworld-normals`` layout with
    ``normal_estimator.json``) or Hugging Face id of a Marigold normals model. Keyword arguments go to the
    factory (Marigold: steps, ensemble_size, processing_resolution, device, dtype, ...; oracle: obj or
    mesh).

    Raises:
        UserError: unknown name, a folder of neither layout, or a model that cannot be loaded.
    """
    name = os.fspath(name_or_path).strip()
    if not name:
        raise UserError("no normal estimator given: pass one of "
                        f"{', '.join(_ESTIMATORS)}, a local folder or a Hugging Face id")
    path = Path(name).expanduser()
    key = name.lower()
    if key in _ESTIMATORS and not path.is_dir():
        return _ESTIMATORS[key][0](**kw)
    if path.is_dir():
        if (path / ESTIMATOR_CONFIG).is_file():
            return ShapeWorldNormalEstimator.from_pretrained(path, **kw)
        if (path / "model_index.json").is_file():
            return MarigoldNormalEstimator.from_pretrained(name, **kw)
        raise UserError(f"normal estimator folder {name!r} has neither model_index.json (a MarigoldNormalsPipeline) "
                        f"nor {ESTIMATOR_CONFIG} (a shapeworld-normals model)")
    if "/" in name and not name.startswith((".", "~", "/")) and name.count("/") == 1:
        return MarigoldNormalEstimator.from_pretrained(name, **kw)
    raise UserError(f"unknown normal estimator {name!r}: registered ones are {', '.join(sorted(_ESTIMATORS))}; or "
                    "give a local folder or a Hugging Face id such as " + MARIGOLD_NORMALS_ID)
