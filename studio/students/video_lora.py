"""A trainable LoRA student on a video teacher's own denoiser (MCM's student, spec 2.2).

:class:`VideoLoRAStudent` adds a peft LoRA adapter (via :func:`~studio.students.lora_score.add_lora_adapter`) *in
place* to ``teacher.denoiser`` -- the module the teacher's ``_forward`` calls at call time -- so one set of base
weights serves both roles:

* **teacher** = the denoiser with the student's adapter *off*. This is the default state: after construction
  ``teacher.predict`` is exactly what it was (the adapter is switched on only for the duration of a student
  call), and ``student.adapter_enabled(False)`` gives the same inside student code;
* **student** = the same denoiser with the adapter *on*: every student call (``predict``, ``predict_branches``,
  ``_forward``, and any teacher method reached through the student, e.g. ``forward_block``) switches it on for
  its duration -- unless an enclosing ``student.adapter_enabled(False)`` / ``teacher_mode()`` says otherwise
  (inside it, student calls predict as the teacher, like peft's ``disable_adapter``; inside
  ``adapter_enabled(True)`` even ``teacher.predict`` runs the student).

The student satisfies the :class:`~studio.teachers.video_base.VideoTeacher` protocol by delegation (attributes such as
``schedule``, ``num_frames``, ``latent_channels`` read through to the teacher; ``encode_prompt`` shares the
teacher's prompt cache; ``encode`` / ``decode`` / ``noise`` / ``latent_shape`` are the teacher's), so every sampler
in :mod:`studio.teachers.sampling` takes a student wherever it takes a teacher.

LoRA (peft init: ``A`` random, ``B = 0``, so the student starts as the teacher exactly): rank ``rank``, scale
``alpha / rank`` (MCM: rank 64, alpha 64, dropout 0), on every module whose name ends with one of
``target_modules`` (default: :func:`video_lora_targets`, MCM's list spelt for the denoiser's class --
:data:`VIDEO_LORA_TARGETS` for the UNets: attention projections, transformer in/out projections, feed-forward
layers, ResNet convs and time-embedding projections, down/up-sampler convs; :data:`WAN_LORA_TARGETS` for Wan:
attention, ``proj_out``, feed-forward ``ffn``, the patch-embedding conv and the time embedding) and is a
``Linear`` / ``Conv1d/2d/3d``, except names matching the regular expression ``exclude`` (default
:data:`VIDEO_LORA_EXCLUDE`: names containing both "temp" and "conv", MCM's rule for ModelScope's temporal
Conv3D layers; ``None`` excludes nothing). The resolved module names are :attr:`VideoLoRAStudent.target_names`.

Training state: only the adapter's ``lora_A`` / ``lora_B`` matrices require grad (kept in ``lora_dtype``,
float32 by default, like :class:`~studio.students.lora_score.LoRAScore`; a half-precision base then needs
autocast, as diffusers' LoRA training scripts use); the base weights stay frozen and in eval mode.
``train(mode)`` switches only the adapter's dropout. Switching adapters never changes any ``requires_grad`` flag
(peft's ``set_adapter`` does; the flags are restored). :meth:`state_dict` / :meth:`save` hold exactly the adapter
tensors, keyed by module path without the adapter name (``...to_q.lora_A.weight``).

:meth:`VideoLoRAStudent.merge` folds the adapter (and any other adapter active in the teacher) into a copy of
the denoiser and returns a plain teacher for inference (shallow copy of the teacher sharing every other module,
so the original teacher and the student are untouched).
"""
from __future__ import annotations

import contextlib
import copy
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from ..io.atomic import atomic_path
from ..teachers.diffusers_sd import peft_adapter_names
from ..teachers.video_base import VideoTeacher
from .lora_score import add_lora_adapter

#: MCM's LoRA targets (spec 2.2); a module gets an adapter when its name equals one or ends with "." + one
VIDEO_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                      "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
#: MCM's roles (attention, transformer in/out, feed-forward, the convolutions, the time embedding) spelt in a
#: ``WanTransformer3DModel``'s names: its feed-forward is ``ffn.net.*``, its only convolution the patch embedding,
#: its time embedding the ``condition_embedder``'s MLP and the per-block modulation projection ``time_proj``
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_out", "ffn.net.0.proj", "ffn.net.2", "patch_embedding",
                    "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
                    "condition_embedder.time_proj")
#: the target list per denoiser class (looked up along the class's MRO by name); other classes get MCM's list
VIDEO_LORA_TARGETS_BY_CLASS: dict[str, tuple[str, ...]] = {
    "UNet3DConditionModel": VIDEO_LORA_TARGETS,      # ModelScope T2V (temporal Conv3D excluded, VIDEO_LORA_EXCLUDE)
    "UNetMotionModel": VIDEO_LORA_TARGETS,           # AnimateDiff: SD UNet + motion modules (same names)
    "WanTransformer3DModel": WAN_LORA_TARGETS,
}
#: names containing both "temp" and "conv" (ModelScope's temporal Conv3D stacks), excluded as MCM does
VIDEO_LORA_EXCLUDE = r"(?=.*temp)(?=.*conv)"
#: per class, used where the caller leaves ``exclude`` at :data:`VIDEO_LORA_EXCLUDE`: AnimateDiff's motion modules
#: call ``proj_in(input=...)`` / ``proj_out(input=...)`` by keyword, which a peft LoRA layer (``forward(x)``)
#: cannot take, so those two stay un-adapted (their attention and feed-forward layers are adapted)
VIDEO_LORA_EXCLUDE_BY_CLASS: dict[str, str] = {
    "UNetMotionModel": VIDEO_LORA_EXCLUDE + r"|motion_modules\.\d+\.proj_(in|out)$",
}
ADAPTER_NAME = "video_lora"
FORMAT = "studio-video-lora/1"
_SUPPORTED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_DENOISER_ATTRS = ("denoiser", "unet", "transformer")


def video_lora_targets(denoiser: torch.nn.Module) -> tuple[str, ...]:
    """MCM's target list in the names of ``denoiser``'s class (:data:`VIDEO_LORA_TARGETS_BY_CLASS`, first match
    along the MRO; :data:`VIDEO_LORA_TARGETS` for any other class)."""
    for cls in type(denoiser).__mro__:
        if cls.__name__ in VIDEO_LORA_TARGETS_BY_CLASS:
            return VIDEO_LORA_TARGETS_BY_CLASS[cls.__name__]
    return VIDEO_LORA_TARGETS


def resolve_lora_targets(module: torch.nn.Module, target_modules: Iterable[str] = VIDEO_LORA_TARGETS,
                         exclude: str | None = VIDEO_LORA_EXCLUDE) -> tuple[list[str], list[str]]:
    """``(names, skipped)``: full names of the modules of ``module`` that get adapters, and those that matched a
    target but are not ``Linear`` / ``Conv`` layers (e.g. ModelScope's ``temp_convs.N.conv1`` ``Sequential``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = tuple(target_modules)
    pattern = re.compile(exclude) if exclude else None
    names, skipped = [], []
    for name, m in module.named_modules():
        if not name or not any(name == k or name.endswith("." + k) for k in targets):
            continue
        if pattern is not None and pattern.search(name):
            continue
        base = m.get_base_layer() if isinstance(m, BaseTunerLayer) else m
        (names if isinstance(base, _SUPPORTED) else skipped).append(name)
    return names, skipped


def _merge_into_base(layer: Any, adapters: Sequence[str]) -> None:
    """Fold LoRA ``adapters`` of one peft layer into its base weight: ``W += scaling * B A`` (a conv LoRA is
    ``A`` with the base's kernel followed by a 1x1 ``B``, so ``W[o, i, k...] += scaling * sum_r B[o, r]
    A[r, i, k...]``). Done here rather than by peft's ``merge``, which mis-shapes 1x1x1 ``Conv3d`` deltas;
    variants (DoRA), LoRA biases and ``fan_in_fan_out`` layers still go through peft."""
    base = layer.get_base_layer()
    for a in adapters:
        if (a in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(a, False)
                or getattr(layer, "fan_in_fan_out", False)):
            layer.merge(adapter_names=[a])
            continue
        A = layer.lora_A[a].weight.float()
        B = layer.lora_B[a].weight.float().flatten(1)
        delta = torch.einsum("or,r...->o...", B, A) * float(layer.scaling[a])
        base.weight.data += delta.reshape(base.weight.shape).to(base.weight.dtype)


def _delegated(name: str, doc: str = "") -> property:
    return property(lambda self: getattr(self.teacher, name), doc=doc or f"The teacher's ``{name}``.")


class TeacherClipFacts:
    """Mixin of students that wrap a video teacher (``self.teacher``): its schedule and clip facts, read through
    (put before :class:`VideoTeacher` in the bases so these override its class attributes)."""

    schedule = _delegated("schedule")
    latent_channels = _delegated("latent_channels")
    vae_scale_factor = _delegated("vae_scale_factor")
    native_resolution = _delegated("native_resolution")
    is_latent = _delegated("is_latent")
    num_frames = _delegated("num_frames")
    temporal_compression = _delegated("temporal_compression")
    frame_rate = _delegated("frame_rate")


class VideoLoRAStudent(TeacherClipFacts, VideoTeacher):
    """LoRA student on ``teacher.denoiser`` (see the module doc).

    Args:
        teacher: a :class:`VideoTeacher` whose ``_forward`` calls ``self.<module>`` at call time.
        rank, alpha, dropout: LoRA rank, ``lora_alpha`` (default ``rank``: scale 1) and dropout.
        target_modules, exclude: which modules get adapters (see :func:`resolve_lora_targets`).
        module: the attribute of the teacher holding the denoiser (default: the first of ``denoiser``, ``unet``,
            ``transformer`` the teacher has).
        adapter_name: the peft adapter name (must be new in that module).
        seed: seeds the ``A`` initialisation without touching the global RNG (``None``: global RNG).
        lora_dtype: dtype of the trainable matrices (default float32; ``None`` keeps peft's, the base's dtype).
    """


    def __init__(self, teacher: VideoTeacher, *, rank: int = 64, alpha: float | None = None, dropout: float = 0.0,
                 target_modules: Iterable[str] | None = None, exclude: str | None = VIDEO_LORA_EXCLUDE,
                 module: str | None = None, adapter_name: str = ADAPTER_NAME, seed: int | None = 0,
                 lora_dtype: torch.dtype | None = torch.float32) -> None:
        super().__init__()
        if int(rank) < 1:
            raise UserError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= float(dropout) < 1.0:
            raise UserError(f"LoRA dropout must lie in [0, 1), got {dropout}")
        if module is None:
            module = next((a for a in _DENOISER_ATTRS if isinstance(getattr(teacher, a, None), torch.nn.Module)), None)
            if module is None:
                raise UserError(f"teacher {getattr(teacher, 'name', type(teacher).__name__)!r} exposes no denoiser "
                                f"module ({', '.join(_DENOISER_ATTRS)}); pass module='<attribute>'")
        denoiser = getattr(teacher, module, None)
        if not isinstance(denoiser, torch.nn.Module):
            raise UserError(f"teacher has no module attribute {module!r} to put the LoRA on")
        self.teacher = teacher
        self.module_attr = module
        self.adapter_name = str(adapter_name)
        self.rank = int(rank)
        self.alpha = float(self.rank if alpha is None else alpha)
        self.dropout = float(dropout)
        self.exclude = exclude
        if self.adapter_name in peft_adapter_names(denoiser):
            raise UserError(f"the denoiser already holds an adapter named {self.adapter_name!r}; pass another "
                            "adapter_name (two students on one teacher need distinct names)")
        target_modules = video_lora_targets(denoiser) if target_modules is None else tuple(target_modules)
        if exclude == VIDEO_LORA_EXCLUDE:
            exclude = next((VIDEO_LORA_EXCLUDE_BY_CLASS[c.__name__] for c in type(denoiser).__mro__
                            if c.__name__ in VIDEO_LORA_EXCLUDE_BY_CLASS), exclude)
            self.exclude = exclude
        names, skipped = resolve_lora_targets(denoiser, target_modules, exclude)
        if not names:
            raise UserError(f"no LoRA target among {tuple(target_modules)} (minus exclude={exclude!r}) is a Linear / "
                            f"Conv layer of {type(denoiser).__name__}; check target_modules")
        self.target_names = tuple(names)
        self.skipped_names = tuple(skipped)
        add_lora_adapter(denoiser, rank=self.rank, adapter_name=self.adapter_name, target_modules=names,
                         scales=getattr(teacher, "_lora_scales", {}), seed=seed, alpha=self.alpha, dropout=self.dropout)

        from peft.tuners.tuners_utils import BaseTunerLayer

        self._layers = [m for m in denoiser.modules()
                        if isinstance(m, BaseTunerLayer) and self.adapter_name in getattr(m, "lora_A", {})]
        self._lora_params: OrderedDict[str, torch.nn.Parameter] = OrderedDict()
        tag = f".{self.adapter_name}."
        for name, p in denoiser.named_parameters():
            if tag in name and ("lora_A" in name or "lora_B" in name):
                self._lora_params[name.replace(f".{self.adapter_name}", "", 1)] = p
        # every other parameter of the denoiser (base weights, other adapters) stays frozen
        ours = {id(p) for p in self._lora_params.values()}
        for p in denoiser.parameters():
            if id(p) not in ours:
                p.requires_grad_(False)
        for p in self._lora_params.values():
            if lora_dtype is not None:
                p.data = p.data.to(lora_dtype)
            p.requires_grad_(True)
        # teacher mode by default: the adapter runs only inside student calls
        self._override: bool | None = None
        self._set_adapter(False)
        self.train(False)

    # ------------------------------------------------------------------ adapter switching
    @property
    def denoiser(self) -> torch.nn.Module:
        """The shared denoiser (teacher's module, adapter inside)."""
        return getattr(self.teacher, self.module_attr)

    def _all_adapter_params(self) -> list[torch.nn.Parameter]:
        out = []
        for layer in self._layers:
            for attr in ("lora_A", "lora_B"):
                out.extend(getattr(layer, attr).parameters())
        return out

    def _set_adapter(self, enabled: bool) -> None:
        slow = []
        for layer in self._layers:
            active = [a for a in layer.active_adapters if a != self.adapter_name]
            new = active + [self.adapter_name] if enabled else active
            if hasattr(layer, "_active_adapter"):
                # what peft's set_adapter assigns, minus its requires_grad flips (and ~10x cheaper: this runs
                # twice per student call)
                layer._active_adapter = new
            else:
                slow.append((layer, new))
        if slow:
            flags = [(p, p.requires_grad) for p in self._all_adapter_params()]
            for layer, new in slow:
                layer.set_adapter(new)
            for p, f in flags:  # peft's set_adapter flips requires_grad; keep the caller's flags
                p.requires_grad_(f)

    def adapter_is_enabled(self) -> bool:
        """Whether the student's adapter is currently active in the shared denoiser."""
        return bool(self._layers) and self.adapter_name in self._layers[0].active_adapters

    @contextlib.contextmanager
    def _switched(self, enabled: bool) -> Iterator[None]:
        prev = self.adapter_is_enabled()
        if prev == bool(enabled):
            yield
            return
        self._set_adapter(bool(enabled))
        try:
            yield
        finally:
            self._set_adapter(prev)

    @contextlib.contextmanager
    def adapter_enabled(self, enabled: bool = True) -> Iterator[None]:
        """Run a block with the adapter on (student) or off (teacher) for *every* call on the shared denoiser --
        the teacher's and the student's (inside ``adapter_enabled(False)`` the student predicts as the teacher,
        like peft's ``disable_adapter``); the previous state is restored after. Nests."""
        prev = self._override
        self._override = bool(enabled)
        try:
            with self._switched(bool(enabled)):
                yield
        finally:
            self._override = prev

    def _student_call(self) -> contextlib.AbstractContextManager:
        """The adapter state of a student call: on, unless an enclosing :meth:`adapter_enabled` says otherwise."""
        return self._switched(True if self._override is None else self._override)

    def teacher_mode(self) -> contextlib.AbstractContextManager:
        """Shorthand for ``adapter_enabled(False)``: the shared denoiser acts as the frozen teacher."""
        return self.adapter_enabled(False)

    # ------------------------------------------------------------------ training state
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's ``lora_A`` / ``lora_B`` matrices (what the optimizer gets); marks them ``requires_grad``."""
        for p in self._lora_params.values():
            p.requires_grad_(True)
        return list(self._lora_params.values())

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self._lora_params.items())

    def freeze(self) -> VideoLoRAStudent:
        """Freeze the base (and any other adapter); the student's own adapter stays trainable."""
        for p in self.denoiser.parameters():
            p.requires_grad_(False)
        self.trainable_parameters()
        return self

    def train(self, mode: bool = True) -> VideoLoRAStudent:
        """Switch only the adapter's dropout (the frozen base stays in eval mode)."""
        self.training = bool(mode)
        for layer in self._layers:
            drop = layer.lora_dropout[self.adapter_name]
            drop.train(bool(mode))
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):  # type: ignore[override]
        """The adapter tensors only (see the module doc for the keys)."""
        out = destination if destination is not None else OrderedDict()
        for k, p in self._lora_params.items():
            out[prefix + k] = p if keep_vars else p.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True,  # type: ignore[override]
                        assign: bool = False):
        """Copy adapter tensors saved by :meth:`state_dict` / :meth:`save` (``strict``: exactly the same keys)."""
        missing = [k for k in self._lora_params if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self._lora_params]
        if strict and (missing or unexpected):
            raise UserError(f"LoRA weights do not match this student: {len(missing)} missing (e.g. {missing[:3]}), "
                            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); were they saved for another "
                            "teacher, target list or exclude pattern?")
        with torch.no_grad():
            for k, p in self._lora_params.items():
                if k in state_dict:
                    v = state_dict[k]
                    if tuple(v.shape) != tuple(p.shape):
                        raise UserError(f"LoRA weight {k} has shape {tuple(v.shape)}, this student expects "
                                        f"{tuple(p.shape)} (another rank?)")
                    p.copy_(v.to(p.device, p.dtype))
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def metadata(self) -> dict[str, str]:
        """What :meth:`save` writes next to the tensors (strings, safetensors metadata)."""
        return {"format": FORMAT, "rank": str(self.rank), "alpha": repr(self.alpha), "dropout": repr(self.dropout),
                "exclude": json.dumps(self.exclude), "target_modules": json.dumps(list(self.target_names)),
                "teacher": str(getattr(self.teacher, "name", ""))}

    def save(self, path: str | Path) -> Path:
        """Write the adapter weights to ``path`` as safetensors (atomically), with :meth:`metadata`."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self._lora_params.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=self.metadata())
        return Path(path)

    @staticmethod
    def read(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
        """``(tensors, metadata)`` of a file written by :meth:`save` (never unpickles)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        p = Path(path)
        if not p.is_file():
            raise UserError(f"LoRA file '{p}' not found; give the path of a .safetensors file written by "
                            "VideoLoRAStudent.save")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(p))
        except Exception as e:  # any parse failure is a bad file
            raise UserError(f"'{p}' is not a readable safetensors file ({e}); give a file written by "
                            "VideoLoRAStudent.save") from e
        if meta.get("format") != FORMAT:
            raise UserError(f"'{p}' is not a studio video LoRA (format {meta.get('format')!r}, expected {FORMAT!r})")
        return tensors, meta

    def load(self, path: str | Path, strict: bool = True) -> VideoLoRAStudent:
        """Load adapter weights written by :meth:`save` into this student (same rank and targets)."""
        tensors, meta = self.read(path)
        if int(meta.get("rank", self.rank)) != self.rank:
            raise UserError(f"'{path}' holds a rank-{meta.get('rank')} LoRA, this student has rank {self.rank}; "
                            f"build it with VideoLoRAStudent.from_file(teacher, '{path}')")
        self.load_state_dict(tensors, strict=strict)
        return self

    @classmethod
    def from_file(cls, teacher: VideoTeacher, path: str | Path, **kwargs: Any) -> VideoLoRAStudent:
        """A student on ``teacher`` with the rank / alpha / dropout / targets stored in ``path``, weights loaded."""
        _, meta = cls.read(path)
        opts: dict[str, Any] = {"rank": int(meta["rank"]), "alpha": float(meta["alpha"]),
                                "dropout": float(meta["dropout"]), "target_modules": json.loads(meta["target_modules"]),
                                "exclude": json.loads(meta.get("exclude", "null"))}
        opts.update(kwargs)
        return cls(teacher, **opts).load(path)

    # ------------------------------------------------------------------ merge
    def merge(self, inplace: bool = False) -> VideoTeacher:
        """A plain teacher whose denoiser has the LoRA folded into its weights, for inference.

        Every adapter active in student mode (this one and any the teacher already carried) is merged
        (``W <- W + scale * B A``) and the peft layers are replaced by their base layers. ``inplace=False``
        (default): on a deep copy of the denoiser inside a shallow copy of the teacher (text encoder, VAE and
        everything else shared and unchanged), so the teacher and this student stay usable. ``inplace=True``:
        into the shared denoiser itself (no extra memory); the teacher then *is* the merged model and this
        student must not be used any more.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        with self.adapter_enabled(True):
            den = self.denoiser if inplace else copy.deepcopy(self.denoiser)
        with torch.no_grad():
            for name, m in list(den.named_modules()):
                if not isinstance(m, BaseTunerLayer):
                    continue
                active = [a for a in m.active_adapters if a in m.lora_A]
                if self.adapter_name in m.lora_A and self.adapter_name not in active:
                    active.append(self.adapter_name)
                _merge_into_base(m, active)
                parent_name, _, child = name.rpartition(".")
                parent = den.get_submodule(parent_name) if parent_name else den
                setattr(parent, child, m.get_base_layer())
        for attr in ("peft_config",):
            if hasattr(den, attr):
                delattr(den, attr)
        if hasattr(den, "_hf_peft_config_loaded"):
            den._hf_peft_config_loaded = False
        for p in den.parameters():
            p.requires_grad_(False)
        den.eval()
        if inplace:
            self._layers = []
            self._lora_params = OrderedDict()
            return self.teacher
        t = self.teacher
        merged = copy.copy(t)
        merged._parameters = OrderedDict(t._parameters)
        merged._buffers = OrderedDict(t._buffers)
        merged._modules = OrderedDict(t._modules)
        if hasattr(t, "_prompt_cache"):
            merged._prompt_cache = OrderedDict(t._prompt_cache)
        merged._modules[self.module_attr] = den
        merged.name = f"{getattr(t, 'name', 'teacher')}+{self.adapter_name}(merged)"
        return merged

    # ------------------------------------------------------------------ the teacher protocol, by delegation
    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{getattr(self.teacher, 'name', 'teacher')}+{self.adapter_name}"

    def encode_prompt(self, texts: str | Sequence[str], negative: str | Sequence[str] | None = None):
        return self.teacher.encode_prompt(texts, negative)

    def clear_prompt_cache(self) -> None:
        self.teacher.clear_prompt_cache()

    def _embed_texts(self, texts: list[str]) -> Tensor:
        return self.teacher._embed_texts(texts)

    def encode(self, video: Tensor) -> Tensor:
        return self.teacher.encode(video)

    def decode(self, latents: Tensor) -> Tensor:
        return self.teacher.decode(latents)

    def latent_frames(self, num_frames: int | None = None) -> int:
        return self.teacher.latent_frames(num_frames)

    def latent_shape(self, num_frames: int | None = None, size: int | tuple[int, int] | None = None) -> tuple[int, ...]:
        return self.teacher.latent_shape(num_frames, size)

    def latent_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        return self.teacher.latent_size(image_size)

    def noise(self, batch: int, num_frames: int | None = None, size: int | tuple[int, int] | None = None,
              seed: int = 0) -> Tensor:
        return self.teacher.noise(batch, num_frames, size, seed=seed)

    def _forward(self, x_t: Tensor, t: Tensor, embeds: Tensor, camera: Tensor | None = None,
                 extra: dict[str, Tensor] | None = None) -> Tensor:
        with self._student_call():
            return self.teacher._forward(x_t, t, embeds, camera, extra)

    def predict_branches(self, x_t: Tensor, t: Tensor | int, cond, output: str = "epsilon",
                         camera: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        with self._student_call():
            return self.teacher.predict_branches(x_t, t, cond, output, camera, **kwargs)

    def predict(self, x_t: Tensor, t: Tensor | int, cond, guidance_scale: float = 1.0, output: str = "epsilon",
                camera: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The teacher's :meth:`~studio.teachers.base.ImageTeacher.predict` with the adapter on."""
        with self._student_call():
            return self.teacher.predict(x_t, t, cond, guidance_scale, output, camera, **kwargs)

    def forward(self, x_t: Tensor, t: Tensor | int, cond, guidance_scale: float = 1.0, output: str = "epsilon",
                camera: Tensor | None = None) -> Tensor:
        return self.predict(x_t, t, cond, guidance_scale, output, camera)

    def __getattr__(self, name: str) -> Any:
        """Anything else reads through to the teacher; its methods run with the adapter on (e.g. a causal
        teacher's ``forward_block``, ``frame_timesteps``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        teacher = self.__dict__.get("_modules", {}).get("teacher")
        if teacher is None or name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(teacher, name)
        if callable(attr) and getattr(attr, "__self__", None) is teacher:
            def call(*args: Any, **kwargs: Any) -> Any:
                with self._student_call():
                    return attr(*args, **kwargs)
            call.__name__ = getattr(attr, "__name__", name)
            call.__doc__ = getattr(attr, "__doc__", None)
            return call
        return attr

    def extra_repr(self) -> str:
        return (f"teacher={getattr(self.teacher, 'name', '')!r}, rank={self.rank}, alpha={self.alpha}, "
                f"dropout={self.dropout}, targets={len(self.target_names)} modules, "
                f"trainable={sum(p.numel() for p in self._lora_params.values())} parameters")
