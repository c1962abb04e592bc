"""Stable-Diffusion-family teachers (SD 1.x / 2.x, epsilon or v-prediction) from diffusers weights.

``DiffusersTeacher.from_pretrained("stabilityai/stable-diffusion-2-1-base")`` or a local folder in the
``StableDiffusionPipeline.save_pretrained`` layout (``model_index.json`` with ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``). Only those five components are loaded (no safety
checker). On CUDA the default is fp16 with attention slicing, on CPU fp32.

Latents are ``(vae_latent - shift_factor) * scaling_factor`` (0.18215 for SD 1.x/2.x); images in [0, 1].

Pixel-space models (e.g. the ShapeWorld ``shapeworld-unet``): a folder without a ``vae`` whose UNet takes 3
channels loads with ``vae=None``; then ``x = image * 2 - 1`` at the UNet's ``sample_size``
(``is_latent=False``, ``vae_scale_factor=1``, ``latent_channels=3``), ``encode`` resizes images to that
native resolution and ``decode`` is ``(x + 1) / 2``. Everything else is the same SD code path.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from ..errors import UserError
from .base import ImageTeacher
from .schedule import NoiseSchedule

_NOT_FOUND = ("teacher {name!r} not found: give a local folder with model_index.json or a Hugging Face id; "
              "downloads need network")


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id ``owner/name``."""
    p = Path(name).expanduser()
    return (p.exists() or name.startswith((".", "~", "/", "\\")) or os.path.isabs(name)
            or (os.sep != "/" and os.sep in name) or name.count("/") > 1)


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _offline_env(enabled: bool) -> Iterator[None]:
    """Set HF_HUB_OFFLINE=1 while loading local files (restored afterwards)."""
    if not enabled:
        yield
        return
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def short_error(e: BaseException, limit: int = 300) -> str:
    """``"<Type>: <message>"`` of an exception on one line, cut at ``limit`` characters (for user messages)."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def transformers_dtype_kw(dtype: torch.dtype) -> dict:
    """The ``from_pretrained`` keyword of a dtype for the installed transformers (``dtype``, or ``torch_dtype``
    before 4.56)."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__.split("+")[0]) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_space_facts(teacher, unet, vae) -> None:
    """Latent / pixel-space facts of a diffusers UNet (+ VAE) teacher: ``latent_channels``,
    ``vae_scale_factor``, ``is_latent``, ``scaling_factor``, ``shift_factor``, ``native_resolution``.
    Without a VAE the model works in pixel space (``x = image * 2 - 1``)."""
    if vae is None:
        teacher.latent_channels = 3
        teacher.vae_scale_factor = 1
        teacher.is_latent = False
        teacher.scaling_factor, teacher.shift_factor = 1.0, 0.0
    else:
        teacher.latent_channels = int(vae.config.latent_channels)
        teacher.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        teacher.is_latent = True
        teacher.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or 0.18215)
        teacher.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
    teacher.native_resolution = int(unet.config.sample_size) * teacher.vae_scale_factor


def load_plan(id_or_path, device, dtype, attention_slicing, local_files_only, *, unet_folder_ok: bool = False):
    """What ``from_pretrained`` of a diffusers-layout teacher resolves before loading:
    ``(name, device, dtype, attention_slicing, local, src, attempts)``. fp16 and attention slicing default
    on for CUDA; a local folder must exist and hold ``model_index.json`` (or ``unet/`` when
    ``unet_folder_ok``); a hub id tries the local cache first and downloads only when not offline."""
    name = os.fspath(id_or_path)
    dev = torch.device(device) if device is not None else default_device()
    dt = parse_dtype(dtype) if dtype is not None else (torch.float16 if dev.type == "cuda" else torch.float32)
    if attention_slicing is None:
        attention_slicing = dev.type == "cuda"
    local = looks_local(name)
    if local:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise UserError(_NOT_FOUND.format(name=name) + f" (no folder at {path})")
        if not (path / "model_index.json").is_file() and not (unet_folder_ok and (path / "unet").is_dir()):
            raise UserError(_NOT_FOUND.format(name=name) + f" ({path} has no model_index.json)")
        return name, dev, dt, attention_slicing, local, str(path), [True]
    if local_files_only is None:
        attempts = [True] if _env_offline() else [True, False]
    else:
        attempts = [bool(local_files_only)]
    return name, dev, dt, attention_slicing, local, name, attempts


def load_with_attempts(load, attempts, local: bool, name: str, src, folder_hint: str):
    """``load(local_files_only)`` for each attempt until one works; every failure but a ``UserError``
    becomes one clear ``UserError`` (``folder_hint`` says what a local folder must hold)."""
    last: BaseException | None = None
    for lfo in attempts:
        try:
            with _offline_env(local):
                return load(lfo)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
            last = e
    if local:
        raise UserError(f"teacher {name!r} could not be loaded from {src}: {short_error(last)}; {folder_hint}") from None
    raise UserError(_NOT_FOUND.format(name=name) + f" ({short_error(last)})") from None


class DiffusersTeacher(ImageTeacher):
    """A frozen SD 1.x/2.x teacher: CLIP text encoder + UNet2DConditionModel + AutoencoderKL.

    Build it with :meth:`from_pretrained`; the constructor takes already-loaded components.
    ``camera`` (in :meth:`predict`) is passed as ``class_labels`` to UNets that have a class embedding
    (camera-conditioned LoRA teachers, threestudio-VSD style; ``None`` -> zeros) and ignored otherwise.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule: NoiseSchedule, *, name: str = "diffusers",
                 attention_slicing: bool | str | int = False) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.schedule = schedule
        self.name = name
        set_space_facts(self, unet, vae)
        self._lora_scales: dict[str, float] = {}
        self._text_lora: set[str] = set()
        self._truncation_warned = False
        if vae is None and unet.config.in_channels != 3:
            raise UserError(f"teacher {name!r} has no VAE but its UNet takes {unet.config.in_channels} channels; "
                            "a pixel-space teacher needs a 3-channel UNet, a latent one a vae/ folder")
        if unet.config.in_channels != self.latent_channels:
            raise UserError(f"teacher {name!r}: its UNet takes {unet.config.in_channels} input channels but the VAE "
                            f"gives {self.latent_channels} (inpainting / depth models are not plain text-to-image "
                            "teachers); give an SD 1.x/2.x text-to-image model")
        if attention_slicing:
            self.set_attention_slicing(attention_slicing)
        self.freeze()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, id_or_path: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, lora: Any = None, lora_scale: float = 1.0,
                        attention_slicing: bool | str | int | None = None, local_files_only: bool | None = None,
                        revision: str | None = None, variant: str | None = None) -> "DiffusersTeacher":
        """Load an SD 1.x/2.x-family model from a local folder or a Hugging Face id.

        Args:
            id_or_path: folder with ``model_index.json`` (``StableDiffusionPipeline`` layout) or hub id.
            device: default CUDA when available, else CPU.
            dtype: default float16 on CUDA, float32 elsewhere (strings like "fp16" accepted).
            lora: a LoRA (path / state dict) or a list of them, loaded with :meth:`load_lora`.
            lora_scale: scale of the LoRA(s) given in ``lora``.
            attention_slicing: default on for CUDA, off otherwise (True, "auto", "max" or a slice size).
            local_files_only: local folders never touch the network. For hub ids: ``None`` (default)
                tries the local HF cache first and downloads only if that fails and HF_HUB_OFFLINE is
                not set; ``True`` uses the cache only; ``False`` lets diffusers check the hub.

        Raises:
            UserError: the folder / id does not exist or does not hold a loadable SD-family model.
        """
        name, dev, dt, attention_slicing, local, src, attempts = load_plan(
            id_or_path, device, dtype, attention_slicing, local_files_only, unet_folder_ok=True)
        comps = load_with_attempts(
            lambda lfo: load_components(src, dt, lfo, revision, variant), attempts, local, name, src,
            "give a folder saved with StableDiffusionPipeline.save_pretrained (unet, vae, text_encoder, tokenizer, "
            "scheduler)")
        teacher = cls(*comps, name=name, attention_slicing=False)
        teacher.to(dev)
        if attention_slicing:
            teacher.set_attention_slicing(attention_slicing)
        if lora is not None:
            loras = list(lora) if isinstance(lora, (list, tuple)) else [lora]
            for i, item in enumerate(loras):
                teacher.load_lora(item, adapter_name=f"lora{i}" if len(loras) > 1 else "default", scale=lora_scale)
        return teacher

    def set_attention_slicing(self, slice_size: bool | str | int = "auto") -> None:
        """Sliced attention in the UNet (less memory, a little slower); ``False`` turns it off."""
        if slice_size is False or slice_size is None:
            self.unet.set_default_attn_processor()
            return
        self.unet.set_attention_slice("auto" if slice_size is True else slice_size)

    # ------------------------------------------------------------------ LoRA
    def load_lora(self, path_or_state: str | os.PathLike | Mapping[str, Tensor], adapter_name: str = "default",
                  scale: float = 1.0) -> str:
        """Load a LoRA into the UNet (and the text encoder when it holds text-encoder weights).

        Accepts: a diffusers LoRA folder / ``.safetensors`` file (``save_lora_weights`` format, keys
        ``unet.…`` / ``text_encoder.…``; kohya/A1111 keys are converted by diffusers), a peft adapter
        folder (``adapter_config.json`` + ``adapter_model.safetensors``), or a state dict. Only
        safetensors files are read (no pickles). The LoRA is frozen like the rest of the teacher.
        Returns the adapter name.
        """
        try:
            self._load_lora(path_or_state, adapter_name)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            what = "state dict" if isinstance(path_or_state, Mapping) else repr(os.fspath(path_or_state))
            raise UserError(f"LoRA {what} could not be loaded into teacher {self.name!r}: {short_error(e)}; give a "
                            "diffusers LoRA (.safetensors or a folder from save_lora_weights) or a peft adapter "
                            "folder trained for this base model") from None
        self._lora_scales[adapter_name] = float(scale)
        self._apply_lora_scales()
        self.freeze()
        if adapter_name in self._text_lora:
            self.clear_prompt_cache()
        return adapter_name

    def _load_lora(self, src, adapter_name: str) -> None:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        if adapter_name in self._lora_scales:
            raise UserError(f"teacher {self.name!r} already has a LoRA named {adapter_name!r}; pick another adapter_name")
        if isinstance(src, Mapping):
            state = dict(src)
        else:
            p = Path(os.fspath(src)).expanduser()
            if not p.exists():
                raise UserError(f"LoRA {os.fspath(src)!r} not found: give a .safetensors file or a folder with one")
            if p.is_dir() and (p / "adapter_config.json").is_file():
                self._load_peft_folder(p, adapter_name)
                return
            if p.is_file():
                if p.suffix != ".safetensors":
                    raise UserError(f"LoRA {str(p)!r}: only .safetensors files are read (no pickled .bin/.pt)")
                from safetensors.torch import load_file
                state = load_file(str(p))
            else:
                with _offline_env(True):
                    state, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(str(p), local_files_only=True,
                                                                              use_safetensors=True)
        if any(k.startswith(("lora_unet_", "lora_te_")) for k in state):
            state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(state)
        else:
            alphas = None
        if not state or not all("lora" in k for k in state):
            raise UserError("not a LoRA state dict (every key must contain 'lora')")
        has_unet = any(k.startswith("unet.") for k in state)
        has_te = any(k.startswith("text_encoder.") for k in state)
        if has_unet or has_te:
            if has_unet:
                StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, self.unet, adapter_name=adapter_name)
            if has_te:
                StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(state, alphas, self.text_encoder,
                                                                           adapter_name=adapter_name)
                self._text_lora.add(adapter_name)
        elif any(k.startswith("text_model.") for k in state):
            StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
                {f"text_encoder.{k}": v for k, v in state.items()}, alphas, self.text_encoder, adapter_name=adapter_name)
            self._text_lora.add(adapter_name)
        else:  # bare UNet keys (e.g. peft.get_peft_model_state_dict(unet))
            self.unet.load_lora_adapter(state, prefix=None, network_alphas=alphas, adapter_name=adapter_name)

    def _load_peft_folder(self, folder: Path, adapter_name: str) -> None:
        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise UserError(f"LoRA folder {str(folder)!r} has adapter_config.json but no adapter_model.safetensors")
        config = LoraConfig.from_pretrained(str(folder))
        state = {}
        for k, v in load_file(str(weights)).items():
            for pre in ("base_model.model.", "unet.", "text_encoder."):
                if k.startswith(pre):
                    k = k[len(pre):]
                    break
            state[k] = v
        target = self.text_encoder if all(k.startswith("text_model.") for k in state) else self.unet
        if target is self.text_encoder:
            from peft import inject_adapter_in_model
            inject_adapter_in_model(config, target, adapter_name=adapter_name)
            self._text_lora.add(adapter_name)
        else:
            target.add_adapter(config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(target, state, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise UserError(f"LoRA folder {str(folder)!r} does not fit this model ({len(unexpected)} unexpected keys, "
                            f"e.g. {unexpected[0]!r})")
        target.to(self.device, self.dtype)

    def _apply_lora_scales(self) -> None:
        unet_names = [n for n in self._lora_scales if n in peft_adapter_names(self.unet)]
        if unet_names:
            self.unet.set_adapters(unet_names, [self._lora_scales[n] for n in unet_names])
        te_names = [n for n in self._lora_scales if n in self._text_lora]
        if te_names:
            from diffusers.loaders.lora_base import set_adapters_for_text_encoder
            set_adapters_for_text_encoder(te_names, self.text_encoder, [self._lora_scales[n] for n in te_names])

    @property
    def lora_adapters(self) -> dict[str, float]:
        """Loaded LoRA adapters and their scales."""
        return dict(self._lora_scales)

    def set_lora_scale(self, scale: float, adapter_name: str | None = None) -> None:
        """Set the scale of one adapter (default: all)."""
        names = [adapter_name] if adapter_name is not None else list(self._lora_scales)
        for n in names:
            if n not in self._lora_scales:
                raise ValueError(f"no LoRA named {n!r}; loaded: {sorted(self._lora_scales)}")
            self._lora_scales[n] = float(scale)
        self._apply_lora_scales()
        if any(n in self._text_lora for n in names):
            self.clear_prompt_cache()

    def unload_lora(self, adapter_name: str | None = None) -> None:
        """Remove one LoRA adapter (default: all)."""
        names = [adapter_name] if adapter_name is not None else list(self._lora_scales)
        for n in names:
            if n not in self._lora_scales:
                raise ValueError(f"no LoRA named {n!r}; loaded: {sorted(self._lora_scales)}")
            if n in peft_adapter_names(self.unet):
                self.unet.delete_adapters(n)
            if n in self._text_lora:
                from peft.tuners.tuners_utils import BaseTunerLayer
                for m in self.text_encoder.modules():
                    if isinstance(m, BaseTunerLayer):
                        m.delete_adapter(n)
                self._text_lora.discard(n)
                self.clear_prompt_cache()
            del self._lora_scales[n]
        self._apply_lora_scales()

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """Context in which the UNet runs without its LoRA adapters (e.g. pretrained vs LoRA branches).

        peft's ``enable_adapters()`` sets ``requires_grad=True`` on every active adapter; the flags are put back on
        leaving, so a frozen adapter (a personal LoRA under a trainable steering LoRA) stays frozen."""
        if not peft_adapter_names(self.unet):
            yield
            return
        flags = [(q, q.requires_grad) for q in self.unet.parameters()]
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()
            for q, f in flags:
                q.requires_grad_(f)

    # ------------------------------------------------------------------ protocol
    def _embed_texts(self, texts: list[str]) -> Tensor:
        tok = self.tokenizer
        max_len = int(tok.model_max_length)
        if not self._truncation_warned:
            lengths = [len(ids) for ids in tok(texts, truncation=False)["input_ids"]]
            if max(lengths) > max_len:
                self._truncation_warned = True
                warnings.warn(f"teacher {self.name!r}: prompts longer than {max_len} tokens are truncated",
                              stacklevel=3)
        ids = tok(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
        dev = self.text_encoder.device
        return self.text_encoder(ids.to(dev))[0]

    def _class_labels(self, camera: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        emb = getattr(self.unet, "class_embedding", None)
        if emb is None:
            return None
        if camera is None:
            in_dim = getattr(getattr(emb, "linear_1", None), "in_features", None)
            if in_dim is None:
                raise ValueError(f"teacher {self.name!r} is class/camera-conditioned: pass camera=")
            return torch.zeros(batch, in_dim, device=device, dtype=self.unet.dtype)
        cam = camera.reshape(camera.shape[0], -1) if camera.is_floating_point() else camera
        return cam.to(device=device, dtype=self.unet.dtype if cam.is_floating_point() else None)

    def _forward(self, x_t: Tensor, t: Tensor, embeds: Tensor, camera: Tensor | None = None,
                 extra: dict[str, Tensor] | None = None) -> Tensor:
        dt = self.unet.dtype
        out = self.unet(x_t.to(dt), t.to(x_t.device), encoder_hidden_states=embeds.to(x_t.device, dt),
                        class_labels=self._class_labels(camera, x_t.shape[0], x_t.device), return_dict=False)[0]
        return out.to(x_t.dtype)

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ValueError(f"image size {h}x{w} must be divisible by the VAE factor {self.vae_scale_factor}")

    def encode(self, images: Tensor, *, size: int | tuple[int, int] | None = None, sample: bool = False,
               generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B,3,H,W]`` in [0, 1] -> scaled latents ``[B,4,H/f,W/f]`` (differentiable w.r.t. images).

        ``size``: resize (bilinear) to this size first, e.g. ``teacher.native_resolution``.
        ``sample``: draw from the VAE posterior instead of taking its mean (the posterior std of SD's VAE
        is tiny, so the mean is the deterministic default).
        Pixel-space teachers (no VAE): ``image * 2 - 1`` resized to ``size`` (default: the native resolution).
        """
        if self.vae is None:
            hw = (size, size) if isinstance(size, int) else tuple(size or (self.native_resolution,) * 2)
            self._check_images(images)
            if tuple(images.shape[-2:]) != hw:
                shrink = images.shape[-2] > hw[0] or images.shape[-1] > hw[1]
                images = torch.nn.functional.interpolate(images, size=hw, mode="bilinear", align_corners=False,
                                                         antialias=shrink)
            return images * 2 - 1
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            if tuple(images.shape[-2:]) != hw:
                images = torch.nn.functional.interpolate(images, size=hw, mode="bilinear", align_corners=False)
        self._check_images(images)
        x = (images * 2 - 1).to(device=self.vae.device, dtype=self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).to(images.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images ``[B,3,H,W]`` in [0, 1] (clamped)."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B,{self.latent_channels},h,w], got {tuple(latents.shape)}")
        if self.vae is None:
            return ((latents + 1) / 2).clamp(0, 1)
        z = (latents / self.scaling_factor + self.shift_factor).to(device=self.vae.device, dtype=self.vae.dtype)
        img = self.vae.decode(z, return_dict=False)[0]
        return ((img.to(latents.dtype) + 1) / 2).clamp(0, 1)


def peft_adapter_names(model) -> set[str]:
    """Names of the peft adapters (LoRA) that ``model`` holds (empty without peft)."""
    cfg = getattr(model, "peft_config", None)
    return set(cfg) if isinstance(cfg, dict) else set()


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A ``torch.dtype`` from a dtype or a name (``fp16``, ``bf16``, ``float32``, ...); ``UserError`` otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    key = str(dtype).replace("torch.", "").lower()
    if key not in table:
        raise UserError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[key]


def load_model_index_file(f: str | os.PathLike) -> dict:
    """Parse a ``model_index.json`` file; a damaged one raises ``UserError`` naming the file and the fix (never the
    bare JSON parser message)."""
    f = Path(f)
    try:
        index = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        why = f"it is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    except UnicodeDecodeError:
        why = "it is not UTF-8 text"
    else:
        if isinstance(index, dict):
            return index
        why = f"it holds a JSON {type(index).__name__}, not an object"
    raise UserError(f"model folder file '{f}' is damaged: {why}. The folder was probably not fully downloaded or "
                    "copied: copy or download the model again (a Hugging Face cache entry: delete it and download "
                    "again), or re-save the pipeline with save_pretrained")


def read_model_index(src: str, local_files_only: bool, revision: str | None) -> dict | None:
    """``model_index.json`` of a folder (None when it has none) or of a hub id."""
    p = Path(src)
    if p.is_dir():
        f = p / "model_index.json"
        return load_model_index_file(f) if f.is_file() else None
    from huggingface_hub import hf_hub_download
    f = hf_hub_download(src, "model_index.json", revision=revision, local_files_only=local_files_only)
    return load_model_index_file(f)


def load_components(src: str, dtype: torch.dtype, local_files_only: bool, revision: str | None,
                    variant: str | None):
    """The parts of an SD 1.x/2.x layout (UNet, VAE or None for pixel space, text encoder, tokenizer, schedule);
    ``UserError`` for other layouts."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index = read_model_index(src, local_files_only, revision)
    # Pixel-space models have no VAE (a model_index.json without "vae" or with "vae": [null, null]).
    pixel = index is not None and not any((index.get("vae") or [None])[:1])
    if index is not None:
        missing = [c for c in ("unet", "text_encoder", "tokenizer", "scheduler") if c not in index]
        if missing or "text_encoder_2" in index or "transformer" in index:
            raise UserError(f"teacher {src!r} is a {index.get('_class_name', 'pipeline')}, not an SD 1.x/2.x "
                            "text-to-image layout (needs unet, vae, text_encoder, tokenizer, scheduler; no "
                            "text_encoder_2)")
    common = dict(local_files_only=local_files_only, revision=revision)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, variant=variant, **common)
    if getattr(unet.config, "addition_embed_type", None):
        raise UserError(f"teacher {src!r}: its UNet needs added conditioning ({unet.config.addition_embed_type}); "
                        "only SD 1.x/2.x-style text-to-image UNets are supported")
    if pixel and unet.config.in_channels != 3:
        raise UserError(f"teacher {src!r} has no vae but its UNet takes {unet.config.in_channels} channels; give a "
                        "folder with a vae/ (latent model) or a 3-channel pixel-space UNet")
    vae = None if pixel else AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, variant=variant,
                                                           **common)
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", variant=variant,
                                                 **transformers_dtype_kw(dtype), **common)
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **common)
    sched_config = DDPMScheduler.load_config(src, subfolder="scheduler", **common)
    schedule = NoiseSchedule.from_diffusers(sched_config)
    return unet, vae, text_encoder, tokenizer, schedule
