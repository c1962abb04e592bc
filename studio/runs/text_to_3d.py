"""Text-to-3D runs: the shared config, the method base class and ``generate`` (CLI, batch, app, library).

A text-to-3D method subclasses :class:`TextTo3DMethod`, adds its own fields to a subclass of
:class:`TextTo3DConfig` and implements ``stages(cfg, teacher, stage_kwargs)``. ``generate`` does the
rest once for all methods: validation with clear messages, teacher loading, the one training loop,
artefacts (``model.ply``, ``model.splat``, ``turntable.mp4``, ``preview.png``, ``config.yaml``,
``metrics.json``) written atomically into ``out/<slug>/``, ground-truth metrics for ShapeWorld prompts
and ``--resume``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .errors import UserError
from .io import atomic_write_text, write_mp4, write_png
from .render.turntable import render_turntable
from .train.gaussian_stage import GaussianStageConfig
from .train.loop import Trainer, TrainerConfig

#: Default CFG scale per teacher for SDS-like methods: DreamFusion's 100 for real text-to-image models.
DEFAULT_GUIDANCE = {"shapeworld-exact": 1.0, "shapeworld-unet": 20.0}
REAL_TEACHER_GUIDANCE = 100.0


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
    stage: GaussianStageConfig = field(default_factory=GaussianStageConfig)
    turntable_frames: int = 36
    turntable_size: int = 128


def slugify(text: str, max_len: int = 60) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "prompt"


class TextTo3DMethod:
    """Base of text-to-3D methods; subclasses set ``name``, ``description``, ``paper``, ``Config``."""

    name = "base"
    kind = "3d"
    description = ""
    paper = ""
    Config = TextTo3DConfig

    def default_guidance(self, teacher_name: str) -> float:
        return DEFAULT_GUIDANCE.get(teacher_name, REAL_TEACHER_GUIDANCE)

    def prepare(self, cfg, teacher, run_dir: Path, resume: bool, progress: bool = True) -> dict:
        """Work before the training stages (e.g. PlacidDreamer's multi-view initialisation and
        personalisation). Each such step should write its results into ``run_dir`` and reuse them when
        ``resume`` is set. Returns per-step info (wall times, metrics) recorded in ``metrics.json``."""
        return {}

    def stages(self, cfg, teacher, stage_kwargs: dict) -> list:  # pragma: no cover - abstract
        raise NotImplementedError


def validate(cfg: TextTo3DConfig) -> None:
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


def prepare_out_dir(out: Path, prompt: str) -> Path:
    run_dir = Path(out) / slugify(prompt)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder '{run_dir}': {e.strerror or e}; choose another --out") from e
    return run_dir


_TEACHERS: dict[tuple, Any] = {}


def load_teacher_cached(name: str, **kw):
    """Teachers are frozen: share one instance per (name, options) across runs of a process (batch, app)."""
    from .teachers.registry import load_teacher

    key = (name, tuple(sorted(kw.items())))
    if key not in _TEACHERS:
        _TEACHERS[key] = load_teacher(name, **kw)
    return _TEACHERS[key]


def generate(cfg: TextTo3DConfig, method: str | TextTo3DMethod = "sds", out: str | Path = "outputs", *,
             resume: bool = False, callbacks: list[Callable[[dict], Any]] | None = None, progress: bool = True,
             trainer_hook: Callable[[Trainer], None] | None = None) -> dict:
    """Run one text-to-3D job; returns the metrics dict (also written to ``metrics.json``)."""
    from methods.registry import get_method

    validate(cfg)
    m = get_method(method)() if isinstance(method, str) else method
    if not isinstance(cfg, m.Config):
        raise UserError(f"method {m.name!r} needs a {m.Config.__name__} config, got {type(cfg).__name__}")
    run_dir = prepare_out_dir(Path(out), cfg.prompt)
    torch.manual_seed(cfg.seed)
    teacher = load_teacher_cached(cfg.teacher)
    # Reject prompts a ShapeWorld teacher does not know before any work is done.
    teacher.encode_prompt([cfg.prompt])
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else m.default_guidance(cfg.teacher)
    resolved = dataclasses.replace(cfg, guidance_scale=guidance)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(
        {"method": m.name, **_plain(dataclasses.asdict(resolved))}, sort_keys=False))
    stage_kwargs = dict(steps=cfg.steps, resolution=cfg.resolution, guidance_scale=guidance)
    t_prep = time.perf_counter()
    prepared = m.prepare(resolved, teacher, run_dir, resume, progress)
    prep_seconds = time.perf_counter() - t_prep
    stages = m.stages(resolved, teacher, stage_kwargs)
    trainer = Trainer(TrainerConfig(out_dir=run_dir, seed=cfg.seed, progress=progress,
                                    checkpoint_every=max(50, cfg.steps // 4), preview_every=max(10, cfg.steps // 20)),
                      callbacks=callbacks)
    if trainer_hook is not None:
        trainer_hook(trainer)
    t0 = time.perf_counter()
    history = trainer.run(stages, resume=resume)
    seconds = time.perf_counter() - t0
    metrics = export(stages[-1], resolved, run_dir)
    metrics.update({"method": m.name, "teacher": cfg.teacher, "prompt": cfg.prompt, "seed": cfg.seed,
                    "steps": cfg.steps, "train_seconds": round(seconds, 2),
                    "it_s": round(cfg.steps / max(seconds, 1e-9), 3),
                    "final_loss": history[-1]["loss"] if history else None})
    if prepared:
        metrics["prepare"] = prepared
        metrics["prepare_seconds"] = round(prep_seconds, 2)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(run_dir / "history.json", json.dumps(history))
    return metrics


def _plain(d):
    """A config as plain JSON/YAML values (dicts, lists, strings for paths)."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    if isinstance(d, Path):
        return str(d)
    return d


def export(stage, cfg: TextTo3DConfig, run_dir: Path) -> dict:
    """Write the student's artefacts and, for ShapeWorld prompts, ground-truth metrics. A final stage with
    its own ``export(run_dir, cfg) -> dict`` (mesh stages) writes its artefacts itself."""
    if callable(getattr(stage, "export", None)):
        return stage.export(run_dir, cfg)
    from .world.metrics import evaluate_gaussians
    from .world.objects import find_object_for_prompt

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
            gt = evaluate_gaussians(obj, model, size=64, n_views=8)
        metrics["ground_truth"] = {k: (None if v is None else float(v)) if isinstance(v, (int, float)) or v is None else v
                                   for k, v in gt.items()}
    return metrics
