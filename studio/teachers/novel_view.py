"""Novel-view teachers (Zero-1-to-3 family): ``p(target view | reference image, relative camera)``.

Two implementations of one interface, so PlacidDreamer's stage 1 (and any image-to-3D method) can use
either: ``cond = teacher.encode_view(image, d_polar_deg, d_azimuth_deg, d_radius)`` builds a
:class:`~studio.teachers.base.TextCond`, then the usual :meth:`~ImageTeacher.predict` /
:meth:`~ImageTeacher.predict_branches` (CFG included) and :func:`sample_novel_views` run on it.

Relative camera convention (Zero123's, as in its diffusers port used by threestudio):

* ``d_polar_deg``: change of the *polar* angle (from +up), i.e. ``target_polar - reference_polar``
  = ``reference_elevation - target_elevation``: positive moves the camera *down*.
* ``d_azimuth_deg``: ``target_azimuth - reference_azimuth`` (around the up axis).
* ``d_radius``: ``target_distance - reference_distance`` (scene units of the model; 0 for the same distance).

The network sees the 4-vector ``[d_polar (radians), sin(d_azimuth), cos(d_azimuth), d_radius]``
(:func:`zero123_pose`).

:class:`Zero123Teacher` (tier 1) loads the diffusers layout of ``bennyguo/zero123-xl-diffusers``
(``model_index.json`` with ``unet`` (8 input channels: the noisy latent and the reference latent),
``vae``, ``image_encoder`` (``CLIPVisionModelWithProjection``), ``feature_extractor``
(``CLIPImageProcessor``), ``scheduler`` (DDIM) and ``clip_camera_projection`` (a ``Linear(768 + 4 ->
768)`` saved as a diffusers model with config ``{embedding_dim, additional_embeddings}`` and weights
``proj.weight`` / ``proj.bias``). What is reconstructed from the public port (threestudio's
``extern/zero123.py`` and its Zero123 guidance), not from the original training code:

* cross-attention context = ``clip_camera_projection([CLIP image embedding, pose])``, one token ``[B,1,D]``;
* the reference latent concatenated to the UNet input is the VAE posterior *mode* **without** the
  scaling factor (Zero123 was trained that way); the noisy latent itself uses the scaling factor (0.18215);
* CFG unconditional branch = **zero** context and **zero** reference latent (not an empty image);
* the CLIP image preprocessing (resize shortest side, centre crop, CLIP mean/std) is done in torch on
  the float image; the reference pipeline goes through PIL (uint8), so embeddings differ by quantisation.

The community layout (``cc_projection``: ``CCProjection`` with config ``{in_channel, out_channel}`` and
weights ``projection.*``, e.g. ``kxhit/zero123-xl``) loads too. Stable Zero123 (whose 4th pose entry is
the reference polar angle, not a distance) is *not* handled differently: pass that value as ``d_radius``.

:class:`ShapeWorldNovelViewTeacher` (``shapeworld-nv-exact``, tier 2) is the exact image-conditioned
teacher of ShapeWorld; see its docstring.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor

from ..cameras import Cameras, orbit_cameras
from ..errors import UserError
from .base import ImageTeacher, TextCond
from .diffusers_sd import (DiffusersTeacher, load_plan, load_with_attempts, looks_local, read_model_index,
                           set_space_facts, transformers_dtype_kw)
from .schedule import NoiseSchedule
from .shapeworld_exact import ShapeWorldPixelTeacher, mixture_epsilon

#: hub id of the Zero123-XL diffusers port PlacidDreamer uses
ZERO123_XL = "bennyguo/zero123-xl-diffusers"
#: model_index.json keys of the (image embedding, pose) -> context projection, in lookup order
PROJECTION_KEYS = ("clip_camera_projection", "cc_projection")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------- projections
class CLIPCameraProjection(ModelMixin, ConfigMixin):
    """``Linear(embedding_dim + additional_embeddings -> embedding_dim)`` on ``[CLIP image embedding, pose]``.

    Saved files match ``bennyguo/zero123-xl-diffusers/clip_camera_projection`` (config
    ``{"embedding_dim": 768, "additional_embeddings": 4}``, weights ``proj.weight`` / ``proj.bias``).
    """

    @register_to_config
    def __init__(self, embedding_dim: int = 768, additional_embeddings: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(embedding_dim + additional_embeddings, embedding_dim)

    @property
    def out_dim(self) -> int:
        return int(self.config.embedding_dim)

    def forward(self, embedding: Tensor) -> Tensor:
        return self.proj(embedding)


class CCProjection(ModelMixin, ConfigMixin):
    """The same projection in the community Zero1to3 layout (``cc_projection``: config ``{in_channel,
    out_channel}``, weights ``projection.weight`` / ``projection.bias``)."""

    @register_to_config
    def __init__(self, in_channel: int = 772, out_channel: int = 768):
        super().__init__()
        self.projection = torch.nn.Linear(in_channel, out_channel)

    @property
    def out_dim(self) -> int:
        return int(self.config.out_channel)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(x)


# --------------------------------------------------------------------------------------- shared helpers
def zero123_pose(d_polar_deg, d_azimuth_deg, d_radius) -> Tensor:
    """Zero123's relative pose ``[N, 4] = [d_polar (rad), sin(d_azimuth), cos(d_azimuth), d_radius]``
    (arguments broadcast; degrees in, float32 out)."""
    p, a, r = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float32).reshape(-1)
                                        for v in (d_polar_deg, d_azimuth_deg, d_radius)))
    a = torch.deg2rad(a)
    return torch.stack([torch.deg2rad(p), torch.sin(a), torch.cos(a), r], dim=-1)


def reference_images(image: Any, what: str = "reference image") -> Tensor:
    """Check and normalise a reference image to ``[B,3,H,W]`` float in [0, 1] on a white background.

    Accepts ``[3,H,W]`` / ``[B,3,H,W]`` (RGB) and ``[4,H,W]`` / ``[B,4,H,W]`` (RGBA, composited on white).
    """
    if not isinstance(image, Tensor):
        raise UserError(f"{what} must be a torch tensor [B,3,H,W] in [0,1] (white background), got "
                        f"{type(image).__name__}; load files with studio.io and convert to a tensor first")
    x = image[None] if image.dim() == 3 else image
    if x.dim() != 4 or x.shape[1] not in (3, 4) or x.shape[-1] < 2 or x.shape[-2] < 2:
        raise UserError(f"{what} must have shape [B,3,H,W] (or [3,H,W], RGBA with 4 channels) in [0,1], got "
                        f"{tuple(image.shape)}")
    if not x.is_floating_point():
        x = x.float() / 255.0
    if not torch.isfinite(x).all():
        raise UserError(f"{what} has non-finite values")
    if x.shape[1] == 4:
        x = x[:, :3] * x[:, 3:] + (1 - x[:, 3:])
    return x


def broadcast_views(n_images: int, d_polar_deg, d_azimuth_deg, d_radius) -> tuple[int, Tensor, Tensor]:
    """``(B, image_index [B], poses [B,3] (d_polar_deg, d_azimuth_deg, d_radius))``: one image for many
    views, many images for one view, or one view per image."""
    try:
        p, a, r = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float32).reshape(-1)
                                            for v in (d_polar_deg, d_azimuth_deg, d_radius)))
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError("d_polar_deg, d_azimuth_deg and d_radius must be numbers or equal-length lists "
                        f"({e})") from None
    n_views = p.shape[0]
    if not torch.isfinite(torch.stack([p, a, r])).all():
        raise UserError("d_polar_deg, d_azimuth_deg and d_radius must be finite")
    if n_images != n_views and 1 not in (n_images, n_views):
        raise UserError(f"got {n_images} reference images but {n_views} relative views; give one image, one "
                        "view, or as many views as images")
    B = max(n_images, n_views)
    idx = torch.arange(B) if n_images == B else torch.zeros(B, dtype=torch.long)
    poses = torch.stack([p, a, r], -1).expand(B, 3) if n_views == 1 else torch.stack([p, a, r], -1)
    return B, idx, poses


def _view_texts(poses: Tensor) -> list[str]:
    return [f"novel view (d_polar={float(p):g}, d_azimuth={float(a):g}, d_radius={float(r):g})"
            for p, a, r in poses.tolist()]


def _read_json(src: str, filename: str, local_files_only: bool, revision: str | None) -> dict | None:
    p = Path(src)
    if p.is_dir():
        f = p / filename
        return json.loads(f.read_text()) if f.is_file() else None
    from huggingface_hub import hf_hub_download
    try:
        f = hf_hub_download(src, filename, revision=revision, local_files_only=local_files_only)
    except Exception:  # noqa: BLE001 - optional file
        return None
    return json.loads(Path(f).read_text())


def _side(value: Any, default: int, keys: Sequence[str]) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, dict):
        for k in keys:
            if value.get(k):
                return int(value[k])
    return default


# --------------------------------------------------------------------------------------- Zero123
class Zero123Teacher(ImageTeacher):
    """Frozen Zero-1-to-3 (Zero123 / Zero123-XL) novel-view teacher from diffusers weights.

    Build with :meth:`from_pretrained`; condition with :meth:`encode_view` (text prompts are not
    supported). ``x_t`` are the target view's scaled VAE latents ``[B,4,h,w]``; :meth:`_forward`
    concatenates ``cond.extra["image_latents"]`` (the unscaled reference latent) on channels.
    The prediction type comes from the scheduler config (epsilon for Zero123-XL); ``native_resolution``
    is ``unet.sample_size * vae_factor`` (256 for Zero123-XL).

    Pixel space (``vae=None``; a folder whose ``model_index.json`` has no ``vae``, e.g. the tiny trained
    ``shapeworld-nv-unet``): as :class:`DiffusersTeacher`'s pixel mode, ``x_t`` is ``image * 2 - 1`` at
    ``native_resolution = unet.sample_size`` (``is_latent=False``, ``vae_scale_factor=1``), the reference
    "latent" is the reference image ``* 2 - 1`` at that size, and the UNet takes 6 input channels.
    """

    def __init__(self, unet, vae, image_encoder, camera_projection, schedule: NoiseSchedule, *,
                 clip_size: int = 224, clip_crop: int = 224, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 name: str = "zero123", attention_slicing: bool | str | int = False) -> None:
        super().__init__()
        self.unet, self.vae, self.image_encoder, self.camera_projection = unet, vae, image_encoder, camera_projection
        self.schedule = schedule
        self.name = name
        set_space_facts(self, unet, vae)  # no vae: pixel space (the tiny ShapeWorld model), reference likewise
        self.clip_size, self.clip_crop = int(clip_size), int(clip_crop)
        self.register_buffer("clip_mean", torch.tensor(image_mean, dtype=torch.float32).reshape(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("clip_std", torch.tensor(image_std, dtype=torch.float32).reshape(1, 3, 1, 1),
                             persistent=False)
        if int(unet.config.in_channels) != 2 * self.latent_channels:
            what = "image" if vae is None else "latent"
            raise UserError(f"teacher {name!r}: a Zero123 UNet takes {2 * self.latent_channels} input channels (noisy "
                            f"{what} + reference {what}), this one takes {unet.config.in_channels}"
                            + (" (a folder without vae/ is a pixel-space model)" if vae is None else ""))
        emb_dim = int(image_encoder.config.projection_dim)
        pcfg = camera_projection.config
        proj_in = pcfg.get("in_channel") or (pcfg.get("embedding_dim", 0) + pcfg.get("additional_embeddings", 0))
        if int(proj_in) != emb_dim + 4:
            raise UserError(f"teacher {name!r}: its camera projection takes {proj_in} inputs but the CLIP image "
                            f"embedding (+4 pose values) gives {emb_dim + 4}")
        if camera_projection.out_dim != int(unet.config.cross_attention_dim):
            raise UserError(f"teacher {name!r}: camera projection gives {camera_projection.out_dim} channels, the UNet "
                            f"cross-attention takes {unet.config.cross_attention_dim}")
        if attention_slicing:
            self.set_attention_slicing(attention_slicing)
        self.freeze()

    # the VAE side is exactly an SD teacher's (scaled latents, [0,1] images): share that code
    encode = DiffusersTeacher.encode
    decode = DiffusersTeacher.decode
    _check_images = DiffusersTeacher._check_images
    set_attention_slicing = DiffusersTeacher.set_attention_slicing

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike = ZERO123_XL, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, attention_slicing: bool | str | int | None = None,
                        local_files_only: bool | None = None, revision: str | None = None,
                        variant: str | None = None) -> "Zero123Teacher":
        """Load a Zero123 diffusers layout from a local folder or a Hugging Face id (default Zero123-XL).

        ``device`` (default CUDA when available), ``dtype`` (default fp16 on CUDA, else fp32),
        ``attention_slicing`` (default on for CUDA), ``local_files_only`` and ``variant`` (e.g. "fp16",
        which Zero123-XL ships) as in :meth:`DiffusersTeacher.from_pretrained`.

        Raises:
            UserError: the folder / id does not exist, cannot be downloaded, or is not a Zero123 layout.
        """
        name, dev, dt, attention_slicing, local, src, attempts = load_plan(
            id_or_path, device, dtype, attention_slicing, local_files_only)
        comps, kw = load_with_attempts(
            lambda lfo: _load_zero123_components(src, dt, lfo, revision, variant), attempts, local, name, src,
            "give a Zero123 diffusers folder (unet, vae, image_encoder, feature_extractor, scheduler, "
            "clip_camera_projection)")
        teacher = cls(*comps, name=name, attention_slicing=False, **kw)
        teacher.to(dev)
        if attention_slicing:
            teacher.set_attention_slicing(attention_slicing)
        return teacher

    # ------------------------------------------------------------------ conditioning
    def _embed_texts(self, texts: list[str]) -> Tensor:
        raise UserError(f"teacher {self.name!r} is an image-conditioned novel-view model (Zero123): text prompts are "
                        "not supported; build the condition with teacher.encode_view(image, d_polar_deg, "
                        "d_azimuth_deg, d_radius)")

    def clip_pixels(self, images: Tensor) -> Tensor:
        """CLIP preprocessing in torch: resize the shortest side to ``clip_size`` (bicubic, antialiased),
        centre-crop ``clip_crop``, normalise with the processor's mean / std."""
        h, w = images.shape[-2:]
        s = self.clip_size / min(h, w)
        nh, nw = max(self.clip_crop, round(h * s)), max(self.clip_crop, round(w * s))
        x = torch.nn.functional.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False,
                                            antialias=True).clamp(0, 1)
        top, left = (nh - self.clip_crop) // 2, (nw - self.clip_crop) // 2
        x = x[..., top: top + self.clip_crop, left: left + self.clip_crop]
        return (x - self.clip_mean.to(x)) / self.clip_std.to(x)

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """CLIP image embeddings ``[B, D]`` of images ``[B,3,H,W]`` in [0, 1]."""
        px = self.clip_pixels(images.to(self.device, torch.float32)).to(self.image_encoder.dtype)
        return self.image_encoder(pixel_values=px).image_embeds

    @torch.no_grad()
    def reference_latents(self, images: Tensor) -> Tensor:
        """The concatenated reference latent: VAE posterior mode of the image at the native resolution,
        **unscaled** (Zero123 convention); pixel-space teachers: ``image * 2 - 1`` at the native resolution."""
        x = images.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != (self.native_resolution,) * 2:
            shrink = x.shape[-1] > self.native_resolution
            x = torch.nn.functional.interpolate(x, size=(self.native_resolution,) * 2, mode="bilinear",
                                                align_corners=False, antialias=shrink)
        if self.vae is None:
            return x * 2 - 1
        return self.vae.encode((x * 2 - 1).to(self.vae.dtype)).latent_dist.mode()

    @torch.no_grad()
    def encode_view(self, image: Tensor, d_polar_deg: float | Sequence[float] | Tensor = 0.0,
                    d_azimuth_deg: float | Sequence[float] | Tensor = 0.0,
                    d_radius: float | Sequence[float] | Tensor = 0.0) -> TextCond:
        """Condition on a reference image and a relative camera (module doc for the convention).

        ``image``: ``[B,3,H,W]`` (or ``[3,H,W]``, or RGBA) in [0, 1] on a white background, any size (it is
        resized). One image with ``N`` views, ``N`` images with one view, or ``N`` of each.
        Returns a :class:`TextCond` with ``embeds [B,1,D]`` (projected CLIP + pose context),
        ``extra["image_latents"] [B,4,h,w]`` (``[B,3,H,W]`` in pixel space); the negative side is zeros for
        both (Zero123's CFG).
        """
        imgs = reference_images(image)
        B, idx, poses = broadcast_views(imgs.shape[0], d_polar_deg, d_azimuth_deg, d_radius)
        emb = self.image_embeddings(imgs)[idx]  # [B, D]
        lat = self.reference_latents(imgs)[idx]
        pose = zero123_pose(poses[:, 0], poses[:, 1], poses[:, 2]).to(emb.device, emb.dtype)
        proj_dt = self.camera_projection.dtype
        ctx = self.camera_projection(torch.cat([emb, pose], dim=-1)[:, None].to(proj_dt))  # [B,1,D]
        ctx = ctx.to(self.dtype)
        lat = lat.to(self.dtype)
        return TextCond(ctx, torch.zeros_like(ctx), _view_texts(poses), [""] * B,
                        {"image_latents": lat}, {"image_latents": torch.zeros_like(lat)})

    # ------------------------------------------------------------------ network
    def _forward(self, x_t: Tensor, t: Tensor, embeds: Tensor, camera: Tensor | None = None,
                 extra: dict[str, Tensor] | None = None) -> Tensor:
        lat = (extra or {}).get("image_latents")
        if lat is None:
            raise ValueError(f"teacher {self.name!r} needs cond.extra['image_latents']: build the condition with "
                             "teacher.encode_view(image, d_polar_deg, d_azimuth_deg, d_radius)")
        if lat.shape[0] != x_t.shape[0] or lat.shape[-2:] != x_t.shape[-2:]:
            raise ValueError(f"reference latents {tuple(lat.shape)} do not match x_t {tuple(x_t.shape)}; the target "
                             f"view must have the reference's size ({self.native_resolution} px for this teacher)")
        dt = self.unet.dtype
        x = torch.cat([x_t.to(dt), lat.to(x_t.device, dt)], dim=1)
        out = self.unet(x, t.to(x_t.device), encoder_hidden_states=embeds.to(x_t.device, dt), return_dict=False)[0]
        return out.to(x_t.dtype)


def _load_zero123_components(src: str, dtype: torch.dtype, local_files_only: bool, revision: str | None,
                             variant: str | None):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    index = read_model_index(src, local_files_only, revision)
    key = next((k for k in PROJECTION_KEYS if index is not None and k in index), None)
    if index is None or key is None or "image_encoder" not in index:
        what = index.get("_class_name", "pipeline") if index else "folder"
        raise UserError(f"teacher {src!r} is a {what}, not a Zero123 layout (needs unet, vae, image_encoder, "
                        "scheduler and clip_camera_projection in model_index.json, as bennyguo/zero123-xl-diffusers)")
    common = dict(local_files_only=local_files_only, revision=revision)
    # pixel-space models have no VAE (a model_index.json without "vae" or with "vae": [null, null])
    pixel = not any((index.get("vae") or [None])[:1])
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, variant=variant, **common)
    if pixel and int(unet.config.in_channels) != 6:
        raise UserError(f"teacher {src!r} has no vae but its UNet takes {unet.config.in_channels} channels; a "
                        "pixel-space Zero123 UNet takes 6 (noisy image + reference image), a latent one needs vae/")
    vae = None if pixel else AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, variant=variant,
                                                           **common)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(src, subfolder="image_encoder", variant=variant,
                                                                  **transformers_dtype_kw(dtype), **common)
    proj_cls = CLIPCameraProjection if key == "clip_camera_projection" else CCProjection
    projection = proj_cls.from_pretrained(src, subfolder=key, torch_dtype=dtype, variant=variant, **common)
    sched_config = DDIMScheduler.load_config(src, subfolder="scheduler", **common)
    schedule = NoiseSchedule.from_diffusers(sched_config)
    fe = _read_json(src, "feature_extractor/preprocessor_config.json", local_files_only, revision) or {}
    crop = _side(fe.get("crop_size"), 224, ("height", "shortest_edge"))
    size = _side(fe.get("size"), crop, ("shortest_edge", "height"))
    kw = dict(clip_size=size, clip_crop=crop, image_mean=tuple(fe.get("image_mean") or CLIP_MEAN),
              image_std=tuple(fe.get("image_std") or CLIP_STD))
    return (unet.eval(), None if vae is None else vae.eval(), image_encoder.eval(), projection.eval(), schedule), kw


def is_zero123_layout(name_or_path: str) -> bool:
    """Whether ``load_teacher`` should load ``name_or_path`` as a :class:`Zero123Teacher`: a folder (or a
    cached hub id) whose ``model_index.json`` has a camera projection, or an ``image_encoder`` and an
    8-channel UNet (6 channels without a vae: pixel space); an uncached hub id whose name contains "zero123"
    (not Zero123++)."""
    p = Path(os.path.expanduser(name_or_path))
    index = None
    if p.is_dir():
        from .diffusers_sd import load_model_index_file

        f = p / "model_index.json"
        index = load_model_index_file(f) if f.is_file() else None
        if index is None:
            return False
    elif not looks_local(name_or_path):
        try:
            index = read_model_index(name_or_path, True, None)
        except Exception:  # noqa: BLE001 - not cached
            index = None
        if index is None:
            low = name_or_path.lower()
            return "zero123" in low and "plus" not in low and "++" not in low
    else:
        return False
    if any(k in index for k in PROJECTION_KEYS):
        return True
    if "image_encoder" in index and "text_encoder" not in index and p.is_dir():
        cfg = p / "unet" / "config.json"
        pixel = not any((index.get("vae") or [None])[:1])
        n_in = int(json.loads(cfg.read_text()).get("in_channels", 0)) if cfg.is_file() else 0
        return n_in == 8 or (pixel and n_in == 6)  # latent (4 + 4) or pixel space (3 + 3)
    return False


def make_zero123_xl(**kw: Any) -> Zero123Teacher:
    """``Zero123Teacher.from_pretrained("bennyguo/zero123-xl-diffusers", **kw)``."""
    teacher = Zero123Teacher.from_pretrained(ZERO123_XL, **kw)
    return teacher


#: registered name of the tiny trained novel-view model shipped in ``assets/`` (pixel space, 32x32)
SHAPEWORLD_NV_UNET = "shapeworld-nv-unet"


def shapeworld_nv_unet_path() -> Path:
    """Folder of the shipped ``shapeworld-nv-unet`` weights (``UserError`` naming the fix when missing)."""
    from ..assets import shipped_model_path

    return shipped_model_path(SHAPEWORLD_NV_UNET, "train_shapeworld_nv_unet.py")


def make_shapeworld_nv_unet(**kw: Any) -> Zero123Teacher:
    """``shapeworld-nv-unet``: ``Zero123Teacher.from_pretrained(<assets>/shapeworld-nv-unet, **kw)``.

    A tiny *trained* Zero-1-to-3 model of ShapeWorld (tier 2 counterpart of ``shapeworld-nv-exact``), pixel
    space 32x32, trained by ``scripts/train_shapeworld_nv_unet.py`` with the same reference camera convention
    (the reference image seen from elevation 15, azimuth 0, radius 3.2, fovy 40; white background). That
    camera is attached as ``reference_elevation``, ``reference_azimuth``, ``reference_radius``, ``fovy`` and
    ``reference_camera`` (as on ``shapeworld-nv-exact``), so callers can place target views in world units.
    """
    teacher = Zero123Teacher.from_pretrained(shapeworld_nv_unet_path(), **kw)
    teacher.name = SHAPEWORLD_NV_UNET
    teacher.reference_elevation, teacher.reference_azimuth, teacher.reference_radius, teacher.fovy = 15.0, 0.0, 3.2, 40.0
    r = teacher.native_resolution
    teacher.reference_camera = orbit_cameras(15.0, 0.0, 3.2, 40.0, r, r)
    return teacher


# --------------------------------------------------------------------------------------- ShapeWorld
class ShapeWorldNovelViewTeacher(ShapeWorldPixelTeacher):
    """``shapeworld-nv-exact``: the exact image-conditioned novel-view teacher of ShapeWorld.

    Assumed (a design choice, documented here): the reference image is a ShapeWorld object seen from the
    **reference camera** ``elevation 15 deg, azimuth 0 (front, +z), radius 3.2, fovy 40`` (the ring of
    ``shapeworld-exact``), white background, compared at 64x64 in ``x = 2 * image - 1``.

    * Posterior over objects given the reference ``x``:
      ``w_o = softmax_o(-|x - render_o(ref_cam)|^2 / (2 posterior_sigma^2))`` (``posterior_sigma`` defaults
      to ``smoothing``, so an exact render gives weight ~1 on its object).
    * Target camera: the reference camera moved by the relative pose (``elevation = 15 - d_polar``,
      ``azimuth = d_azimuth``, ``radius = 3.2 + d_radius``, same fovy).
    * Clean distribution at the target: ``sum_o w_o N(x0; render_o(target), smoothing^2 I)``;
      :meth:`_forward` returns its exact posterior-mean epsilon (the math of ``shapeworld-exact``,
      :func:`~studio.teachers.shapeworld_exact.mixture_epsilon`).
    * CFG: the unconditional branch has **uniform** weights over all objects at the same target camera
      (it knows the view but not the image).

    ``encode_view`` has :class:`Zero123Teacher`'s signature; ``embeds`` are ``[B, n_objects + 20]``:
    the weights followed by the target camera vector (:meth:`Cameras.to_vector`). The ``camera`` argument
    of ``predict`` is ignored (the target camera comes from the condition). Renders of all objects at a
    target camera are cached (LRU, ``cache_size`` cameras).
    """

    def __init__(self, *, resolution: int = 64, smoothing: float = 0.05, posterior_sigma: float | None = None,
                 reference_elevation: float = 15.0, reference_azimuth: float = 0.0, reference_radius: float = 3.2,
                 fovy: float = 40.0, n_gaussians: int = 6000, backend: str = "auto", seed: int = 0,
                 cache_size: int = 256):
        super().__init__(resolution=resolution, smoothing=smoothing, n_gaussians=n_gaussians, backend=backend,
                         seed=seed)
        self.name = "shapeworld-nv-exact"
        self.posterior_sigma = float(posterior_sigma if posterior_sigma is not None else smoothing)
        self.reference_elevation = float(reference_elevation)
        self.reference_azimuth = float(reference_azimuth)
        self.reference_radius = float(reference_radius)
        self.fovy = float(fovy)
        self.cache_size = int(cache_size)
        self._render_cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self._reference_renders: Tensor | None = None

    @property
    def reference_camera(self) -> Cameras:
        r = self.native_resolution
        return orbit_cameras(self.reference_elevation, self.reference_azimuth, self.reference_radius, self.fovy, r, r)

    def target_cameras(self, d_polar_deg, d_azimuth_deg, d_radius) -> Cameras:
        """The reference camera moved by relative poses (broadcast) -> :class:`Cameras`."""
        p, a, rad = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float32).reshape(-1)
                                              for v in (d_polar_deg, d_azimuth_deg, d_radius)))
        r = self.native_resolution
        return orbit_cameras(self.reference_elevation - p, self.reference_azimuth + a, self.reference_radius + rad,
                             self.fovy, r, r)

    @property
    def reference_renders(self) -> Tensor:
        """All objects at the reference camera ``[n_obj,3,H,W]`` (model space)."""
        if self._reference_renders is None:
            self._reference_renders = torch.cat([self._render(g, self.reference_camera) for g in self.gaussians])
        return self._reference_renders

    def renders_at(self, cam_vectors: Tensor) -> Tensor:
        """All objects rendered at each camera ``[B,20] -> [B,n_obj,3,H,W]`` (model space, cached)."""
        out = []
        for vec in cam_vectors.detach().float().cpu():
            key = tuple(round(v, 5) for v in vec.tolist())
            hit = self._render_cache.get(key)
            if hit is None:
                cams = Cameras.from_vector(vec[None], self.native_resolution, self.native_resolution)
                hit = torch.cat([self._render(g, cams) for g in self.gaussians])
                self._render_cache[key] = hit
                while len(self._render_cache) > self.cache_size:
                    self._render_cache.popitem(last=False)
            else:
                self._render_cache.move_to_end(key)
            out.append(hit)
        return torch.stack(out)

    @torch.no_grad()
    def posterior(self, image: Tensor) -> Tensor:
        """Weights ``[B, n_obj]`` of the objects given reference images ``[B,3,H,W]`` in [0, 1]."""
        x = self.encode(reference_images(image).float().cpu())
        d = (x[:, None] - self.reference_renders[None]).flatten(2).pow(2).sum(-1)
        return torch.softmax(-d / (2 * self.posterior_sigma**2), dim=1)

    def _embed_texts(self, texts: list[str]) -> Tensor:
        raise UserError(f"teacher {self.name!r} is an image-conditioned novel-view teacher: text prompts are not "
                        "supported; build the condition with teacher.encode_view(image, d_polar_deg, d_azimuth_deg, "
                        "d_radius) (use 'shapeworld-exact' for text prompts)")

    @torch.no_grad()
    def encode_view(self, image: Tensor, d_polar_deg: float | Sequence[float] | Tensor = 0.0,
                    d_azimuth_deg: float | Sequence[float] | Tensor = 0.0,
                    d_radius: float | Sequence[float] | Tensor = 0.0) -> TextCond:
        """Same signature and broadcasting as :meth:`Zero123Teacher.encode_view`; see the class doc."""
        imgs = reference_images(image)
        B, idx, poses = broadcast_views(imgs.shape[0], d_polar_deg, d_azimuth_deg, d_radius)
        w = self.posterior(imgs)[idx]
        cams = self.target_cameras(poses[:, 0], poses[:, 1], poses[:, 2]).to_vector()
        uniform = torch.full_like(w, 1.0 / w.shape[1])
        return TextCond(torch.cat([w, cams], -1), torch.cat([uniform, cams], -1), _view_texts(poses), [""] * B)

    @torch.no_grad()
    def _forward(self, x_t: Tensor, t: Tensor, embeds: Tensor, camera: Tensor | None = None,
                 extra: dict[str, Tensor] | None = None) -> Tensor:
        n = len(self.objects)
        if embeds.dim() != 2 or embeds.shape[1] != n + 20:
            raise ValueError(f"teacher {self.name!r} needs a condition from encode_view() (embeds [B,{n + 20}]), got "
                             f"{tuple(embeds.shape)}")
        refs = self.renders_at(embeds[:, n:]).to(x_t.device, x_t.dtype)
        log_prior = torch.log(embeds[:, :n].to(x_t.device, x_t.dtype).clamp_min(0))  # 0 weight -> -inf
        a = self.schedule.alpha(t, x_t)
        s = self.schedule.sigma(t, x_t)
        return mixture_epsilon(x_t, a, s, refs, log_prior, self.smoothing)


def make_shapeworld_nv_exact(**kw: Any) -> ShapeWorldNovelViewTeacher:
    return ShapeWorldNovelViewTeacher(**kw).freeze()


# --------------------------------------------------------------------------------------- sampling
def sample_novel_views(teacher: ImageTeacher, cond: TextCond, steps: int = 50, guidance_scale: float = 2.0,
                       seed: int = 0, clip_x0: bool = True, callback=None) -> Tensor:
    """Deterministic DDIM novel views ``[B,3,H,W]`` in [0, 1] at the teacher's native resolution.

    ``cond`` from ``teacher.encode_view(...)``; defaults are PlacidDreamer stage 1's (50 steps, CFG 2.0).
    Pixel-space teachers start from a white prior mean (:func:`~studio.teachers.shapeworld_unet.ddim_sample`).
    """
    from .sampling import ddim_sample

    if not isinstance(cond, TextCond):
        raise UserError("sample_novel_views needs the condition from teacher.encode_view(image, d_polar_deg, "
                        f"d_azimuth_deg, d_radius), got {type(cond).__name__}")
    return ddim_sample(teacher, cond, steps=steps, guidance_scale=guidance_scale, seed=seed, clip_x0=clip_x0,
                       prior_mean=None if teacher.is_latent else 1.0, callback=callback)
