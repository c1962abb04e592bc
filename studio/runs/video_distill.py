"""Video distillation: the kind's config, data and method base class.

A video distillation method (``kind = "video-distill"``) subclasses :class:`VideoDistillMethod`, adds its fields to a
subclass of :class:`VideoDistillConfig` and implements ``stages(cfg, teacher, student, data)``. The kind does
the rest once for every method: teacher loading, the LoRA student on the teacher's own denoiser
(:class:`~studio.students.video_lora.VideoLoRAStudent`; a method with another student overrides ``make_student``,
e.g. Stream-R1's causal streaming generator, and ``export`` for the weights to write, e.g. an EMA), the training data, the one training loop
(:class:`~studio.train.loop.Trainer`: progress, checkpoints, ``--resume``, NaN guard), the distilled student
folder (``student/``: adapter + ``student.json``, loadable by ``studio video generate --model out/student``),
ground-truth evaluation of the student at a few sampling steps; the run skeleton adds ``config.yaml``,
``metrics.json`` and signals. Its run folder is ``--out`` itself (no prompt to name it by).

Data (:class:`VideoData`):

* ``"shapeworld"``: fresh random ShapeWorld clips every step (:func:`studio.world.clips.sample_clips`) at the
  teacher's clip length and resolution, encoded with the teacher's ``encode`` (its VAE, or ``2x - 1`` for pixel
  models), captions from the prompt set;
* ``"shapeworld-lq"``: the same clips in the low-quality clip domain (:func:`studio.world.clips.degrade`: blur,
  noise, blocky compression, watermark) -- WebVid's role in MCM;
* a folder of videos: every ``*.mp4`` / ``*.webm`` / ``*.gif`` with a caption in a ``.txt`` of the same stem
  (frames sampled uniformly to the clip length, resized to the native resolution).

Prompt sets (``prompts``): ``static`` (the 21 static-camera ShapeWorld prompts), ``default`` (63), ``full`` (252),
or a text file with one prompt per line.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from .protocol import Method
from .skeleton import train_stages

PROMPT_SETS = ("static", "default", "full")
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv")


@dataclass
class VideoDistillConfig:
    teacher: str = "shapeworld-video-wan"
    """frozen teacher; the student is a LoRA on its own denoiser (registered name, diffusers folder or HF id)"""
    data: str = "shapeworld"
    """training clips: shapeworld | shapeworld-lq | a folder of videos with .txt captions"""
    prompts: str = "static"
    """prompt set: static (21) | default (63) | full (252) | a text file, one prompt per line"""
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-4
    lora_rank: int = 16
    lora_alpha: float | None = None
    """LoRA scale alpha / rank; None = rank (scale 1, MCM's rank 64 / alpha 64)"""
    max_grad_norm: float = 10.0
    grad_accum: int = 1
    seed: int = 0
    eval_steps: tuple[int, ...] = (1, 2, 4, 8)
    """sampling steps at which the distilled student is evaluated (ShapeWorld ground truth)"""
    eval_prompts: int = 21
    """how many prompts of the set to evaluate on (0 = no evaluation)"""
    checkpoint_every: int = 100


def resolve_prompts(spec: str) -> list[str]:
    """The prompt list of a prompt-set name or a text file (one prompt per line)."""
    from ..world.clips import video_prompts

    if spec in PROMPT_SETS:
        return video_prompts(cameras=["static"]) if spec == "static" else video_prompts(full=spec == "full")
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--prompts {spec!r}: not a prompt set ({', '.join(PROMPT_SETS)}) nor a text file")
    prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not prompts:
        raise UserError(f"--prompts {spec}: the file has no prompts (one per line)")
    return prompts


class VideoData:
    """Training clips for a teacher (module doc): ``batch(step, n) -> (x0 latents [n,C,F',h,w], prompts)``."""

    def __init__(self, spec: str, teacher, prompts: list[str], seed: int = 0):
        self.spec, self.teacher, self.prompts, self.seed = spec, teacher, list(prompts), int(seed)
        self.num_frames = int(teacher.num_frames)
        self.size = int(teacher.native_resolution)
        self.files: list[tuple[Path, str]] = []
        if spec not in ("shapeworld", "shapeworld-lq"):
            folder = Path(spec)
            if not folder.is_dir():
                raise UserError(f"--data {spec!r}: expected shapeworld, shapeworld-lq or a folder of videos with "
                                f".txt captions")
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in VIDEO_SUFFIXES:
                    cap = f.with_suffix(".txt")
                    if not cap.is_file():
                        raise UserError(f"--data {folder}: {f.name} has no caption file {cap.name}")
                    self.files.append((f, cap.read_text().strip()))
            if not self.files:
                raise UserError(f"--data {folder}: no videos ({', '.join(VIDEO_SUFFIXES)}) found")
        else:
            from ..world.clips import parse_video_prompt

            for p in self.prompts:
                parse_video_prompt(p)  # ShapeWorld clips need ShapeWorld prompts (UserError names the grammar)

    def videos(self, step: int, n: int) -> tuple[Tensor, list[str]]:
        """Pixel clips ``[n,F,3,H,W]`` in [0, 1] and their captions for ``step`` (deterministic)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        if self.files:
            idx = torch.randint(len(self.files), (n,), generator=gen).tolist()
            clips = [self._load(self.files[i][0]) for i in idx]
            return torch.stack(clips), [self.files[i][1] for i in idx]
        from ..world.clips import degrade, sample_clips

        idx = torch.randint(len(self.prompts), (n,), generator=gen).tolist()
        prompts = [self.prompts[i] for i in idx]
        video = sample_clips(n, seed=self.seed * 1_000_003 + int(step), prompts=prompts, num_frames=self.num_frames,
                             size=self.size)["video"]
        if self.spec == "shapeworld-lq":
            video = degrade(video, seed=self.seed + int(step))
        return video, prompts

    def _load(self, path: Path) -> Tensor:
        from ..io import read_video

        v = torch.as_tensor(read_video(path)).float()  # [T,H,W,3]
        idx = torch.linspace(0, v.shape[0] - 1, self.num_frames).round().long()
        v = v[idx].permute(0, 3, 1, 2)
        return torch.nn.functional.interpolate(v, size=(self.size, self.size), mode="bilinear", antialias=True,
                                               align_corners=False).clamp(0, 1)

    @torch.no_grad()
    def batch(self, step: int, n: int, *, with_video: bool = False):
        """``(x0 latents, prompts)`` for ``step``; with ``with_video`` also the pixel clips ``[n,F,3,H,W]``."""
        video, prompts = self.videos(step, n)
        x0 = self.teacher.encode(video.to(self.teacher.device, torch.float32)).to(self.teacher.dtype)
        return (x0, prompts, video) if with_video else (x0, prompts)


class VideoDistillMethod(Method):
    """Base of video distillation methods; subclasses set ``name``, ``description``, ``paper``, ``Config`` and
    ``sampler`` (the inference defaults written into the student folder) and implement ``stages``."""

    name = "base"
    kind = "video-distill"
    kind_title = "Video distillation"
    description = ""
    paper = ""
    Config = VideoDistillConfig
    input = None  # a prompt set, not one prompt: the run folder is --out itself
    verb = ("video", "distill")

    def sampler(self, cfg) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def stages(self, cfg, teacher, student, data: VideoData) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def make_student(self, cfg, teacher):
        """The trainable student: a LoRA on the teacher's own denoiser (a method with another student, such as a
        causal streaming generator, overrides this)."""
        from ..students.video_lora import VideoLoRAStudent

        return VideoLoRAStudent(teacher, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)

    def export(self, cfg, stages: list, student):
        """A context in which ``student`` holds the weights to write and evaluate (e.g. its EMA); default: as is."""
        return contextlib.nullcontext()

    def validate(self, cfg: VideoDistillConfig) -> None:
        if cfg.steps < 1 or cfg.batch_size < 1:
            raise UserError(f"--steps and --batch-size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
        resolve_prompts(cfg.prompts)

    def run(self, cfg: VideoDistillConfig, run_dir: Path, *, callbacks=None, resume: bool = False,
            progress: bool = True) -> dict:
        """One video distillation (module doc) into ``run_dir``; returns the metrics."""
        from ..teachers.registry import load_video_teacher
        from .video_generate import write_student

        torch.manual_seed(cfg.seed)
        teacher = load_video_teacher(cfg.teacher)
        prompts = resolve_prompts(cfg.prompts)
        data = VideoData(cfg.data, teacher, prompts, cfg.seed)
        student = self.make_student(cfg, teacher)
        stages = self.stages(cfg, teacher, student, data)
        history, seconds = train_stages(stages, run_dir, seed=cfg.seed, callbacks=callbacks, resume=resume,
                                        progress=progress, grad_accum=cfg.grad_accum,
                                        max_grad_norm=cfg.max_grad_norm, checkpoint_every=cfg.checkpoint_every,
                                        preview_every=max(10, cfg.steps // 10))
        sampler = self.sampler(cfg)
        with self.export(cfg, stages, student):
            folder = write_student(Path(run_dir) / "student", student, teacher=cfg.teacher, sampler=sampler,
                                   info={"method": self.name, "train_steps": cfg.steps})
            return self._evaluate(cfg, student, prompts, sampler, history, seconds, folder)

    def _evaluate(self, cfg, student, prompts, sampler, history, seconds, folder) -> dict:
        metrics: dict[str, Any] = {"method": self.name, "teacher": cfg.teacher, "data": cfg.data,
                                   "steps": cfg.steps, "train_seconds": round(seconds, 2),
                                   "it_s": round(cfg.steps / max(seconds, 1e-9), 3),
                                   "final_loss": history[-1]["loss"] if history else None, "student": str(folder)}
        if cfg.eval_prompts and cfg.data in ("shapeworld", "shapeworld-lq"):
            eval_prompts = prompts[: cfg.eval_prompts]
            on = student.adapter_enabled(True) if hasattr(student, "adapter_enabled") else contextlib.nullcontext()
            with torch.no_grad(), on:
                rows = evaluate_video_model(student, eval_prompts, cfg.eval_steps, sampler, seed=cfg.seed + 10_000)
            metrics["eval"] = {"prompts": len(eval_prompts), "rows": rows}
            metrics["headline"] = {f"student_{s}_{k}": rows[str(s)][k] for s in cfg.eval_steps
                                   for k in ("frame_error", "motion_accuracy", "seconds_per_clip") if str(s) in rows}
        return metrics

    def summary(self, metrics: dict, run_dir: Path) -> str:
        head = json.dumps(metrics.get("headline", {}), indent=2, default=str) + "\n" if metrics.get("headline") else ""
        return f"{head}done in {metrics['train_seconds']:.0f}s; student: {metrics.get('student', run_dir)}"


def evaluate_video_model(model, prompts: list[str], steps_list, sampler: dict, seed: int = 0,
                         chunk: int = 32) -> dict:
    """Ground-truth metrics and seconds per clip of ``model`` at each number of sampling steps."""
    from .video_generate import sample_videos
    from ..world.video_metrics import evaluate_videos

    opts = {k: v for k, v in sampler.items() if k not in ("steps",)}
    rows = {}
    for steps in steps_list:
        t0, videos = time.perf_counter(), []
        for i in range(0, len(prompts), chunk):
            videos.append(sample_videos(model, prompts[i:i + chunk], steps=int(steps), seed=seed + i, **opts))
        seconds = time.perf_counter() - t0
        m = evaluate_videos(torch.cat(videos), prompts)
        rows[str(steps)] = {**{k: round(v, 4) for k, v in m.items() if isinstance(v, float)},
                            "seconds_per_clip": round(seconds / len(prompts), 4)}
    return rows


__all__ = ["VideoDistillConfig", "VideoDistillMethod", "VideoData", "evaluate_video_model", "resolve_prompts",
           "PROMPT_SETS"]
