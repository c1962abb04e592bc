"""Video reinforcement learning: the kind's config, policy, rewards, evaluation and method base class.

A video RL method (``kind = "video-rl"``, ``studio video rl --method NAME``) improves a text-to-video policy --
a flow-matching video model (the ShapeWorld video teacher by default) -- against a reward, with rollouts of the
policy's own sampler (GRPO family: Flow-GRPO, DanceGRPO, Euphonium; spec 1.4 and 4). A method subclasses
:class:`VideoRLMethod`, adds its fields to a subclass of :class:`VideoRLConfig` and implements ``stages(cfg,
policy, reference, reward, prompts)``. The kind does the rest once for every method:

* **policy**: ``finetune="lora"`` -- a :class:`~studio.students.video_lora.VideoLoRAStudent` on the policy's own
  denoiser (the adapter off is the frozen reference, KL's ``v_ref``); ``finetune="full"`` -- every denoiser weight
  trains on a copy of the model (:func:`full_finetune_policy`; the original stays the frozen reference);
* **prompts**: a prompt set (``static`` / ``default`` / ``full`` / a text file, as for video distillation); every
  ``held_out_every``-th prompt is held out of training and used for evaluation only;
* **outcome reward** (:func:`load_outcome_reward`): ``shapeworld`` -- the differentiable ShapeWorld reward of
  :mod:`studio.teachers.rewards` (weighted mean of its z-scored axes vq / mq / ta), ``motion-accuracy`` -- the
  hard ground-truth check, or a VideoAlign folder (the real reward-model class) -- all behind the reward protocol;
* **loop**: the one :class:`~studio.train.loop.Trainer` (progress, checkpoints, ``--resume``, NaN guard);
* **evaluation**: held-out reward and ShapeWorld ground truth of the *plain* sampler (flow Euler, no reward model)
  before training, every ``eval_every`` steps and at the end (:func:`evaluate_policy`), plus
  :func:`~studio.runs.video_distill.evaluate_video_model` rows of the final policy;
* **the student folder** ``student/``: LoRA -- adapter + ``student.json`` (:func:`~studio.runs.video_generate.
  write_student`); full -- a complete diffusers folder of the policy with the trained denoiser. Either loads with
  ``studio video generate --model out/student`` and samples with the plain sampler: no reward model at inference.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import UserError
from .protocol import Method
from .skeleton import train_stages
from .video_distill import PROMPT_SETS, evaluate_video_model, resolve_prompts

REWARDS = ("shapeworld", "motion-accuracy")


@dataclass
class VideoRLConfig:
    policy: str = "shapeworld-video-wan"
    """the flow-matching video model to improve (registered name, diffusers folder or HF id)"""
    prompts: str = "static"
    """prompt set: static (21) | default (63) | full (252) | a text file, one prompt per line"""
    held_out_every: int = 4
    """every n-th prompt of the set is held out of training and used for evaluation (0 = train on all)"""
    reward: str = "shapeworld"
    """outcome reward: shapeworld (soft ShapeWorld checks) | motion-accuracy (hard check) | a VideoAlign folder"""
    reward_axes: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """weights of the reward model's z-scored axes (vq, mq, ta); the outcome reward is their weighted mean"""
    finetune: Literal["lora", "full"] = "lora"
    """lora (adapter on the policy's denoiser) | full (every denoiser weight)"""
    lora_rank: int = 16
    lora_alpha: float | None = None
    steps: int = 30
    lr: float = 2e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    guidance_scale: float | None = None
    """the policy's CFG scale in rollouts, training and evaluation; None = the model's default"""
    sampling_steps: int = 8
    """rollout and inference steps (the release: 16 at shift 5 for HunyuanVideo; 8 keeps a CPU run in minutes)"""
    seed: int = 0
    eval_every: int = 0
    """held-out evaluation every n steps (0 = only before and after training)"""
    eval_samples: int = 2
    """samples per held-out prompt (seeds fixed across evaluations)"""
    eval_seed: int = 10_000
    """seed of the held-out samples' noise, independent of --seed, so runs of any seed are evaluated alike"""
    eval_steps: tuple[int, ...] = ()
    """extra sampling-step counts for the final ground-truth rows (evaluate_video_model); () = sampling_steps"""
    checkpoint_every: int = 50


# ------------------------------------------------------------------------------------------ parts
def split_prompts(prompts: list[str], every: int) -> tuple[list[str], list[str]]:
    """``(train, held_out)``: every ``every``-th prompt (indices ``every - 1, 2 every - 1, ...``) is held out."""
    if int(every) <= 0:
        return list(prompts), list(prompts)
    held = [p for i, p in enumerate(prompts) if i % int(every) == int(every) - 1]
    train = [p for i, p in enumerate(prompts) if i % int(every) != int(every) - 1]
    if not train or not held:
        raise UserError(f"--held-out-every {every} leaves no training or no held-out prompt of {len(prompts)}")
    return train, held


class OutcomeReward:
    """``reward(videos [B,F,3,H,W] in [0,1], prompts) -> [B]`` float64 (see the module doc)."""

    def __init__(self, spec: str, axes=(1.0, 1.0, 1.0)):
        self.spec = str(spec)
        self.axes = torch.tensor([float(a) for a in axes], dtype=torch.float64)
        if len(self.axes) != 3 or float(self.axes.abs().sum()) == 0:
            raise UserError(f"--reward-axes needs three weights (vq, mq, ta), not all 0; got {tuple(axes)}")
        self.model = None
        if self.spec == "shapeworld":
            from ..teachers.rewards import ShapeWorldReward

            self.model = ShapeWorldReward().freeze()
        elif self.spec != "motion-accuracy":
            if not Path(self.spec).expanduser().is_dir():
                raise UserError(f"--reward {self.spec!r}: use {' | '.join(REWARDS)} or a VideoAlign reward folder")
            from ..teachers.rewards import VideoAlignReward

            self.model = VideoAlignReward(self.spec).freeze()

    @torch.no_grad()
    def __call__(self, videos: Tensor, prompts: list[str]) -> Tensor:
        if self.model is None:
            from ..world.video_metrics import motion_accuracy

            return motion_accuracy(videos.float().clamp(0, 1), list(prompts), per_clip=True).double()
        s = self.model.scores(videos.float().clamp(0, 1), list(prompts)).double()  # [B,3]
        return (s * self.axes).sum(1) / self.axes.abs().sum()


def load_outcome_reward(spec: str, axes=(1.0, 1.0, 1.0)) -> OutcomeReward:
    return OutcomeReward(spec, axes)


def full_finetune_policy(teacher):
    """A copy of ``teacher`` whose denoiser weights all train (the original stays the frozen reference)."""
    policy = copy.deepcopy(teacher)
    for p in policy.denoiser.parameters():
        p.requires_grad_(True)
    policy.trainable_parameters = lambda: [p for p in policy.denoiser.parameters() if p.requires_grad]
    return policy


def _policy_folder(spec: str) -> Path:
    """The diffusers folder a full fine-tune copies (a folder, or the shipped ShapeWorld video model)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    from ..teachers.shapeworld_video import TRAINED_NAME

    if spec.strip().lower() == TRAINED_NAME:
        from ..assets import shipped_model_path

        return shipped_model_path(TRAINED_NAME, "train_shapeworld_video_teacher.py")
    raise UserError(f"--finetune full writes the policy as a diffusers folder and needs --policy to be one (or "
                    f"shapeworld-video-wan); {spec!r} is not: download it first or use --finetune lora")


def write_full_student(folder: Path, policy, source: str, info: dict) -> Path:
    """A complete diffusers folder: the policy's own files with its denoiser replaced by the trained one."""
    src = _policy_folder(source)
    sub = "transformer" if (src / "transformer").is_dir() else "unet"
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(src, folder, ignore=lambda d, names: names if Path(d) == src / sub else [])
    policy.denoiser.save_pretrained(str(folder / sub), safe_serialization=True)
    (folder / "rl.json").write_text(json.dumps(info, indent=2, default=str))
    return folder


@torch.no_grad()
def evaluate_policy(model, prompts: list[str], reward: OutcomeReward, *, steps: int, guidance_scale: float,
                    samples: int = 2, seed: int = 0) -> dict:
    """Held-out evaluation of the plain sampler (flow Euler, no reward model): mean outcome reward and, for
    ShapeWorld prompts, the ground-truth metrics, on ``samples`` fixed seeds per prompt."""
    from .video_generate import sample_videos, shapeworld_metrics

    t0 = time.perf_counter()
    plist = [p for p in prompts for _ in range(int(samples))]
    videos = torch.cat([sample_videos(model, [p] * int(samples), sampler="flow", steps=int(steps),
                                      guidance_scale=guidance_scale, seed=seed + 97 * i)
                        for i, p in enumerate(prompts)])
    out: dict[str, Any] = {"reward": round(float(reward(videos, plist).mean()), 5)}
    gt = shapeworld_metrics(videos, plist)
    if gt is not None:
        out.update({k: v for k, v in gt.items() if isinstance(v, float)})
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


class VideoRLMethod(Method):
    """Base of video RL methods; subclasses set ``name``, ``description``, ``paper``, ``Config`` and implement
    ``stages(cfg, policy, reference, reward, prompts, evaluator)``."""

    name = "base"
    kind = "video-rl"
    kind_title = "Video RL"
    description = ""
    paper = ""
    Config = VideoRLConfig
    input = None  # a prompt set: the run folder is --out itself
    verb = ("video", "rl")
    default_out = "outputs/video-rl"

    def stages(self, cfg, policy, reference, reward: OutcomeReward, prompts: list[str], evaluator) -> list:
        raise NotImplementedError  # pragma: no cover - abstract

    def validate(self, cfg: VideoRLConfig) -> None:
        if cfg.steps < 1 or cfg.sampling_steps < 2:
            raise UserError(f"--steps must be >= 1 and --sampling-steps >= 2, got {cfg.steps}, {cfg.sampling_steps}")
        if cfg.eval_samples < 1:
            raise UserError(f"--eval-samples must be >= 1, got {cfg.eval_samples}")
        split_prompts(resolve_prompts(cfg.prompts), cfg.held_out_every)
        if cfg.reward not in REWARDS and not Path(cfg.reward).expanduser().is_dir():
            raise UserError(f"--reward {cfg.reward!r}: use {' | '.join(REWARDS)} or a VideoAlign reward folder")
        if cfg.finetune == "full":
            _policy_folder(cfg.policy)

    def resolve(self, cfg):
        if cfg.guidance_scale is None:
            from ..teachers.registry import default_guidance

            cfg.guidance_scale = float(default_guidance(cfg.policy, "sample_video"))
        return cfg

    def run(self, cfg: VideoRLConfig, run_dir: Path, *, callbacks=None, resume: bool = False,
            progress: bool = True) -> dict:
        from ..students.video_lora import VideoLoRAStudent
        from ..teachers.registry import load_video_teacher
        from .video_generate import write_student

        cfg = self.resolve(cfg)
        torch.manual_seed(cfg.seed)
        reference = load_video_teacher(cfg.policy)
        if not reference.schedule.is_flow:
            raise UserError(f"--policy {cfg.policy}: the flow SDE of GRPO needs a flow-matching model (rectified "
                            f"flow, e.g. Wan); this one predicts {reference.schedule.prediction_type}")
        train_prompts, held_out = split_prompts(resolve_prompts(cfg.prompts), cfg.held_out_every)
        reward = load_outcome_reward(cfg.reward, cfg.reward_axes)
        if cfg.finetune == "lora":
            policy = VideoLoRAStudent(reference, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
        else:
            policy = full_finetune_policy(reference)
        g = float(cfg.guidance_scale)

        def evaluator(model=policy) -> dict:
            """Held-out evaluation of ``model`` (default: the policy being trained) with the plain sampler."""
            return evaluate_policy(model, held_out, reward, steps=cfg.sampling_steps, guidance_scale=g,
                                   samples=cfg.eval_samples, seed=cfg.eval_seed)

        before = evaluator(reference)  # the frozen reference (the LoRA adapter is off outside student calls)
        stages = self.stages(cfg, policy, reference, reward, train_prompts, evaluator)
        history, seconds = train_stages(stages, run_dir, seed=cfg.seed, callbacks=callbacks, resume=resume,
                                        progress=progress, grad_accum=cfg.grad_accum,
                                        max_grad_norm=cfg.max_grad_norm, checkpoint_every=cfg.checkpoint_every,
                                        preview_every=max(10, cfg.steps // 10))
        sampler = {"sampler": "flow", "steps": int(cfg.sampling_steps), "guidance_scale": g}
        info = {"method": self.name, "train_steps": cfg.steps, "reward_model_at_inference": False}
        if cfg.finetune == "lora":
            folder = write_student(Path(run_dir) / "student", policy, teacher=cfg.policy, sampler=sampler, info=info)
        else:
            folder = write_full_student(Path(run_dir) / "student", policy, cfg.policy, {**info, "sampler": sampler})
        after = evaluator()
        curve = [row for st in stages for row in getattr(st, "curve", [])]
        metrics: dict[str, Any] = {
            "method": self.name, "policy": cfg.policy, "finetune": cfg.finetune, "steps": cfg.steps,
            "train_seconds": round(seconds, 2), "seconds_per_step": round(seconds / max(cfg.steps, 1), 3),
            "final_loss": history[-1]["loss"] if history else None, "student": str(folder),
            "train_prompts": len(train_prompts), "held_out_prompts": held_out,
            "eval_before": before, "eval_after": after, "curve": curve, "inference_uses_reward_model": False}
        if cfg.eval_steps:
            from .video_generate import load_video_model

            model, _ = load_video_model(folder)
            metrics["eval_rows"] = evaluate_video_model(model, held_out, cfg.eval_steps,
                                                        {"sampler": "flow", "guidance_scale": g},
                                                        seed=cfg.eval_seed)
        metrics["headline"] = {"reward_before": before["reward"], "reward_after": after["reward"],
                               **({"motion_accuracy_before": before["motion_accuracy"],
                                   "motion_accuracy_after": after["motion_accuracy"]}
                                  if "motion_accuracy" in before else {})}
        return metrics

    def summary(self, metrics: dict, run_dir: Path) -> str:
        head = json.dumps(metrics.get("headline", {}), indent=2, default=str) + "\n" if metrics.get("headline") else ""
        return f"{head}done in {metrics['train_seconds']:.0f}s; student: {metrics.get('student', run_dir)}"


__all__ = ["OutcomeReward", "PROMPT_SETS", "REWARDS", "VideoRLConfig", "VideoRLMethod", "evaluate_policy",
           "full_finetune_policy", "load_outcome_reward", "split_prompts", "write_full_student"]
