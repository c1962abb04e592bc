"""Text-to-video runs: load a teacher or a distilled student, sample, write MP4 + frames + metrics.

The ``video-sample`` method of the ``video-generate`` kind: ``studio video generate PROMPT``, the app's Video
generation tab, and for library users::

    from methods import run
    from studio.runs.video_generate import VideoGenerateConfig
    metrics = run(VideoGenerateConfig("a red ball moving left", model="shapeworld-video-exact", steps=8))

``model`` is a registered video teacher (``shapeworld-video-exact``, ``shapeworld-video-wan``, ``modelscope-t2v``,
``animatediff``, ``wan2.1-t2v-1.3b``), a diffusers folder / Hugging Face id of a text-to-video pipeline, or the
folder of a **distilled student** written by a video distillation method (``student.json`` + LoRA adapter
weights; the adapter is merged into the teacher's denoiser for inference and the student's own sampler, steps
and guidance become the defaults). A **causal streaming student** (Stream-R1 / Self-Forcing:
``student.json`` with ``"student": "causal-wan"`` + ``student.safetensors``) is generated block by block with the
``causal`` sampler: each block of latent frames is decoded and its frames written to ``frames/`` as soon as it
is finished, the KV cache keeps a rolling window so every block costs the same, and ``--num-frames`` may be any
length (up to the transformer's RoPE table).

Samplers (:mod:`studio.teachers.sampling`): ``flow`` (flow-matching Euler; the default for rectified-flow
models such as Wan), ``ddim`` (deterministic DDIM; the default for DDPM-family models such as ModelScope /
AnimateDiff), ``lcm`` (multistep consistency sampling, for consistency-distilled students), ``causal``
(the block-causal few-step rollout of a causal student; ``steps`` = denoising steps per block,
:func:`~studio.teachers.sampling.causal_denoising_steps`).

Artefacts in ``out/<slug>/``: ``video.mp4`` (``video_<i>.mp4`` for more than one sample; small frames are
upscaled with nearest neighbour to at least 256 px so players show them), ``frames/<i>_<f>.png`` (native
resolution), ``metrics.json`` (seconds per clip and, for ShapeWorld prompts, the video metrics of
:func:`studio.world.video_metrics.evaluate_videos` against ground truth) and ``preview.png`` (four frames side by side); the run skeleton adds ``config.yaml``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import UserError
from ..io import atomic_write_text, write_mp4, write_png
from .protocol import Method

STUDENT_FILE = "student.json"
SAMPLERS = ("auto", "flow", "ddim", "lcm", "causal")
CAUSAL_STUDENT = "causal-wan"
@dataclass
class VideoGenerateConfig:
    prompt: str = ""
    model: str = "shapeworld-video-exact"
    """video teacher name, diffusers folder / HF id, or a distilled student folder (with student.json)"""
    steps: int | None = None
    """sampling steps; None = the model's default (25 for teachers, the student's own for students)"""
    sampler: Literal["auto", "flow", "ddim", "lcm", "causal"] = "auto"
    guidance_scale: float | None = None
    """CFG scale; None = the model's default (1 for consistency students: CFG is distilled in)"""
    negative: str | None = None
    num_frames: int | None = None
    """None = the clip length the model was trained on"""
    num_videos: int = 1
    seed: int = 0
    fps: int | None = None


# ----------------------------------------------------------------------------------------------- models
def is_student_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / STUDENT_FILE).is_file()


def write_student(folder: str | Path, student, *, teacher: str, sampler: dict, info: dict | None = None) -> Path:
    """Write a distilled student as one folder, atomically: built in a temporary sibling folder, then renamed
    onto ``folder`` (an existing folder is first renamed aside, so a reader sees the old folder, the new one or, for
    the instant between the two renames, none -- never half of one). A LoRA student
    (``VideoLoRAStudent``) writes ``adapter.safetensors``; a causal streaming student (``CausalWanStudent``)
    ``student.safetensors`` and ``"student": "causal-wan"``. ``student.json`` holds ``teacher`` (the name or
    path it loads from) and ``sampler`` (the defaults ``{"sampler": "lcm", "steps": 4, "guidance_scale": 1.0,
    ...}``)."""
    import os
    import shutil
    import tempfile

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        if hasattr(student, "forward_block"):
            weights = "student.safetensors"
            meta = {"teacher": str(teacher), "student": CAUSAL_STUDENT, "weights": weights}
        else:
            weights = "adapter.safetensors"
            meta = {"teacher": str(teacher), "adapter": weights}
        student.save(tmp / weights)
        meta = {**meta, "sampler": dict(sampler), **(info or {})}
        atomic_write_text(tmp / STUDENT_FILE, json.dumps(meta, indent=2))
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_video_model(name_or_path: str | Path, **kw) -> tuple[Any, dict]:
    """``(model, defaults)``: a video teacher or a merged distilled student, with its sampling defaults
    (``sampler``, ``steps``, ``guidance_scale``, and sampler options such as ``timestep_scaling``)."""
    from ..teachers.registry import default_guidance, load_video_teacher

    if is_student_folder(name_or_path):
        folder = Path(name_or_path)
        try:
            meta = json.loads((folder / STUDENT_FILE).read_text())
            teacher_name, adapter = meta["teacher"], folder / meta.get("adapter", "adapter.safetensors")
        except (ValueError, KeyError) as e:
            raise UserError(f"student folder {folder}: {STUDENT_FILE} is unreadable ({e}); re-run the distillation "
                            f"or pass a teacher name") from e
        from ..students.video_lora import VideoLoRAStudent

        teacher = load_video_teacher(teacher_name, **kw)
        if meta.get("student") == CAUSAL_STUDENT:
            from ..students.causal_video import CausalWanStudent

            model = CausalWanStudent.from_file(teacher, folder / meta.get("weights", "student.safetensors"))
            model.requires_grad_(False)
            model._name = str(folder)
            steps = len(model.denoising_steps)
            return model, {"sampler": "causal", "steps": steps, "guidance_scale": 1.0, **meta.get("sampler", {})}
        model = VideoLoRAStudent.from_file(teacher, adapter).merge()
        model.name = str(folder)
        defaults = {"sampler": "lcm", "steps": 4, "guidance_scale": 1.0, **meta.get("sampler", {})}
        return model, defaults
    model = load_video_teacher(str(name_or_path), **kw)
    sampler = "flow" if model.schedule.is_flow else "ddim"
    return model, {"sampler": sampler, "steps": 25, "guidance_scale": default_guidance(str(name_or_path), "sample_video")}


def sample_videos(model, prompts: list[str], *, sampler: str = "auto", steps: int = 25, guidance_scale: float = 4.0,
                  seed: int = 0, num_frames: int | None = None, negative: str | None = None,
                  output: str = "decoded", **options) -> torch.Tensor:
    """Sample ``[B,F,3,H,W]`` videos in [0, 1] (or latents with ``output="latents"``) with the named sampler
    (``auto``: flow Euler for rectified-flow models, DDIM otherwise)."""
    from ..teachers.sampling import ddim_sample, flow_euler_sample, lcm_sample

    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if int(steps) < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    if sampler == "auto":
        sampler = "causal" if hasattr(model, "forward_block") else "flow" if model.schedule.is_flow else "ddim"
    common = dict(seed=seed, num_frames=num_frames, negative=negative, output=output)
    if sampler == "causal":
        return causal_sample(model, prompts, steps=steps, guidance_scale=guidance_scale, **common,
                             on_block=options.get("on_block"))
    if sampler == "lcm":
        keep = {k: options[k] for k in ("timestep_scaling", "original_steps", "sigma_data") if k in options}
        return lcm_sample(model, prompts, steps=steps, guidance_scale=guidance_scale, **common, **keep)
    if sampler == "flow":
        if not model.schedule.is_flow:
            raise UserError(f"sampler 'flow' needs a rectified-flow model; {model.name} is "
                            f"{model.schedule.prediction_type}: use --sampler ddim")
        return flow_euler_sample(model, prompts, steps=steps, guidance_scale=guidance_scale, **common)
    return ddim_sample(model, prompts, steps=steps, guidance_scale=guidance_scale, **common)


def causal_sample(model, prompts: list[str], *, steps: int | None = None, guidance_scale: float = 1.0, seed: int = 0,
                  num_frames: int | None = None, negative: str | None = None, output: str = "decoded",
                  on_block=None) -> torch.Tensor:
    """The streaming rollout of a causal student (``CausalWanStudent.rollout``, KV cache, no grad): ``steps``
    denoising steps per block (the student's own list when it has that many, else
    :func:`~studio.teachers.sampling.causal_denoising_steps`); ``on_block(b, latents)`` sees each finished block."""
    from ..teachers.sampling import causal_denoising_steps

    if not hasattr(model, "forward_block"):
        raise UserError(f"sampler 'causal' needs a causal student folder (written by studio video distill --method "
                        f"stream-r1); {getattr(model, 'name', model)} is not one: use --sampler auto")
    own = list(getattr(model, "denoising_steps", ()))
    ds = own if steps is None or int(steps) == len(own) else causal_denoising_steps(int(steps))
    with torch.no_grad():
        return model.rollout(prompts, num_frames, seed=seed, denoising_steps=ds, guidance_scale=guidance_scale,
                             negative=negative, output=output, on_block=on_block)


def shapeworld_metrics(videos: torch.Tensor, prompts: list[str]) -> dict | None:
    """Ground-truth video metrics when every prompt is a ShapeWorld video prompt and the clips are ShapeWorld's
    size (32 px); ``None`` otherwise."""
    from ..world.clips import parse_video_prompt
    from ..world.video_metrics import evaluate_videos

    try:
        for p in prompts:
            parse_video_prompt(p)
    except UserError:
        return None
    if videos.shape[-1] != 32 or videos.shape[-2] != 32:
        return None
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in evaluate_videos(videos, prompts).items()}


def _show(frames: torch.Tensor, min_side: int = 256) -> torch.Tensor:
    """``[F,3,H,W]`` -> ``[F,H',W',3]`` upscaled (nearest) so the short side is at least ``min_side``."""
    s = max(1, -(-min_side // min(frames.shape[-2:])))
    if s > 1:
        frames = torch.nn.functional.interpolate(frames, scale_factor=s, mode="nearest")
    return frames.permute(0, 2, 3, 1)


class VideoGenerateMethod(Method):
    """Sample videos from a video teacher or a distilled student folder (module doc)."""

    name = "video-sample"
    kind = "video-generate"
    kind_title = "Video generation"
    description = "Sample a video from a video teacher or a distilled student folder (MP4, frames, metrics)"
    paper = ""
    Config = VideoGenerateConfig
    input = "prompt"
    verb = ("video", "generate")
    default_for_verb = True
    default_out = "outputs/video"

    @classmethod
    def examples(cls) -> list[str]:
        from ..world.clips import video_prompts

        return video_prompts(cameras=["static"])

    def validate(self, cfg: VideoGenerateConfig) -> None:
        if not cfg.prompt.strip():
            raise UserError("the prompt is empty; e.g. studio video generate \"a red ball moving left\"")
        if cfg.num_videos < 1:
            raise UserError(f"--num-videos must be >= 1, got {cfg.num_videos}")
        if cfg.steps is not None and cfg.steps < 1:
            raise UserError(f"--steps must be >= 1, got {cfg.steps}")
        if cfg.guidance_scale is not None and cfg.guidance_scale < 0:
            raise UserError(f"--guidance-scale must be >= 0, got {cfg.guidance_scale}")

    def run(self, cfg: VideoGenerateConfig, run_dir: Path, *, callbacks=None, resume: bool = False,
            progress: bool = True) -> dict:
        model, defaults = load_video_model(cfg.model)
        steps = int(cfg.steps if cfg.steps is not None else defaults["steps"])
        sampler = cfg.sampler if cfg.sampler != "auto" else defaults.get("sampler", "auto")
        guidance = float(cfg.guidance_scale if cfg.guidance_scale is not None else defaults["guidance_scale"])
        options = {k: v for k, v in defaults.items() if k not in ("sampler", "steps", "guidance_scale")}
        model.encode_prompt([cfg.prompt])  # reject prompts a ShapeWorld teacher does not know before any work
        prompts = [cfg.prompt] * cfg.num_videos
        streamed = {"frames": 0, "blocks": 0, "block_seconds": []}
        if sampler == "causal":
            options["on_block"] = self._frame_writer(model, run_dir, streamed)
        t0 = time.perf_counter()
        videos = sample_videos(model, prompts, sampler=sampler, steps=steps, guidance_scale=guidance, seed=cfg.seed,
                               num_frames=cfg.num_frames, negative=cfg.negative, **options)
        seconds = time.perf_counter() - t0
        fps = int(cfg.fps or getattr(model, "frame_rate", 8))
        files = []
        for i, clip in enumerate(videos):
            name = "video.mp4" if cfg.num_videos == 1 else f"video_{i}.mp4"
            write_mp4(run_dir / name, _show(clip), fps=fps)
            files.append(name)
            for f, frame in enumerate(clip[streamed["frames"]:], start=streamed["frames"]):
                write_png(run_dir / "frames" / f"{i}_{f:03d}.png", frame.permute(1, 2, 0))
        write_png(run_dir / "preview.png", _strip(videos[0]))
        metrics: dict[str, Any] = {
            "prompt": cfg.prompt, "model": str(cfg.model), "sampler": sampler, "steps": steps,
            "guidance_scale": guidance, "seed": cfg.seed, "num_videos": cfg.num_videos,
            "frames": int(videos.shape[1]), "size": list(videos.shape[-2:]), "seconds": round(seconds, 3),
            "seconds_per_clip": round(seconds / cfg.num_videos, 3), "videos": files}
        if streamed["blocks"]:
            metrics["streamed"] = {"blocks": streamed["blocks"], "frames_written_while_generating": streamed["frames"],
                                   "block_seconds": [round(x, 4) for x in streamed["block_seconds"]],
                                   "frames_per_second": round(int(videos.shape[1]) * cfg.num_videos / seconds, 2)}
        gt = shapeworld_metrics(videos, prompts)
        if gt is not None:
            metrics["ground_truth"] = gt
        return metrics

    @staticmethod
    def _frame_writer(model, run_dir: Path, streamed: dict):
        """``on_block`` of a causal rollout: decode each finished block and write its frames at once
        (``frames/<i>_<f>.png``), when the model decodes frame-aligned blocks (no temporal compression; a causal
        VAE that folds frames is decoded once at the end instead). Records per-block seconds."""
        clock = [time.perf_counter()]

        def on_block(b: int, latents: torch.Tensor) -> None:
            now = time.perf_counter()
            streamed["block_seconds"].append(now - clock[0])
            streamed["blocks"] += 1
            if int(getattr(model, "temporal_compression", 1)) == 1:
                clip = model.decode(latents).float()  # [B,f,3,H,W]
                f0 = streamed["frames"]
                for i, frames in enumerate(clip):
                    for j, frame in enumerate(frames):
                        write_png(run_dir / "frames" / f"{i}_{f0 + j:03d}.png", frame.permute(1, 2, 0))
                streamed["frames"] = f0 + int(clip.shape[1])
            clock[0] = time.perf_counter()

        return on_block

    def summary(self, metrics: dict, run_dir: Path) -> str:
        gt = metrics.get("ground_truth")
        extra = (f", motion accuracy {gt['motion_accuracy']:.2f}, frame error {gt['frame_error']:.3f}" if gt else "")
        return f"done in {metrics['seconds']:.1f}s ({metrics['sampler']}, {metrics['steps']} steps){extra}: {run_dir}/"


def _strip(clip: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Up to ``n`` frames of ``[F,3,H,W]`` side by side ``[H', n W', 3]`` (the run's preview image)."""
    idx = torch.linspace(0, clip.shape[0] - 1, min(n, clip.shape[0])).round().long()
    frames = _show(clip[idx])  # [n,H',W',3]
    return frames.permute(1, 0, 2, 3).reshape(frames.shape[1], -1, 3)
