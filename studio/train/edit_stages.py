"""DreamSteerer's two per-image stages as :class:`~studio.train.loop.Trainer` stages (spec dreamsteerer.md 8.1).

* :class:`SteerStage` (Stage 1): EDSD on a fresh steering LoRA added on top of the personalised model, plus the
  mode-shifting DreamBooth loss on spatial-feature-guided samples; optionally refreshes the "slightly edited"
  latent with a no-grad DDS-S(M) step of the same evaluation (``refresh_edit``).
* :class:`DDSEditStage` (Stage 2): DDS / DDS-S / DDS-SM on the latent itself with DDS's official optimiser
  (plain SGD, lr 0.1 on ``2000 / (h w) * sum(z * sg[G])``).

Both are pure wiring of :mod:`studio.distill.edsd` / :mod:`studio.distill.dds`; the loop is the one Trainer.
Reconstructed choices [S], each a constructor argument: the steering parameters are a new LoRA (rank 4 on
``to_q/to_k/to_v/to_out.0``, B = 0 so the steered model starts as the personalised one) for every baseline
(spec 5.1's studio default, one code path); AdamW lr 1e-4; ``t`` uniform in [50, 949) for EDSD and [0, 1000) for
the mode-shift loss; one guided sample per step, cycled.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..distill.dds import dds, dds_step_size, sample_dds_timesteps
from ..distill.edsd import edsd, mode_shift_loss, steering_loss
from ..students.lora_score import LORA_TARGETS, add_lora_adapter
from ..teachers.diffusers_sd import peft_adapter_names
from .loop import StepOutput

STEER_ADAPTER = "steer"


class SteerStage:
    """Stage 1 of DreamSteerer on ``teacher`` (personalised, in place): see the module doc.

    ``source_teacher``: the pretrained model (a :class:`~studio.train.personalize.PretrainedView`);
    ``guided``: ``[K,C,h,w]`` guided samples (None or ``lambda_ms = 0``: no mode shifting, the ablation);
    ``mask``: the DDS-SM mask used by the refresh step (and by the EDSD residual when ``mask_residual``).
    """

    def __init__(self, teacher: Any, source_teacher: Any, source_latents: Tensor, cond: Any, source_cond: Any, *,
                 steps: int = 100, lr: float = 1e-4, rank: int = 4, lambda_ms: float = 1.0,
                 guided: Tensor | None = None, guidance_scale: float = 7.5, jacobian: str = "minus_identity",
                 jacobian_at: str = "edited", refresh_edit: bool = True, eta: float | None = None,
                 mask: Tensor | None = None, mask_residual: bool = False, seed: int = 0,
                 t_range: tuple[int, int] = (50, 949), name: str = "steer") -> None:
        self.name, self.steps = name, int(steps)
        self.teacher, self.source_teacher = teacher, source_teacher
        self.z_src = source_latents.detach()
        self.z = self.z_src.clone()
        self.cond, self.source_cond = cond, source_cond
        self.lambda_ms = float(lambda_ms) if guided is not None else 0.0
        self.guided = guided.detach() if guided is not None else None
        self.guidance_scale, self.jacobian, self.jacobian_at = float(guidance_scale), jacobian, jacobian_at
        self.refresh_edit, self.mask, self.mask_residual = bool(refresh_edit), mask, bool(mask_residual)
        self.eta = float(eta) if eta is not None else dds_step_size(*self.z_src.shape[-2:])
        self.t_range = (int(t_range[0]), int(t_range[1]))
        unet = teacher.unet
        if STEER_ADAPTER in peft_adapter_names(unet):
            raise ValueError(f"the teacher already has a {STEER_ADAPTER!r} LoRA; remove it first (remove())")
        scales = dict(getattr(teacher, "_lora_scales", {}) or {})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            add_lora_adapter(unet, rank=int(rank), adapter_name=STEER_ADAPTER, target_modules=LORA_TARGETS,
                             scales=scales, seed=int(seed))
        if isinstance(getattr(teacher, "_lora_scales", None), dict):
            teacher._lora_scales[STEER_ADAPTER] = 1.0
        tag = f".{STEER_ADAPTER}."
        self._params: dict[str, torch.nn.Parameter] = {}
        for n, p in unet.named_parameters():
            train = f"lora_A{tag}" in n or f"lora_B{tag}" in n
            p.requires_grad_(train)
            if train:
                p.data = p.data.to(torch.float32)
                self._params[n] = p
        self.generator = torch.Generator().manual_seed(int(seed))
        self.optimizer = torch.optim.AdamW(list(self._params.values()), lr=float(lr))
        self._k = 0

    @property
    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self._params)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"steer": self.optimizer}

    def train_step(self, step: int, progress: float) -> StepOutput:
        g = self.generator
        t = sample_dds_timesteps(self.z.shape[0], *self.t_range, generator=g).to(self.z.device)
        noise = torch.randn(self.z.shape, generator=g, dtype=self.z.dtype).to(self.z.device)
        out = edsd(self.teacher, self.source_teacher, self.z, self.z_src, self.cond, self.source_cond, t,
                   guidance_scale=self.guidance_scale, jacobian=self.jacobian, jacobian_at=self.jacobian_at,
                   mask=self.mask if self.mask_residual else None, noise=noise)
        if self.refresh_edit:  # the "slightly edited" latent: one no-grad DDS-S(M) step of the same evaluation
            d = out.direction if self.mask is None else self.mask.to(out.direction) * out.direction
            self.z = (self.z - self.eta * d).detach()
        logs = dict(out.logs)
        ms = None
        if self.lambda_ms > 0 and self.guided is not None:
            xg = self.guided[self._k % self.guided.shape[0]][None].to(self.z)
            self._k += 1
            T = int(self.teacher.schedule.num_train_timesteps)
            t2 = torch.randint(0, T, (1,), generator=g).to(self.z.device)
            n2 = torch.randn(xg.shape, generator=g, dtype=xg.dtype).to(xg.device)
            ms = mode_shift_loss(self.teacher, xg, self.cond, t2, n2)
            logs["mode_shift_loss"] = float(ms.detach())
        return StepOutput(loss=steering_loss(out.loss, ms, self.lambda_ms), logs=logs)

    def after_step(self, step: int, out: Any) -> None:
        pass

    def state_dict(self) -> dict:
        return {"lora": {n: p.detach().clone() for n, p in self._params.items()}, "z": self.z.clone(),
                "generator": self.generator.get_state(), "k": self._k}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for n, v in state["lora"].items():
                self._params[n].copy_(v.to(self._params[n]))
        self.z = state["z"].to(self.z)
        self.generator.set_state(state["generator"].to(torch.uint8))
        self._k = int(state["k"])

    def preview(self) -> Tensor | None:
        return None

    def finish(self) -> None:
        """Freeze the teacher (the steering LoRA stays active at scale 1)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher.freeze()

    def remove(self) -> None:
        """Delete the steering LoRA (back to the personalised model)."""
        if STEER_ADAPTER in getattr(self.teacher, "_lora_scales", {}) and hasattr(self.teacher, "unload_lora"):
            self.teacher.unload_lora(STEER_ADAPTER)
        elif STEER_ADAPTER in peft_adapter_names(self.teacher.unet):
            self.teacher.unet.delete_adapters(STEER_ADAPTER)


class DDSEditStage:
    """Stage 2: DDS(-S)(-M) editing of the latent ``z`` (initialised at ``z_src``) with DDS's official SGD.

    ``source_teacher`` None = naive personalised DDS (the personalised model in both branches); the pretrained
    view = DDS-S. ``mask`` ``[1,1,h,w]`` = DDS-SM. ``lr`` 0.1 and ``loss_scale`` 2000 are DDS's (the step is
    ``lr * loss_scale / (h w) * G``).
    """

    def __init__(self, teacher: Any, source_latents: Tensor, cond: Any, source_cond: Any, *,
                 source_teacher: Any = None, mask: Tensor | None = None, steps: int = 200,
                 guidance_scale: float = 7.5, lr: float = 0.1, loss_scale: float = 2000.0, seed: int = 0,
                 t_range: tuple[int, int] = (50, 949), name: str = "edit") -> None:
        self.name, self.steps = name, int(steps)
        self.teacher, self.source_teacher = teacher, source_teacher
        self.z_src = source_latents.detach()
        self.z = torch.nn.Parameter(self.z_src.clone().float())
        self.cond, self.source_cond, self.mask = cond, source_cond, mask
        self.guidance_scale = float(guidance_scale)
        self.scale = float(loss_scale) / float(self.z_src.shape[-2] * self.z_src.shape[-1])
        self.t_range = (int(t_range[0]), int(t_range[1]))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.optimizer = torch.optim.SGD([self.z], lr=float(lr))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"latent": self.optimizer}

    def train_step(self, step: int, progress: float) -> StepOutput:
        g = self.generator
        t = sample_dds_timesteps(self.z.shape[0], *self.t_range, generator=g).to(self.z.device)
        noise = torch.randn(self.z.shape, generator=g, dtype=self.z.dtype).to(self.z.device)
        out = dds(self.teacher, self.z, self.z_src, self.cond, self.source_cond, t,
                  guidance_scale=self.guidance_scale, source_teacher=self.source_teacher, mask=self.mask,
                  scale=self.scale, noise=noise)
        return StepOutput(loss=out.loss, logs=dict(out.logs))

    def after_step(self, step: int, out: Any) -> None:
        pass

    def state_dict(self) -> dict:
        return {"z": self.z.detach().clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.z.copy_(state["z"].to(self.z))
        self.generator.set_state(state["generator"].to(torch.uint8))

    def preview(self) -> Tensor | None:
        return None

    def latents(self) -> Tensor:
        return self.z.detach()
