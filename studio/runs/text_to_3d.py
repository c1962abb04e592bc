"""Text to 3D: the kind's config and its method base class.

A text-to-3D method subclasses :class:`TextTo3DMethod`, adds its own fields to a subclass of
:class:`TextTo3DConfig` and implements ``stages(cfg, teacher, stage_kwargs)`` (and optionally ``prepare``). The
kind does the rest once for all its methods: teacher loading, the prompt check, the one training loop,
artefacts (``model.ply``, ``model.splat``, ``turntable.mp4``, ``preview.png``) and ground-truth metrics for
ShapeWorld prompts; the run skeleton (:mod:`studio.runs.skeleton`) adds the folder, ``config.yaml``,
``metrics.json``, ``--resume`` and signals.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cameras import HELDOUT_AZIMUTH
from ..errors import UserError
from ..io import write_mp4, write_png
from ..render.turntable import render_turntable
from ..train.gaussian_stage import GaussianStageConfig
from .protocol import Method
from .skeleton import train_stages


@dataclass
class TextTo3DConfig:
    prompt: str = ""
    teacher: str = "shapeworld-exact"
    """registered teacher name (shapeworld-exact, shapeworld-unet, sd21-base, ...), local folder or HF id"""
    steps: int = 400
    resolution: int = 64
    guidance_scale: float | None = None
    """CFG scale; None = the method's default for the teacher"""
    seed: int = 0
    heldout_azimuth: tuple[float, float] = HELDOUT_AZIMUTH
    """azimuth sector (start, end) in degrees (0 = front, 90 = right, wrapping) that no training camera of any stage
    samples; the ground-truth metrics are measured at views inside it, so they score generation, not fitting the
    training views. Equal ends (0 0) turn it off: training covers every azimuth and the metrics use views between
    the training ring's azimuths (inside the training camera distribution)"""
    stage: GaussianStageConfig = field(default_factory=GaussianStageConfig)
    turntable_frames: int = 36
    turntable_size: int = 128


_TEACHERS: dict[tuple, Any] = {}


def load_teacher_cached(name: str, **kw):
    """Teachers are frozen: share one instance per (name, options) across runs of a process (batch, app)."""
    from ..teachers.registry import load_teacher

    key = (name, tuple(sorted(kw.items())))
    if key not in _TEACHERS:
        _TEACHERS[key] = load_teacher(name, **kw)
    return _TEACHERS[key]


class TextTo3DMethod(Method):
    """Base of text-to-3D methods; subclasses set ``name``, ``description``, ``paper``, ``Config``."""

    name = "base"
    kind = "3d"
    kind_title = "Text to 3D"
    input = "prompt"
    verb = ("generate",)
    Config = TextTo3DConfig
    #: the guidance role of the teacher's registration this method's default comes from
    guidance_role = "sds"

    @classmethod
    def examples(cls) -> list[str]:
        from ..world.objects import list_objects

        return [o.prompt for o in list_objects()]

    def default_guidance(self, teacher_name: str) -> float:
        from ..teachers.registry import default_guidance

        return default_guidance(teacher_name, self.guidance_role)

    def validate(self, cfg: TextTo3DConfig) -> None:
        if not cfg.prompt or not cfg.prompt.strip():
            raise UserError("the prompt is empty; give a text such as \"a red cube\"")
        if cfg.steps < 1:
            raise UserError(f"--steps must be a positive number of steps, got {cfg.steps}")
        if not 16 <= cfg.resolution <= 1024:
            raise UserError(f"--resolution must be between 16 and 1024 pixels, got {cfg.resolution}")
        if cfg.guidance_scale is not None and cfg.guidance_scale < 0:
            raise UserError(f"--guidance-scale must be >= 0, got {cfg.guidance_scale}")
        if cfg.stage.batch_size < 1:
            raise UserError(f"--stage.batch-size must be >= 1, got {cfg.stage.batch_size}")

    def resolve(self, cfg: TextTo3DConfig) -> TextTo3DConfig:
        if cfg.guidance_scale is not None:
            return cfg
        return dataclasses.replace(cfg, guidance_scale=self.default_guidance(cfg.teacher))

    def prepare(self, cfg, teacher, run_dir: Path, resume: bool, progress: bool = True) -> dict:
        """Work before the training stages (e.g. PlacidDreamer's multi-view initialisation and
        personalisation). Each such step should write its results into ``run_dir`` and reuse them when
        ``resume`` is set. Returns per-step info (wall times, metrics) recorded in ``metrics.json``."""
        return {}

    def stages(self, cfg, teacher, stage_kwargs: dict) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, cfg: TextTo3DConfig, run_dir: Path, *, callbacks=None, resume: bool = False,
            progress: bool = True) -> dict:
        torch.manual_seed(cfg.seed)
        teacher = load_teacher_cached(cfg.teacher)
        teacher.encode_prompt([cfg.prompt])  # a prompt the teacher does not know is refused before any work
        stage_kwargs = dict(steps=cfg.steps, resolution=cfg.resolution, guidance_scale=cfg.guidance_scale)
        t_prep = time.perf_counter()
        prepared = self.prepare(cfg, teacher, run_dir, resume, progress)
        prep_seconds = time.perf_counter() - t_prep
        stages = self.stages(cfg, teacher, stage_kwargs)
        exclude_training_azimuth(stages, cfg.heldout_azimuth)
        history, seconds = train_stages(stages, run_dir, seed=cfg.seed, callbacks=callbacks, resume=resume,
                                        progress=progress, checkpoint_every=max(50, cfg.steps // 4),
                                        preview_every=max(10, cfg.steps // 20))
        metrics = export(stages[-1], cfg, run_dir)
        metrics.update({"method": self.name, "teacher": cfg.teacher, "prompt": cfg.prompt, "seed": cfg.seed,
                        "steps": cfg.steps, "train_seconds": round(seconds, 2),
                        "it_s": round(cfg.steps / max(seconds, 1e-9), 3),
                        "final_loss": history[-1]["loss"] if history else None})
        if prepared:
            metrics["prepare"] = prepared
            metrics["prepare_seconds"] = round(prep_seconds, 2)
        return metrics

    def summary(self, metrics: dict, run_dir: Path) -> str:
        gt = metrics.get("ground_truth")
        extra = f", PSNR {gt['psnr']:.2f} dB, IoU {gt['iou']:.3f}" if gt and gt.get("psnr") is not None else ""
        return f"done in {metrics['train_seconds']:.0f}s{extra}: {run_dir}/"


def heldout_sector(cfg) -> tuple[float, float] | None:
    """``cfg.heldout_azimuth`` as a sector, or ``None`` when it is off (equal ends) or absent."""
    sector = getattr(cfg, "heldout_azimuth", None)
    if sector is None or (float(sector[1]) - float(sector[0])) % 360.0 == 0.0:
        return None
    return (float(sector[0]), float(sector[1]))


def exclude_training_azimuth(stages: list, sector) -> None:
    """Keep every training camera of ``stages`` out of the azimuth ``sector`` (see ``heldout_azimuth``): each
    stage's orbit ``sampler`` (Gaussian, field, mesh and texture stages) and polishing cameras
    (``cfg.cameras``, a ``PolishCameraConfig``) get ``exclude_azimuth``. ``None`` / equal ends: no change."""
    if sector is None or (float(sector[1]) - float(sector[0])) % 360.0 == 0.0:
        return
    sector = (float(sector[0]), float(sector[1]))
    for st in stages:
        sampler = getattr(st, "sampler", None)
        if sampler is not None and hasattr(sampler, "exclude_azimuth"):
            sampler.exclude_azimuth = sector
        cams = getattr(getattr(st, "cfg", None), "cameras", None)
        if cams is not None and hasattr(cams, "exclude_azimuth"):
            st.cfg.cameras = dataclasses.replace(cams, exclude_azimuth=sector)


def export(stage, cfg: TextTo3DConfig, run_dir: Path) -> dict:
    """Write the student's artefacts and, for ShapeWorld prompts, ground-truth metrics. A final stage with
    its own ``export(run_dir, cfg) -> dict`` (mesh stages) writes its artefacts itself."""
    if callable(getattr(stage, "export", None)):
        return stage.export(run_dir, cfg)
    from ..world.metrics import evaluate_gaussians
    from ..world.objects import find_object_for_prompt

    model = stage.model
    model.save_ply(run_dir / "model.ply")
    model.save_splat(run_dir / "model.splat")
    write_png(run_dir / "preview.png", stage.preview(4, size=max(cfg.resolution, 128)))
    g = {"means": model.means.detach(), "quats": model.quats.detach(), "scales": model.scales.detach(),
         "opacities": model.opacities.detach(), "colors": model.colors.detach()}
    video = render_turntable(g, n_frames=cfg.turntable_frames, size=cfg.turntable_size,
                             radius=sum(cfg.stage.radius_range) / 2, fovy_deg=sum(cfg.stage.fovy_range) / 2,
                             sh_degree=model.active_sh_degree)
    write_mp4(run_dir / "turntable.mp4", video, fps=12)
    metrics: dict[str, Any] = {"n_gaussians": model.num_gaussians}
    obj = find_object_for_prompt(cfg.prompt)
    if obj is not None:
        with torch.no_grad():
            gt = evaluate_gaussians(obj, model, size=64, n_views=8, azimuth_sector=heldout_sector(cfg))
        metrics["ground_truth"] = {k: (None if v is None else float(v)) if isinstance(v, (int, float)) or v is None else v
                                   for k, v in gt.items()}
    return metrics


__all__ = ["TextTo3DConfig", "TextTo3DMethod", "exclude_training_azimuth", "export", "heldout_sector",
           "load_teacher_cached"]
