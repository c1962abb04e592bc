"""Score-distillation stages on implicit fields (NeRF, NeuS) and the chaining of progressive stages.

DreamPolish-style pipelines (spec ``placiddreamer_dreampolish.md`` 3.3) train one representation after
another, each initialised from the previous one's result (NeRF -> NeuS -> DMTet -> polish -> texture).
The Trainer (``studio.train.loop``) builds every stage before the run and checkpoints all of them, so a
stage here is *chained*: it is constructed with a ``source`` (a callable returning the previous stage's
result: its in-memory model, or a model loaded from that stage's artefact file) and builds its own
student lazily, the first time the Trainer asks for its optimizers once the source is ready. Until then
it has no parameters and an empty state. When its last step is done it writes its artefact (``artefact``
path) so a later run can start from the next stage (``--from-stage``); the Trainer's checkpoint resumes
inside a stage (the state holds the student's config and weights, so ``load_state_dict`` rebuilds it).

Pieces:
    :class:`ChainedStage`     the lazy-build / artefact protocol above (subclasses: ``build``,
                              ``step_loss``, ``model_state`` / ``load_model_state``, ``save_artefact``).
    :class:`ScoreSettings`    camera orbit, timestep schedule and view prompts of an SDS-like stage
                              (``OrbitSampler``, ``TimestepSampler``, ``view_conditioned`` reused).
    :func:`score_images`      renders ``[B,3,H,W]`` -> teacher space -> a score loss (SDS by default, any
                              ``score_fn(ScoreContext)`` of ``studio.train.gaussian_stage``).
    :class:`FieldDistillStage` G1 (NeRF: SDS, Magic3D blob init, occupancy grid) and G2 (NeuS: SDS +
                              eikonal, initialised by ``neus_from_nerf``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import OrbitSampler, orbit_cameras
from ..distill.sds import sds
from ..distill.timesteps import TimestepSampler
from ..render.volume import OccupancyGrid, cos_anneal_ratio, render_field
from ..students.fields import (
    NeRFField,
    NeuSField,
    eikonal_loss,
    load_field,
    neus_from_nerf,
)
from ..teachers.prompts import view_conditioned
from .gaussian_stage import ScoreContext
from .loop import StepOutput

Source = Callable[[], Any]


@dataclass
class ScoreSettings:
    """Orbit cameras, timesteps and view prompts of a score-distillation stage (DreamCraft3D / threestudio
    conventions, small for a CPU: the paper-scale values are in ``methods/dreampolish.py``)."""

    batch_size: int = 2
    elevation_range: tuple[float, float] = (-10.0, 45.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    radius_range: tuple[float, float] = (3.0, 3.0)
    fovy_range: tuple[float, float] = (40.0, 40.0)
    t_min: float = 0.02
    t_max: float = 0.98
    t_max_end: float = 0.5
    t_schedule: str = "linear"
    view_prompt: str = "discrete"
    negative_prompt: str = ""
    camera_conditioning: bool = True
    background: float = 1.0


def score_images(teacher, images: Tensor, views, prompt: str, s: ScoreSettings, timesteps: TimestepSampler,
                 *, step: int, progress: float, guidance_scale: float, generator: torch.Generator,
                 alphas: Tensor | None = None, score_fn: Callable[[ScoreContext], Any] | None = None):
    """Score renders ``images [B,3,H,W]`` in [0,1] of orbit ``views`` (an ``OrbitSample``) with ``teacher``.

    The renders are resized to the teacher's native resolution (bilinear), encoded, scored at timesteps
    from ``timesteps`` with the view-dependent prompt; ``score_fn`` (default SDS with ``guidance_scale``)
    returns an object with ``loss`` (``d loss / d z = G``), ``grad`` and optional ``logs``."""
    size = teacher.native_resolution
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    latents = teacher.encode(images)
    cond = view_conditioned(teacher, prompt, views.azimuth, views.elevation, mode=s.view_prompt,
                            negative=s.negative_prompt or None)
    B = images.shape[0]
    t = timesteps.sample(B, progress, teacher.schedule, generator)
    camera = views.cameras.to_vector() if s.camera_conditioning else None
    ctx = ScoreContext(teacher, latents, images, alphas if alphas is not None else torch.ones_like(images[:, :1]),
                       cond, t, camera, views.cameras, guidance_scale, step, progress, generator)
    if score_fn is None:
        return sds(teacher, latents, cond, t, guidance_scale=guidance_scale, camera=camera, generator=generator)
    return score_fn(ctx)


class ChainedStage:
    """A stage of a progressive pipeline (module doc). Subclasses set ``kind`` and implement ``build(source
    result)``, ``step_loss(step, progress) -> (loss, logs)``, ``model_state()`` / ``load_model_state(state)``
    and ``save_artefact(path)``; ``params_optimizers()`` returns the optimizers once built."""

    kind = "stage"

    def __init__(self, name: str, steps: int, source: Source | None, *, artefact: str | Path | None = None,
                 seed: int = 0):
        self.name, self.steps = name, int(steps)
        self.source = source
        self.artefact = None if artefact is None else Path(artefact)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.built = False
        self.done = False
        self.result: Any = None
        self.seconds = 0.0
        self._t0: float | None = None
        self._optim: dict[str, torch.optim.Optimizer] = {}

    # -- lazy build ---------------------------------------------------------------------------------
    def source_ready(self) -> bool:
        src = self.source
        owner = getattr(src, "__self__", None)
        return owner is None or not isinstance(owner, ChainedStage) or owner.done

    def ensure_built(self) -> bool:
        if not self.built and self.source_ready():
            t0 = time.perf_counter()
            self.build(self.source() if self.source is not None else None)
            self.built = True
            # the build is part of the stage (NeRF -> NeuS fit, DMTet init, loading an artefact); it runs
            # whenever the Trainer first asks for the optimizers, outside train_step
            self.seconds += time.perf_counter() - t0
        return self.built

    def build(self, upstream: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def output(self) -> Any:
        """The stage's result for the next stage (the trained model); a bound method used as ``source``."""
        self.ensure_built()
        return self.result

    # -- Trainer protocol ---------------------------------------------------------------------------
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optim if self.ensure_built() else {}

    def train_step(self, step: int, progress: float) -> StepOutput:
        self.ensure_built()
        if self._t0 is None:  # first micro-batch of this step (or of a run of skipped non-finite steps)
            self._t0 = time.perf_counter()
        loss, logs = self.step_loss(step, progress)
        return StepOutput(loss, logs)

    def step_loss(self, step: int, progress: float) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError

    def after_step(self, step: int, out: StepOutput) -> None:
        # wall time of the step: every micro-batch's forward and backward and the optimizer step (the Trainer
        # calls after_step after them; steps it skipped as non-finite are counted with the next good one)
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None
        if step + 1 >= self.steps:
            self.finish()

    def finish(self) -> None:
        """Mark the stage done and write its artefact (also used when a stage has 0 steps)."""
        self.ensure_built()
        self.done = True
        if self.artefact is not None:
            self.artefact.parent.mkdir(parents=True, exist_ok=True)
            self.save_artefact(self.artefact)

    def state_dict(self) -> dict:
        if not self.built:
            return {"built": False}
        return {"built": True, "done": self.done, "model": self.model_state(), "seconds": self.seconds,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("built"):
            return
        self.load_model_state(state["model"])
        self.built = True
        self.done = bool(state.get("done", False))
        self.seconds = float(state.get("seconds", 0.0))
        self.generator.set_state(state["generator"])

    def model_state(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_model_state(self, state: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def save_artefact(self, path: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def preview(self, n: int = 4, size: int | None = None) -> Tensor | None:
        return None


@dataclass
class FieldStageConfig:
    """G1 / G2 settings (CPU defaults; see ``methods/dreampolish.py`` for the paper-scale ones)."""

    resolution: int = 32
    n_samples: int = 32
    lr_encoding: float = 0.01
    lr_mlp: float = 1e-3
    eikonal_weight: float = 0.1
    """NeuS only"""
    cos_anneal_steps: int = 0
    """NeuS only: threestudio's cosine anneal length in steps (0 = off)"""
    grid_resolution: int = 24
    grid_update_every: int = 8
    handover_steps: int = 150
    """NeuS only: steps of ``neus_from_nerf`` fitting the NeuS to the NeRF's iso-surface"""
    field_kwargs: dict = field(default_factory=lambda: {"n_levels": 8, "log2_hashmap_size": 14, "hidden_dim": 32})
    """field constructor arguments (hash grid size etc.)"""
    score: ScoreSettings = field(default_factory=ScoreSettings)


class FieldDistillStage(ChainedStage):
    """SDS on a volume-rendered field (``kind`` "nerf" or "neus"; module doc). ``source`` returns ``None``
    (NeRF: Magic3D blob init) or the NeRF to convert (NeuS, by ``neus_from_nerf``)."""

    def __init__(self, name: str, kind: str, cfg: FieldStageConfig, teacher, prompt: str, *, steps: int,
                 guidance_scale: float, source: Source | None = None, artefact=None, seed: int = 0,
                 score_fn=None):
        super().__init__(name, steps, source, artefact=artefact, seed=seed)
        assert kind in ("nerf", "neus")
        self.kind, self.cfg, self.teacher, self.prompt = kind, cfg, teacher, prompt
        self.guidance_scale, self.seed, self.score_fn = float(guidance_scale), seed, score_fn
        s = cfg.score
        self.sampler = OrbitSampler(s.elevation_range, s.azimuth_range, s.radius_range, s.fovy_range,
                                    cfg.resolution, cfg.resolution)
        self.timesteps = TimestepSampler(s.t_min, s.t_max, s.t_schedule, t_max_end=s.t_max_end)
        self.grid = OccupancyGrid(1.0, cfg.grid_resolution, update_every=cfg.grid_update_every)

    @property
    def model(self):
        return self.result

    def build(self, upstream: Any) -> None:
        if self.kind == "nerf":
            self.result = upstream if isinstance(upstream, NeRFField) else NeRFField(seed=self.seed, **self.cfg.field_kwargs)
        elif isinstance(upstream, NeuSField):
            self.result = upstream
        else:
            self.result = neus_from_nerf(upstream, threshold=handover_threshold(upstream), seed=self.seed,
                                         steps=self.cfg.handover_steps, batch=2048, resolution=32)
        self._make_optim()

    def _make_optim(self) -> None:
        self._optim = {"field": self.result.make_optimizer(self.cfg.lr_encoding, self.cfg.lr_mlp)}

    def render(self, cameras, **kw) -> dict:
        ratio = cos_anneal_ratio(kw.pop("step", 10**9), self.cfg.cos_anneal_steps)
        return render_field(self.result, cameras, n_samples=self.cfg.n_samples, occupancy_grid=self.grid,
                            background=self.cfg.score.background, cos_anneal_ratio=ratio, **kw)

    def step_loss(self, step: int, progress: float):
        c, f = self.cfg, self.result
        f.update_step(step)
        self.grid.update_from_field(step, f, generator=self.generator)
        views = self.sampler.sample(c.score.batch_size, self.generator)
        out = self.render(views.cameras, stratified=True, generator=self.generator, step=step)
        images = out["rgb"].permute(0, 3, 1, 2)
        res = score_images(self.teacher, images, views, self.prompt, c.score, self.timesteps, step=step,
                           progress=progress, guidance_scale=self.guidance_scale, generator=self.generator,
                           alphas=out["opacity"].permute(0, 3, 1, 2), score_fn=self.score_fn)
        loss = res.loss
        logs = {"grad_norm": float(res.grad.norm() / c.score.batch_size), "occupied": self.grid.occupied_fraction}
        if self.kind == "neus" and c.eikonal_weight > 0:
            pts = (torch.rand(1024, 3, generator=self.generator) * 2 - 1) * float(f.radius)
            eik = f.eikonal_loss(pts)
            if "gradient" in out and out["gradient"].numel():
                eik = 0.5 * (eik + eikonal_loss(out["gradient"]))
            loss = loss + c.eikonal_weight * eik
            logs["eikonal"] = float(eik.detach())
        return loss, logs

    def model_state(self) -> dict:
        return {"class": type(self.result).__name__, "config": dict(self.result.config),
                "weights": {k: v.detach().clone() for k, v in self.result.state_dict().items()},
                "grid": self.grid.state_dict()}

    def load_model_state(self, state: dict) -> None:
        cls = NeRFField if state["class"] == "NeRFField" else NeuSField
        self.result = cls(**state["config"])
        self.result.load_state_dict(state["weights"])
        self.grid.load_state_dict(state["grid"])
        self._make_optim()

    def save_artefact(self, path: Path) -> None:
        self.result.save(path, metadata={"stage": self.name})

    @torch.no_grad()
    def preview(self, n: int = 4, size: int | None = None) -> Tensor | None:
        if not self.built:
            return None
        s = size or self.cfg.resolution
        sc = self.cfg.score
        cams = orbit_cameras(15.0, torch.arange(n) * (360.0 / n), sum(sc.radius_range) / 2, sum(sc.fovy_range) / 2, s, s)
        out = self.render(cams)
        return torch.cat(list(out["rgb"].clamp(0, 1)), dim=1)


def handover_threshold(nerf: NeRFField, resolution: int = 32, *, n_views: int = 8, n_samples: int = 128) -> float:
    """Density level of the NeRF -> NeuS hand-over: the density where the NeRF's *renders* put the surface.

    A short score-distillation run leaves a soft density field (peak ~10-20, far below threestudio's fixed
    ``isosurface_threshold`` 25, which is tuned for 10k-step runs whose density saturates) that nonetheless
    renders an opaque, correctly shaped object. Any fixed level (or a fraction of the peak) then extracts a
    shrunken or empty surface. Instead we look where the renders see the surface: along the rays of
    ``n_views`` orbit views (elevation 15 deg, radius 3, FoV 40 deg, ``resolution`` px) we find the first
    point where the accumulated optical depth reaches ``ln 2`` (transmittance 1/2, the alpha-0.5 silhouette
    edge, ``n_samples`` uniform samples in the box) and return the median density there over the rays whose
    total opacity exceeds 1/2. The iso-surface at that level reproduces the rendered silhouettes (our choice;
    DreamCraft3D's hand-over is not published). Falls back to ``nerf.isosurface_threshold`` when no ray
    is opaque (an empty field)."""
    from ..render.volume import ray_aabb, rays_from_cameras, sample_rays_uniform

    cams = orbit_cameras(15.0, torch.arange(n_views) * (360.0 / n_views), 3.0, 40.0, resolution, resolution)
    o, d = rays_from_cameras(cams)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    near, far, hit = ray_aabb(o, d, nerf.bbox)
    o, d, near, far = o[hit], d[hit], near[hit], far[hit]
    if o.shape[0] == 0:
        return float(nerf.isosurface_threshold)
    with torch.no_grad():
        pts, _, deltas = sample_rays_uniform(o, d, near, far, n_samples)
        dens = torch.cat([nerf.density(c) for c in pts.reshape(-1, 3).split(65536)]).reshape(deltas.shape)
    depth = torch.cumsum(dens * deltas, dim=-1)  # optical depth up to the end of each interval
    opaque = depth[:, -1] > math.log(2.0)
    if not bool(opaque.any()):
        return float(nerf.isosurface_threshold)
    first = (depth[opaque] >= math.log(2.0)).float().argmax(dim=-1)
    level = dens[opaque].gather(1, first[:, None])[:, 0]
    return float(level.median())


def field_source(path: str | Path) -> Source:
    """A ``source`` that loads a field artefact (``--from-stage``)."""
    return lambda: load_field(path)
