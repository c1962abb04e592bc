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
from .personalize import train_only_adapter

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
        self._params = train_only_adapter(teacher, STEER_ADAPTER)
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


# ------------------------------------------------------------------- 3D: DDS(-SM) through the Gaussian renderer
def _activated(model: Any) -> dict[str, Tensor]:
    return {"means": model.means, "quats": model.quats, "scales": model.scales, "opacities": model.opacities,
            "colors": model.colors}


@torch.no_grad()
def lift_mask_to_gaussians(model: Any, cameras: Any, masks: Tensor, *, backend: str = "torch",
                           eps: float = 1e-6) -> Tensor:
    """The 2D subject masks ``[C,1,H,W]`` (one per camera, in [0, 1]) lifted to the Gaussians: ``[N]`` in [0, 1],
    each Gaussian's blending weight inside the masks over its total blending weight across all ``cameras``
    (0 for a Gaussian no camera sees). The weights are the rasterizer's own: the gradient of the rendered mask
    (rendered with per-Gaussian features ``f = 1``) with respect to ``f``. Reconstructed choice [S]: a soft
    weight; threshold it (``> 0.5``) for a hard subject set."""
    from ..render.gaussians import rasterize_gaussians

    g = _activated(model)
    n = g["means"].shape[0]
    f = torch.ones(n, 1, dtype=g["means"].dtype, requires_grad=True)
    C, H, W = len(cameras), int(cameras.height), int(cameras.width)
    m = torch.nn.functional.interpolate(masks.float(), size=(H, W), mode="nearest").permute(0, 2, 3, 1)
    inside, total = torch.zeros(n), torch.zeros(n)
    with torch.enable_grad():
        for i in range(C):
            c = cameras[i:i + 1]
            img, _, _ = rasterize_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], f, c.viewmats,
                                            c.Ks, W, H, backgrounds=torch.zeros(1, 1), backend=backend)
            gi = torch.autograd.grad((img * m[i:i + 1]).sum(), f, retain_graph=True)[0]
            gt = torch.autograd.grad(img.sum(), f)[0]
            inside += gi[:, 0].detach()
            total += gt[:, 0].detach()
    return torch.where(total > eps, inside / total.clamp_min(eps), torch.zeros_like(total)).clamp(0, 1)


class GaussianDDSEditStage:
    """Stage 2 on a 3D Gaussian asset: multi-view DDS(-S)(-M) through the renderer (issue 21 part 6, not in
    the paper). Each step renders the edited Gaussians and the frozen source Gaussians from the same random orbit
    camera(s) (``sampler``, an :class:`~studio.cameras.OrbitSampler`; its ``exclude_azimuth`` keeps the held-out
    sector unseen), encodes both and applies :func:`~studio.distill.dds.dds` with the (steered) personalised
    ``teacher`` in the target branch and ``source_teacher`` (the pretrained model: DDS-S) in the source branch.

    Only ``params`` (default ``("sh0",)``: the base colour; ``"shN"`` for view-dependent colour) are optimised;
    positions, scales, rotations and opacities stay exactly as loaded. ``gaussian_mask [N]`` (the lifted subject
    mask) multiplies every colour gradient (gradient masking) and, rendered as a feature, gives each view's 2D
    DDS-SM mask. Reconstructed choices [S]: Adam (lr 0.02 on SH coefficients) instead of DDS's SGD on latents
    (one shared colour per Gaussian is seen by many views), one view per step, t in [50, 949).
    """

    def __init__(self, teacher: Any, model: Any, cond: Any, source_cond: Any, *, sampler: Any,
                 source_teacher: Any = None, gaussian_mask: Tensor | None = None, steps: int = 200,
                 lr: float = 0.02, guidance_scale: float = 7.5, params: tuple[str, ...] = ("sh0",),
                 views_per_step: int = 1, background=(1.0, 1.0, 1.0), backend: str = "torch", seed: int = 0,
                 t_range: tuple[int, int] = (50, 949), name: str = "edit3d") -> None:
        self.name, self.steps = name, int(steps)
        self.teacher, self.source_teacher, self.model, self.sampler = teacher, source_teacher, model, sampler
        self.cond, self.source_cond = cond, source_cond
        self.guidance_scale, self.views, self.backend = float(guidance_scale), int(views_per_step), backend
        self.t_range = (int(t_range[0]), int(t_range[1]))
        self.background = torch.tensor(background, dtype=torch.float32)
        bad = [p for p in params if p not in ("sh0", "shN")]
        if bad:
            raise ValueError(f"only colour parameters (sh0, shN) can be edited, got {bad}")
        self.source = {k: v.detach().clone() for k, v in _activated(model).items()}
        self.sh_degree = int(model.active_sh_degree)
        for n, p in model.params.items():
            p.requires_grad_(n in params)
        self.mask = None if gaussian_mask is None else gaussian_mask.detach().float()
        self._hooks = []
        if self.mask is not None:
            for n in params:
                self._hooks.append(model.params[n].register_hook(
                    lambda g, m=self.mask: g * m.to(g).reshape(-1, *([1] * (g.dim() - 1)))))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.optimizer = torch.optim.Adam([model.params[n] for n in params], lr=float(lr), eps=1e-15)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"colors": self.optimizer}

    def _render(self, g: dict, cams, colors=None, sh_degree=None, bg=None):
        from ..render.gaussians import rasterize_gaussians

        C = len(cams)
        bgs = (self.background if bg is None else bg).expand(C, -1).contiguous()
        img, alpha, _ = rasterize_gaussians(g["means"], g["quats"], g["scales"], g["opacities"],
                                            g["colors"] if colors is None else colors, cams.viewmats, cams.Ks,
                                            cams.width, cams.height, sh_degree=sh_degree, backgrounds=bgs,
                                            backend=self.backend)
        return img.permute(0, 3, 1, 2), alpha

    def train_step(self, step: int, progress: float) -> StepOutput:
        g = self.generator
        cams = self.sampler.sample(self.views, generator=g).cameras
        x, _ = self._render(_activated(self.model), cams, sh_degree=self.sh_degree)
        z = self.teacher.encode(x.clamp(0, 1))
        with torch.no_grad():
            xs, _ = self._render(self.source, cams, sh_degree=self.sh_degree)
            z_src = self.teacher.encode(xs.clamp(0, 1))
            m2 = None
            if self.mask is not None:
                m2, _ = self._render(self.source, cams, colors=self.mask[:, None], bg=torch.zeros(1))
                m2 = torch.nn.functional.interpolate(m2, size=z.shape[-2:], mode="bilinear", align_corners=False)
        t = sample_dds_timesteps(z.shape[0], *self.t_range, generator=g)
        noise = torch.randn(z.shape, generator=g, dtype=z.dtype)
        out = dds(self.teacher, z, z_src, self.cond, self.source_cond, t, guidance_scale=self.guidance_scale,
                  source_teacher=self.source_teacher, mask=m2, noise=noise)
        return StepOutput(loss=out.loss, logs=dict(out.logs))

    def after_step(self, step: int, out: Any) -> None:
        pass

    def state_dict(self) -> dict:
        return {"params": {n: p.detach().clone() for n, p in self.model.params.items() if p.requires_grad},
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for n, v in state["params"].items():
                self.model.params[n].copy_(v)
        self.generator.set_state(state["generator"].to(torch.uint8))

    def preview(self) -> Tensor | None:
        return None

    def finish(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.model.params.values():
            p.requires_grad_(False)
