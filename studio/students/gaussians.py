"""``GaussianModel``: trainable 3D Gaussians, and ``DefaultStrategy``: adaptive density control on any device.

Parameters follow gsplat's conventions (so gsplat's own strategies and trainers accept them)::

    params["means"]      [N, 3]        world positions
    params["scales"]     [N, 3]        log-scales            (activated: exp)
    params["quats"]      [N, 4]        w-x-y-z, unnormalised (activated: normalised)
    params["opacities"]  [N]           logits                (activated: sigmoid)
    params["sh0"]        [N, 1, 3]     degree-0 SH coefficients
    params["shN"]        [N, K-1, 3]   higher-order SH, K = (sh_degree + 1)^2
    params["features"]   [N, F]        optional free features (latent / feature rendering)

``params`` is a ``torch.nn.ParameterDict``; ``make_optimizers`` returns one Adam per key (gsplat's dict of
optimizers), and ``DefaultStrategy`` edits ``params`` and the optimizers' states in place, so the same
loop runs with ``gsplat.DefaultStrategy`` on a GPU::

    model = GaussianModel.random_in_sphere(10_000, radius=1.0, seed=0)
    optimizers = model.make_optimizers()
    strategy = DefaultStrategy()          # or gsplat.DefaultStrategy(...)
    strategy.check_sanity(model.params, optimizers)
    state = strategy.initialize_state(scene_scale=1.0)
    for step in range(steps):
        model.step_sh_degree(step)
        img, alpha, info = model.render(viewmats, Ks, W, H)
        strategy.step_pre_backward(model.params, optimizers, state, step, info)
        loss(img).backward()
        strategy.step_post_backward(model.params, optimizers, state, step, info)
        for opt in optimizers.values():
            opt.step(); opt.zero_grad(set_to_none=True)
"""
from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from studio.io.atomic import atomic_write_bytes, atomic_write_text
from studio.render import rasterize_gaussians
from studio.render.gaussians import SH_C0, num_sh_bases, quat_to_rotmat

__all__ = [
    "GaussianModel",
    "DefaultStrategy",
    "default_learning_rates",
    "make_schedulers",
    "knn_mean_distance",
    "rgb_to_sh",
    "sh_to_rgb",
    "update_params_and_optimizers",
    "duplicate",
    "split",
    "remove",
    "reset_opacity",
]

CHECKPOINT_FORMAT = "studio.gaussians"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")


# ----------------------------------------------------------------------------------------------- helpers

def rgb_to_sh(rgb: Tensor) -> Tensor:
    """Colour in [0,1] -> degree-0 SH coefficient (inverse of gsplat's ``SH(dir) + 0.5``)."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh0: Tensor) -> Tensor:
    """Degree-0 SH coefficient -> colour (unclamped)."""
    return sh0 * SH_C0 + 0.5


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))


def knn_mean_distance(points: Tensor, k: int = 3, *, max_block: int = 1 << 24) -> Tensor:
    """Mean Euclidean distance from each point to its ``k`` nearest *other* points: ``[N]``.

    Chunked ``torch.cdist`` keeps memory at ``max_block`` distances per chunk. With fewer than ``k + 1``
    points the available neighbours are used; a single point gets distance 0.
    """
    n = points.shape[0]
    if n <= 1:
        return torch.zeros(n, dtype=points.dtype, device=points.device)
    kk = min(k, n - 1)
    pts = points.detach()
    rows = max(1, max_block // n)
    out = []
    for start in range(0, n, rows):
        d = torch.cdist(pts[start:start + rows], pts)
        # the smallest distance of each row is the point itself (0); drop it
        nearest = torch.topk(d, kk + 1, dim=1, largest=False).values[:, 1:]
        out.append(nearest.mean(dim=1))
    return torch.cat(out)


def default_learning_rates(scene_scale: float = 1.0) -> dict[str, float]:
    """Per-group Adam learning rates of the 3DGS paper (means scale with the scene extent)."""
    sh0 = 2.5e-3
    return {
        "means": 1.6e-4 * scene_scale,
        "scales": 5e-3,
        "quats": 1e-3,
        "opacities": 5e-2,
        "sh0": sh0,
        "shN": sh0 / 20.0,
        "features": sh0,
    }


def make_schedulers(optimizers: Mapping[str, torch.optim.Optimizer], max_steps: int, *,
                    final_ratio: float = 0.01, names: tuple[str, ...] = ("means",)) -> dict[str, Any]:
    """Exponential learning-rate decay to ``final_ratio`` of the initial rate over ``max_steps``
    (3DGS decays the means' rate 1.6e-4 -> 1.6e-6). Call ``scheduler.step()`` once per step."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not 0 < final_ratio <= 1:
        raise ValueError(f"final_ratio must be in (0, 1], got {final_ratio}")
    gamma = final_ratio ** (1.0 / max_steps)
    return {n: torch.optim.lr_scheduler.ExponentialLR(optimizers[n], gamma=gamma) for n in names if n in optimizers}


# ------------------------------------------------------- editing parameters together with optimizer state

ParamFn = Callable[[str, Tensor], Tensor]
StateFn = Callable[[str, Tensor], Tensor]


@torch.no_grad()
def update_params_and_optimizers(
    params: Mapping[str, Tensor] | nn.ParameterDict,
    optimizers: Mapping[str, torch.optim.Optimizer],
    param_fn: ParamFn,
    state_fn: StateFn,
    names: list[str] | tuple[str, ...] | None = None,
) -> None:
    """Replace ``params[name]`` by ``param_fn(name, old)`` and edit its optimizer state consistently.

    For every optimizer state tensor with the parameter's shape (Adam's ``exp_avg`` / ``exp_avg_sq``)
    the new value is ``state_fn(key, old_state)``; scalars such as Adam's ``step`` are kept. The new
    tensor is wrapped in a fresh ``nn.Parameter`` (same ``requires_grad``) and swapped into the
    optimizer's param group, so the optimizer keeps its hyper-parameters and schedulers keep working.
    This is the one primitive behind duplicate / split / remove / opacity reset.
    """
    for name in list(params.keys()) if names is None else names:
        old = params[name]
        new = nn.Parameter(param_fn(name, old.detach()), requires_grad=old.requires_grad)
        opt = optimizers.get(name) if optimizers is not None else None
        if opt is not None:
            found = False
            for group in opt.param_groups:
                for i, p in enumerate(group["params"]):
                    if p is old:
                        found = True
                        st = opt.state.pop(p, None)
                        if st:
                            opt.state[new] = {
                                k: (state_fn(k, v) if isinstance(v, Tensor) and v.shape == old.shape else v)
                                for k, v in st.items()
                            }
                        group["params"][i] = new
            if not found:
                raise ValueError(f"optimizers[{name!r}] does not hold params[{name!r}]; build the optimizers from "
                                 "these params (GaussianModel.make_optimizers) after any manual replacement")
        params[name] = new


def _repeat_rows(x: Tensor, times: int) -> Tensor:
    return x.repeat((times,) + (1,) * (x.dim() - 1))


def _edit_strategy_state(state: dict[str, Any] | None, fn: Callable[[Tensor], Tensor], n_old: int) -> None:
    if state is None:
        return
    for key, v in list(state.items()):
        if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n_old:
            state[key] = fn(v)


@torch.no_grad()
def duplicate(params, optimizers, state: dict[str, Any] | None, mask: Tensor) -> int:
    """Append a copy of every Gaussian in ``mask`` (new optimizer moments are zero). Returns the count."""
    sel = mask.nonzero(as_tuple=True)[0]
    m = int(sel.numel())
    if m == 0:
        return 0
    n_old = params["means"].shape[0]
    update_params_and_optimizers(
        params, optimizers,
        lambda name, p: torch.cat([p, p[sel]]),
        lambda key, v: torch.cat([v, v.new_zeros((m,) + v.shape[1:])]),
    )
    _edit_strategy_state(state, lambda v: torch.cat([v, v[sel]]), n_old)
    return m


@torch.no_grad()
def split(params, optimizers, state: dict[str, Any] | None, mask: Tensor, *, generator: torch.Generator | None = None,
          scale_factor: float = 1.6, revised_opacity: bool = False) -> int:
    """Replace every Gaussian in ``mask`` by two samples drawn from it, with scales divided by
    ``scale_factor`` (the 3DGS split). ``revised_opacity`` keeps the pair's combined opacity
    (``1 - sqrt(1 - o)``, Bulò et al. 2024). Returns the number of Gaussians split."""
    sel = mask.nonzero(as_tuple=True)[0]
    m = int(sel.numel())
    if m == 0:
        return 0
    rest = (~mask).nonzero(as_tuple=True)[0]
    n_old = params["means"].shape[0]
    means = params["means"]
    scales = torch.exp(params["scales"][sel])
    rot = quat_to_rotmat(params["quats"][sel])  # normalises internally
    noise = torch.randn((2, m, 3), generator=generator, dtype=torch.float32).to(means.device, means.dtype)
    offsets = torch.einsum("nij,bnj->bni", rot, scales[None] * noise)  # [2, m, 3]
    new_means = (means[sel][None] + offsets).reshape(2 * m, 3)
    new_scales = _repeat_rows(torch.log(scales / scale_factor), 2)

    def param_fn(name: str, p: Tensor) -> Tensor:
        if name == "means":
            new = new_means
        elif name == "scales":
            new = new_scales
        elif name == "opacities" and revised_opacity:
            o = torch.sigmoid(p[sel])
            new = _repeat_rows(torch.logit((1.0 - torch.sqrt((1.0 - o).clamp_min(0))).clamp(1e-6, 1 - 1e-6)), 2)
        else:
            new = _repeat_rows(p[sel], 2)
        return torch.cat([p[rest], new.to(p.dtype)])

    update_params_and_optimizers(
        params, optimizers, param_fn,
        lambda key, v: torch.cat([v[rest], v.new_zeros((2 * m,) + v.shape[1:])]),
    )
    _edit_strategy_state(state, lambda v: torch.cat([v[rest], _repeat_rows(v[sel], 2)]), n_old)
    return m


@torch.no_grad()
def remove(params, optimizers, state: dict[str, Any] | None, mask: Tensor) -> int:
    """Delete every Gaussian in ``mask`` (and its optimizer moments). Returns the count."""
    m = int(mask.sum())
    if m == 0:
        return 0
    keep = (~mask).nonzero(as_tuple=True)[0]
    n_old = params["means"].shape[0]
    update_params_and_optimizers(params, optimizers, lambda name, p: p[keep], lambda key, v: v[keep])
    _edit_strategy_state(state, lambda v: v[keep], n_old)
    return m


@torch.no_grad()
def reset_opacity(params, optimizers, value: float) -> None:
    """Clamp every opacity to at most ``value`` (in (0,1)) and zero the opacities' optimizer moments."""
    cap = _logit(min(max(value, 1e-6), 1 - 1e-6))
    update_params_and_optimizers(
        params, optimizers, lambda name, p: torch.clamp_max(p, cap), lambda key, v: torch.zeros_like(v),
        names=["opacities"],
    )


# ------------------------------------------------------------------------------------------ the strategy

@dataclass
class DefaultStrategy:
    """Adaptive density control of 3DGS (clone / split / prune / opacity reset), in plain torch.

    Same interface as ``gsplat.strategy.DefaultStrategy`` (``check_sanity``, ``initialize_state``,
    ``step_pre_backward``, ``step_post_backward``) and the same meaning of the thresholds, so either can
    drive a ``GaussianModel``; this one runs on CPU as well as GPU.

    Screen-space gradients ``d loss / d means2d`` are scaled to NDC-like units (``* [W/2, H/2]``) and by
    the number of cameras, and their norms averaged over the steps in which a Gaussian was visible.
    Every ``refine_every`` steps in ``(refine_start_iter, refine_stop_iter)``, Gaussians whose average
    exceeds ``grow_grad2d`` are duplicated when their largest scale is ``<= grow_scale3d * scene_scale``
    and split otherwise; Gaussians with opacity ``< prune_opa`` are pruned, and after the first opacity
    reset also those larger than ``prune_scale3d * scene_scale``. Every ``reset_every`` steps opacities
    are clamped to ``2 * prune_opa``. While ``step < refine_scale2d_stop_iter`` the largest screen
    radius (fraction of the image) also triggers splits (``> grow_scale2d``) and pruning
    (``> prune_scale2d``).
    """

    prune_opa: float = 0.005
    max_gaussians: int = 0
    """growth budget (0 = none): when duplicating / splitting every candidate would exceed it, only the
    candidates with the largest average gradient grow (a split adds one Gaussian, a copy one)"""
    grow_grad2d: float = 0.0002
    grow_scale3d: float = 0.01
    grow_scale2d: float = 0.05
    prune_scale3d: float = 0.1
    prune_scale2d: float = 0.15
    refine_scale2d_stop_iter: int = 0
    refine_start_iter: int = 500
    refine_stop_iter: int = 15_000
    reset_every: int = 3000
    refine_every: int = 100
    pause_refine_after_reset: int = 0
    absgrad: bool = False
    revised_opacity: bool = False
    split_scale_factor: float = 1.6
    key_for_gradient: str = "means2d"
    seed: int = 0
    verbose: bool = False

    # -- gsplat Strategy interface -------------------------------------------------------------------
    def check_sanity(self, params: Mapping[str, Tensor], optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        """Raise ``ValueError`` unless ``params`` and ``optimizers`` fit this strategy."""
        if set(params.keys()) != set(optimizers.keys()):
            raise ValueError(f"params and optimizers must have the same keys, got {sorted(params.keys())} and "
                             f"{sorted(optimizers.keys())}; use GaussianModel.make_optimizers()")
        for key in ("means", "scales", "quats", "opacities"):
            if key not in params:
                raise ValueError(f"params lacks {key!r}; DefaultStrategy needs means, scales, quats and opacities")
        n = params["means"].shape[0]
        for name, p in params.items():
            if p.dim() < 1 or p.shape[0] != n:
                raise ValueError(f"params[{name!r}] has shape {tuple(p.shape)}; every parameter needs N={n} rows")
            groups = [g for g in optimizers[name].param_groups if any(q is p for q in g["params"])]
            if not groups:
                raise ValueError(f"optimizers[{name!r}] does not hold params[{name!r}]")

    def initialize_state(self, scene_scale: float = 1.0) -> dict[str, Any]:
        """Fresh running state: gradient accumulators (created lazily with the right N and device)."""
        if not scene_scale > 0:
            raise ValueError(f"scene_scale must be > 0, got {scene_scale}")
        return {
            "grad2d": None,
            "count": None,
            "radii": None,
            "scene_scale": float(scene_scale),
            "generator": torch.Generator(device="cpu").manual_seed(int(self.seed)),
            "last_refine": None,
        }

    def step_pre_backward(self, params, optimizers, state: dict[str, Any], step: int, info: dict[str, Any]) -> None:
        """Ask autograd to keep ``info[key_for_gradient]``'s gradient (call before ``loss.backward()``)."""
        key = self.key_for_gradient
        if key not in info:
            raise ValueError(f"info has no {key!r}; pass the meta dict returned by the renderer")
        t = info[key]
        if not t.requires_grad:
            raise ValueError(f"info[{key!r}] does not require grad; render with gradients enabled")
        t.retain_grad()

    def step_post_backward(self, params, optimizers, state: dict[str, Any], step: int, info: dict[str, Any],
                           packed: bool = False) -> None:
        """Accumulate statistics, then grow / prune / reset on schedule (call after ``loss.backward()``)."""
        if step >= self.refine_stop_iter:
            return
        self._update_state(params, state, info, packed=packed)
        if (step > self.refine_start_iter and step % self.refine_every == 0
                and step % self.reset_every >= self.pause_refine_after_reset):
            n_dupli, n_split = self._grow(params, optimizers, state, step)
            n_prune = self._prune(params, optimizers, state, step)
            n = params["means"].shape[0]
            state["last_refine"] = {"step": step, "duplicated": n_dupli, "split": n_split, "pruned": n_prune,
                                    "num_gaussians": n}
            if self.verbose:
                print(f"step {step}: {n_dupli} duplicated, {n_split} split, {n_prune} pruned, now {n} Gaussians")
            for k in ("grad2d", "count", "radii"):
                if state[k] is not None:
                    state[k].zero_()
        if step % self.reset_every == 0 and step > 0:
            reset_opacity(params, optimizers, value=2.0 * self.prune_opa)

    # -- internals -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_state(self, params, state: dict[str, Any], info: dict[str, Any], packed: bool) -> None:
        key = self.key_for_gradient
        t = info[key]
        grads = getattr(t, "absgrad", None) if self.absgrad else t.grad
        if grads is None:
            raise ValueError(f"info[{key!r}] has no gradient; call step_pre_backward before loss.backward()"
                             + (" and render with absgrad=True" if self.absgrad else ""))
        grads = grads.detach().clone()
        width, height, n_cams = info["width"], info["height"], info["n_cameras"]
        grads[..., 0] *= width / 2.0 * n_cams
        grads[..., 1] *= height / 2.0 * n_cams

        n = params["means"].shape[0]
        device = grads.device
        if state["grad2d"] is None or state["grad2d"].shape[0] != n:
            state["grad2d"] = torch.zeros(n, device=device, dtype=torch.float32)
            state["count"] = torch.zeros(n, device=device, dtype=torch.float32)
        if self.refine_scale2d_stop_iter > 0 and (state["radii"] is None or state["radii"].shape[0] != n):
            state["radii"] = torch.zeros(n, device=device, dtype=torch.float32)

        radii = info["radii"]
        visible = (radii > 0).all(dim=-1) if radii.dim() == grads.dim() else radii > 0
        if packed:
            gs_ids = info["gaussian_ids"][visible]
        else:
            gs_ids = visible.nonzero(as_tuple=True)[-1]  # [C,N] mask -> Gaussian index
        norms = grads[visible].norm(dim=-1).float()
        state["grad2d"].index_add_(0, gs_ids, norms)
        state["count"].index_add_(0, gs_ids, torch.ones_like(norms))
        if state["radii"] is not None:
            r = radii[visible]
            r = (r.max(dim=-1).values if r.dim() == 2 else r).float() / float(max(width, height))
            state["radii"].scatter_reduce_(0, gs_ids, r, reduce="amax")

    @torch.no_grad()
    def _grow(self, params, optimizers, state: dict[str, Any], step: int) -> tuple[int, int]:
        if state["grad2d"] is None:
            return 0, 0
        avg = state["grad2d"] / state["count"].clamp_min(1.0)
        high = avg > self.grow_grad2d
        if self.max_gaussians > 0:
            room = max(self.max_gaussians - params["means"].shape[0], 0)
            if int(high.sum()) > room:
                keep = torch.zeros_like(high)
                if room > 0:
                    keep[torch.topk(torch.where(high, avg, torch.full_like(avg, -1.0)), room).indices] = True
                high = keep
        small = torch.exp(params["scales"]).max(dim=-1).values <= self.grow_scale3d * state["scene_scale"]
        dupli = high & small
        splt = high & ~small
        if step < self.refine_scale2d_stop_iter and state["radii"] is not None:
            splt |= state["radii"] > self.grow_scale2d
        n_dupli = duplicate(params, optimizers, state, dupli)
        splt = torch.cat([splt, splt.new_zeros(n_dupli)])  # the fresh copies are never split this round
        n_split = split(params, optimizers, state, splt, generator=state["generator"],
                        scale_factor=self.split_scale_factor, revised_opacity=self.revised_opacity)
        return n_dupli, n_split

    @torch.no_grad()
    def _prune(self, params, optimizers, state: dict[str, Any], step: int) -> int:
        prune = torch.sigmoid(params["opacities"]) < self.prune_opa
        if step > self.reset_every:
            too_big = torch.exp(params["scales"]).max(dim=-1).values > self.prune_scale3d * state["scene_scale"]
            if step < self.refine_scale2d_stop_iter and state["radii"] is not None:
                too_big |= state["radii"] > self.prune_scale2d
            prune |= too_big
        return remove(params, optimizers, state, prune)


# --------------------------------------------------------------------------------------------- the model

def _as_tensor(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to("cpu")
    return torch.as_tensor(np.asarray(x))


class GaussianModel(nn.Module):
    """Trainable 3D Gaussians with gsplat-layout raw parameters in ``self.params`` (see module doc).

    ``sh_degree`` is the maximum SH degree stored; ``active_sh_degree`` the degree rendered now (grown by
    ``step_sh_degree``). ``step`` and ``metadata`` travel with checkpoints.
    """

    def __init__(self, params: Mapping[str, Tensor], sh_degree: int | None = None, *, active_sh_degree: int = 0,
                 step: int = 0, metadata: dict[str, Any] | None = None):
        super().__init__()
        for key in REQUIRED_KEYS:
            if key not in params:
                raise ValueError(f"params lacks {key!r}; a GaussianModel needs {', '.join(REQUIRED_KEYS)}")
        n = params["means"].shape[0]
        k = params["shN"].shape[1] + 1 if params["shN"].dim() == 3 else -1
        degree = int(round(math.sqrt(k))) - 1 if k > 0 else -1
        if sh_degree is None:
            sh_degree = degree
        if not (isinstance(sh_degree, int) and 0 <= sh_degree <= 3):
            raise ValueError(f"sh_degree must be an int in 0..3, got {sh_degree!r}")
        K = num_sh_bases(sh_degree)
        shapes = {"means": (n, 3), "scales": (n, 3), "quats": (n, 4), "opacities": (n,), "sh0": (n, 1, 3),
                  "shN": (n, K - 1, 3)}
        for key, want in shapes.items():
            got = tuple(params[key].shape)
            if got != want:
                raise ValueError(f"params[{key!r}] must have shape {list(want)} (N={n}, sh_degree={sh_degree}), got {list(got)}")
        for key, p in params.items():
            if not isinstance(p, Tensor) or not p.is_floating_point():
                raise ValueError(f"params[{key!r}] must be a floating-point tensor")
            if p.dim() < 1 or p.shape[0] != n:
                raise ValueError(f"params[{key!r}] must have N={n} rows, got shape {list(p.shape)}")
        self.params = nn.ParameterDict(
            {k_: (p if isinstance(p, nn.Parameter) else nn.Parameter(p.detach().clone())) for k_, p in params.items()}
        )
        self.sh_degree = sh_degree
        if not 0 <= active_sh_degree <= sh_degree:
            raise ValueError(f"active_sh_degree must be in 0..{sh_degree}, got {active_sh_degree}")
        self.active_sh_degree = int(active_sh_degree)
        self.step = int(step)
        self.metadata: dict[str, Any] = dict(metadata or {})

    # -- activated views ---------------------------------------------------------------------------------
    @property
    def num_gaussians(self) -> int:
        return int(self.params["means"].shape[0])

    def __len__(self) -> int:
        return self.num_gaussians

    @property
    def device(self) -> torch.device:
        return self.params["means"].device

    @property
    def means(self) -> Tensor:
        return self.params["means"]

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.params["scales"])

    @property
    def quats(self) -> Tensor:
        q = self.params["quats"]
        return q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.params["opacities"])

    @property
    def colors(self) -> Tensor:
        """All SH coefficients stacked: ``[N, K, 3]``."""
        return torch.cat([self.params["sh0"], self.params["shN"]], dim=1)

    @property
    def features(self) -> Tensor | None:
        return self.params["features"] if "features" in self.params else None

    def step_sh_degree(self, step: int, every: int = 1000) -> int:
        """Schedule: one more SH degree every ``every`` steps, up to ``sh_degree``. Returns the active degree."""
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.active_sh_degree = min(self.sh_degree, max(0, int(step)) // every)
        return self.active_sh_degree

    # -- constructors --------------------------------------------------------------------------------------
    @classmethod
    def from_points(cls, xyz: Any, rgb: Any = None, *, sh_degree: int = 3, opacity: float = 0.1,
                    scale: float | None = None, scale_mult: float = 1.0, features_dim: int = 0,
                    features_std: float = 0.1, seed: int = 0, generator: torch.Generator | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> "GaussianModel":
        """Isotropic Gaussians at ``xyz [N,3]``.

        Scale: ``scale`` (linear, same for all) or, by default, the mean distance to the 3 nearest
        neighbours times ``scale_mult``. ``rgb [N,3]`` / ``[3]`` in [0,1] (uint8 accepted); ``None`` draws
        uniform random colours from the generator. Identity rotations, opacity ``opacity``, higher SH zero;
        ``features_dim > 0`` adds ``params["features"] ~ N(0, features_std)``.
        """
        g = _generator(seed, generator)
        xyz = _as_tensor(xyz).to(torch.float32)
        if xyz.dim() != 2 or xyz.shape[1] != 3:
            raise ValueError(f"xyz must have shape [N, 3], got {list(xyz.shape)}")
        if not bool(torch.isfinite(xyz).all()):
            raise ValueError("xyz contains NaN or Inf values")
        n = xyz.shape[0]
        if rgb is None:
            rgb_t = torch.rand((n, 3), generator=g)
        else:
            rgb_t = _as_tensor(rgb)
            rgb_t = rgb_t.float() / 255.0 if rgb_t.dtype == torch.uint8 else rgb_t.float()
            if rgb_t.shape == (3,):
                rgb_t = rgb_t.expand(n, 3)
            if tuple(rgb_t.shape) != (n, 3):
                raise ValueError(f"rgb must have shape [N, 3] or [3] with N={n}, got {list(rgb_t.shape)}")
        if not 0 < opacity < 1:
            raise ValueError(f"opacity must be in (0, 1), got {opacity}")
        if scale is not None:
            if not scale > 0:
                raise ValueError(f"scale must be > 0, got {scale}")
            s = torch.full((n,), float(scale))
        else:
            s = knn_mean_distance(xyz) * scale_mult
            fallback = float(s[s > 0].mean()) if bool((s > 0).any()) else 0.01
            s = torch.where(s > 0, s, torch.full_like(s, fallback))
        K = num_sh_bases(sh_degree) if 0 <= sh_degree <= 3 else -1
        if K < 0:
            raise ValueError(f"sh_degree must be in 0..3, got {sh_degree}")
        params = {
            "means": xyz.clone(),
            "scales": torch.log(s.clamp_min(1e-7))[:, None].repeat(1, 3),  # isotropic: same on all axes
            "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
            "opacities": torch.full((n,), _logit(opacity)),
            "sh0": rgb_to_sh(rgb_t.clone())[:, None, :],
            "shN": torch.zeros(n, K - 1, 3),
        }
        if features_dim > 0:
            params["features"] = torch.randn((n, features_dim), generator=g) * features_std
        params = {k: v.to(device=device or "cpu", dtype=dtype) for k, v in params.items()}
        return cls(params, sh_degree)

    @classmethod
    def random_in_sphere(cls, n: int, radius: float = 1.0, seed: int = 0, sh_degree: int = 3, *,
                         generator: torch.Generator | None = None, **kwargs) -> "GaussianModel":
        """``n`` Gaussians uniformly distributed in the ball of ``radius`` (random colours unless ``rgb``)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        g = _generator(seed, generator)
        d = torch.randn((n, 3), generator=g)
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        r = radius * torch.rand((n, 1), generator=g) ** (1.0 / 3.0)
        return cls.from_points(d * r, kwargs.pop("rgb", None), sh_degree=sh_degree, generator=g, **kwargs)

    @classmethod
    def from_mesh(cls, vertices: Any, faces: Any = None, n_points: int = 10_000, colors: Any = None, *,
                  scale: float | None = None, seed: int = 0, generator: torch.Generator | None = None,
                  **kwargs) -> "GaussianModel":
        """``n_points`` Gaussians sampled area-weighted on a triangle mesh, with **isotropic** scales.

        ``vertices [V,3]``, ``faces [F,3]`` (or a ``trimesh.Trimesh`` as ``vertices``). ``colors``: ``[3]``,
        per-vertex ``[V,3]`` (interpolated barycentrically; preferred when ``V == F``) or per-face
        ``[F,3]``, floats in [0,1] or uint8; ``None`` draws random colours. ``scale``: one linear scale
        for all; ``None`` uses the mean distance to the 3 nearest samples. Every Gaussian gets a single
        scalar scale on all three axes.
        """
        if faces is None and hasattr(vertices, "vertices") and hasattr(vertices, "faces"):
            vertices, faces = vertices.vertices, vertices.faces
        if faces is None:
            raise ValueError("from_mesh needs faces [F, 3] (or a trimesh.Trimesh as the first argument)")
        V = _as_tensor(vertices).to(torch.float64)
        Fc = _as_tensor(faces).to(torch.long)
        if V.dim() != 2 or V.shape[1] != 3:
            raise ValueError(f"vertices must have shape [V, 3], got {list(V.shape)}")
        if Fc.dim() != 2 or Fc.shape[1] != 3 or Fc.shape[0] == 0:
            raise ValueError(f"faces must have shape [F, 3] with F >= 1, got {list(Fc.shape)}")
        if int(Fc.min()) < 0 or int(Fc.max()) >= V.shape[0]:
            raise ValueError(f"faces index vertices out of range 0..{V.shape[0] - 1}")
        if n_points < 1:
            raise ValueError(f"n_points must be >= 1, got {n_points}")
        g = _generator(seed, generator)
        v0, v1, v2 = V[Fc[:, 0]], V[Fc[:, 1]], V[Fc[:, 2]]
        areas = 0.5 * torch.linalg.cross(v1 - v0, v2 - v0).norm(dim=-1)
        if not float(areas.sum()) > 0:
            raise ValueError("the mesh has zero surface area; cannot sample points on it")
        fi = torch.multinomial(areas, n_points, replacement=True, generator=g)
        uv = torch.rand((n_points, 2), generator=g, dtype=torch.float64)
        su = uv[:, :1].sqrt()
        b0, b1, b2 = 1.0 - su, su * (1.0 - uv[:, 1:]), su * uv[:, 1:]
        pts = b0 * v0[fi] + b1 * v1[fi] + b2 * v2[fi]
        rgb = None
        if colors is not None:
            c = _as_tensor(colors)
            c = c.double() / 255.0 if c.dtype == torch.uint8 else c.double()
            if c.shape == (3,):
                rgb = c.expand(n_points, 3)
            elif c.dim() == 2 and c.shape[1] >= 3 and c.shape[0] == V.shape[0]:
                c = c[:, :3]
                rgb = b0 * c[Fc[fi, 0]] + b1 * c[Fc[fi, 1]] + b2 * c[Fc[fi, 2]]
            elif c.dim() == 2 and c.shape[1] >= 3 and c.shape[0] == Fc.shape[0]:
                rgb = c[fi, :3]
            else:
                raise ValueError(f"colors must have shape [3], [V={V.shape[0]}, 3] or [F={Fc.shape[0]}, 3], "
                                 f"got {list(c.shape)}")
            rgb = rgb.float().clamp(0.0, 1.0)
        return cls.from_points(pts.float(), rgb, scale=scale, generator=g, **kwargs)

    # -- rendering & optimisation --------------------------------------------------------------------------
    def render(self, viewmats: Tensor, Ks: Tensor, width: int, height: int, *, colors: Tensor | None = None,
               use_features: bool = False, sh_degree: int | None = None, **kwargs):
        """Render with ``studio.render.rasterize_gaussians`` from the activated parameters.

        By default renders SH colours at ``active_sh_degree`` (override with ``sh_degree``);
        ``use_features=True`` renders ``params["features"]``; ``colors`` renders any ``[N,D]`` / ``[C,N,D]``
        tensor (or SH coefficients when ``sh_degree`` is given). Other keyword arguments (``backend``,
        ``backgrounds``, ``render_mode``...) pass through. Returns ``(colors, alphas, meta)``.
        """
        if colors is None and use_features:
            if self.features is None:
                raise ValueError("use_features=True but the model has no params['features']; "
                                 "build it with features_dim > 0")
            colors, sh = self.features, None
        elif colors is None:
            colors, sh = self.colors, (self.active_sh_degree if sh_degree is None else sh_degree)
        else:
            sh = sh_degree
        return rasterize_gaussians(self.means, self.quats, self.scales, self.opacities, colors, viewmats, Ks,
                                   width, height, sh_degree=sh, **kwargs)

    def make_optimizers(self, lrs: Mapping[str, float] | None = None, *, scene_scale: float = 1.0,
                        eps: float = 1e-15, betas: tuple[float, float] = (0.9, 0.999)) -> dict[str, torch.optim.Adam]:
        """One Adam per parameter group (gsplat's dict of optimizers) with 3DGS default learning rates
        (``default_learning_rates(scene_scale)``), overridden per key by ``lrs``. Extra per-Gaussian
        parameters without a default need an entry in ``lrs``."""
        defaults = default_learning_rates(scene_scale)
        lrs = dict(lrs or {})
        unknown = set(lrs) - set(self.params.keys())
        if unknown:
            raise ValueError(f"lrs has keys {sorted(unknown)} that are not parameters; known: {sorted(self.params.keys())}")
        out = {}
        for name, p in self.params.items():
            lr = lrs.get(name, defaults.get(name))
            if lr is None:
                raise ValueError(f"no default learning rate for params[{name!r}]; pass lrs={{{name!r}: ...}}")
            if not lr >= 0:
                raise ValueError(f"learning rate for {name!r} must be >= 0, got {lr}")
            out[name] = torch.optim.Adam([{"params": [p], "lr": float(lr), "name": name}], eps=eps, betas=betas)
        return out

    @staticmethod
    def make_schedulers(optimizers, max_steps: int, *, final_ratio: float = 0.01):
        """Exponential decay of the means' learning rate (see ``make_schedulers``)."""
        return make_schedulers(optimizers, max_steps, final_ratio=final_ratio)

    # -- checkpoints --------------------------------------------------------------------------------------
    @staticmethod
    def _ckpt_paths(path: str | os.PathLike) -> tuple[Path, Path]:
        p = Path(path)
        if p.suffix in (".safetensors", ".json"):
            p = p.with_suffix("")
        return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")

    def save(self, path: str | os.PathLike, *, step: int | None = None, metadata: dict[str, Any] | None = None,
             optimizers: Mapping[str, torch.optim.Optimizer] | None = None) -> tuple[Path, Path]:
        """Write ``<path>.safetensors`` (parameters, optional Adam state) and ``<path>.json`` (degrees,
        step, metadata), each atomically. The safetensors header carries the same JSON, so the tensor
        file alone is a complete checkpoint. Returns both paths."""
        from safetensors.torch import save as st_save

        if step is not None:
            self.step = int(step)
        if metadata is not None:
            self.metadata.update(metadata)
        tensors = {f"params/{k}": v.detach().to("cpu").contiguous() for k, v in self.params.items()}
        lrs = {}
        if optimizers is not None:
            for name, opt in optimizers.items():
                p = self.params[name] if name in self.params else None
                st = opt.state.get(p, {}) if p is not None else {}
                for key, v in st.items():
                    if isinstance(v, Tensor):
                        tensors[f"optim/{name}/{key}"] = v.detach().to("cpu").contiguous().clone()
                lrs[name] = [g["lr"] for g in opt.param_groups]
        info = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "save_id": uuid.uuid4().hex,
            "sh_degree": self.sh_degree,
            "active_sh_degree": self.active_sh_degree,
            "step": self.step,
            "num_gaussians": self.num_gaussians,
            "params": {k: list(v.shape) for k, v in self.params.items()},
            "optimizer_lrs": lrs,
            "metadata": self.metadata,
        }
        try:
            text = json.dumps(info, indent=2, sort_keys=True)
        except TypeError as exc:
            raise ValueError(f"checkpoint metadata must be JSON-serialisable: {exc}") from None
        st_path, js_path = self._ckpt_paths(path)
        atomic_write_bytes(st_path, st_save(tensors, metadata={"studio": text}))
        atomic_write_text(js_path, text + "\n")
        return st_path, js_path

    @staticmethod
    def _read_checkpoint(path) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
        from safetensors import safe_open

        st_path, js_path = GaussianModel._ckpt_paths(path)
        if not st_path.is_file():
            raise ValueError(f"could not load Gaussian checkpoint '{path}': {st_path} not found; "
                             "expected files written by GaussianModel.save")
        try:
            with safe_open(str(st_path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise ValueError(f"could not load Gaussian checkpoint '{st_path}': {exc}") from None
        if "studio" in header:
            info = json.loads(header["studio"])
        elif js_path.is_file():
            info = json.loads(js_path.read_text())
        else:
            info = {}
        return tensors, info, st_path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "GaussianModel":
        """Load a checkpoint written by ``save`` (safetensors only; nothing is unpickled)."""
        tensors, info, st_path = cls._read_checkpoint(path)
        params = {k[len("params/"):]: v.to(device) for k, v in tensors.items() if k.startswith("params/")}
        if not params:  # a bare safetensors of gsplat-named tensors
            params = {k: v.to(device) for k, v in tensors.items() if "/" not in k}
        try:
            return cls(params, info.get("sh_degree"), active_sh_degree=int(info.get("active_sh_degree", 0)),
                       step=int(info.get("step", 0)), metadata=info.get("metadata") or {})
        except ValueError as exc:
            raise ValueError(f"could not load Gaussian checkpoint '{st_path}': {exc}") from None

    def load_optimizer_state(self, path: str | os.PathLike, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        """Restore Adam moments / step counters and learning rates saved with ``save(..., optimizers=)``
        into optimizers built from this model (``make_optimizers``), to resume training exactly."""
        tensors, info, st_path = self._read_checkpoint(path)
        lrs = info.get("optimizer_lrs", {})
        for name, opt in optimizers.items():
            p = self.params[name]
            prefix = f"optim/{name}/"
            st = {k[len(prefix):]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)}
            for key, v in st.items():
                if v.dim() and v.shape != p.shape:
                    raise ValueError(f"optimizer state {prefix}{key} in '{st_path}' has shape {list(v.shape)}, "
                                     f"params[{name!r}] has {list(p.shape)}")
            if st:
                opt.state[p] = st
            for g, lr in zip(opt.param_groups, lrs.get(name, [])):
                g["lr"] = lr

    # -- exports --------------------------------------------------------------------------------------------
    def save_ply(self, path: str | os.PathLike) -> Path:
        """Standard 3DGS PLY (Inria layout) with all ``sh_degree`` coefficients."""
        from studio.io.ply import write_ply

        p = self.params
        return write_ply(path, p["means"], p["scales"], p["quats"], p["opacities"], self.colors)

    @classmethod
    def from_ply(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "GaussianModel":
        """Load a 3DGS PLY (any SH degree 0..3); the active degree is the file's degree."""
        from studio.io.ply import read_ply

        d = read_ply(path)
        params = {k: d[k].to(device) for k in ("means", "scales", "quats", "opacities", "sh0", "shN")}
        return cls(params, d["sh_degree"], active_sh_degree=d["sh_degree"], metadata={"source": str(path)})

    def save_splat(self, path: str | os.PathLike) -> Path:
        """antimatter15 ``.splat`` export (base colour only)."""
        from studio.io.splat import write_splat

        p = self.params
        return write_splat(path, p["means"], p["scales"], p["quats"], p["opacities"], p["sh0"])

    def extra_repr(self) -> str:
        return f"num_gaussians={self.num_gaussians}, sh_degree={self.sh_degree}, active_sh_degree={self.active_sh_degree}"
