"""Stream-R1: reliability-perplexity aware reward distillation of a causal streaming video generator
(arXiv 2605.03849; spec ``video_methods.md`` 1.2, 1.3, 3). Presets of the same method: ``dmd`` (Self-Forcing DMD,
beta = 0, W = 1), ``reward-forcing`` (Reward Forcing's Re-DMD: exp(beta r_MQ), no W) and ``stream-r1``.

Algorithm box::

    G  <- causal copy of the teacher (block-causal Wan, KV cache with rolling window + sinks)
    critic <- bidirectional trainable copy of the teacher;  real score = the teacher, frozen
    Stage 1 (ODE-regression init, Self-Forcing ode_init):
        pairs <- teacher ODE trajectories from seeded noise, stored at the rollout levels [1000, 750, 500, 250]
        L_ode = || G(blocks of the trajectory at random levels, block-causal) - x0_teacher ||^2
    Stage 2 (DMD, two time scales: the critic steps every iteration, G every `update_ratio`-th):
        if step % update_ratio == 0:                                              # generator
            x  <- Self-Forcing rollout of G (grad only at one random exit step, shared by the blocks)
            P  <- decode(x) [no grad];  r, S <- reward(P) [z-scored axes, pixel saliency; numbers only]
            r_final <- base(r) - balance penalty;   W <- intra-perplexity weights of S
            g  <- normalised DMD gradient (real score with CFG, critic conditional, shifted t in [20, 980])
            L_G = 0.5 exp(beta r_final) mean(W (x - sg(x - g))^2)
        x' <- rollout of G on other prompts [no grad];  L_critic = flow-matching loss of the critic on x'
    Inference: the EMA generator (0.99 from `ema_start` generator updates), the same causal rollout, streamed.

Every term is a pure function of ``studio.distill`` (:mod:`~studio.distill.dmd`, :mod:`~studio.distill.reward_weighting`,
:mod:`~studio.distill.ode_regression`); the networks come from :func:`studio.students.causal_video.build_stream_networks`
and the rewards from :func:`studio.teachers.rewards.load_reward`; the update ratio is the Trainer's loss dict.

CPU recipe (the embedded default, ``shapeworld-video-wan``: 8 pixel frames of 32 px): blocks of 2 frames, a window
of 6 frames with 2 sinks (Stream-R1's 3 / 9 / 3 scaled to 8 frames), learning rates for a batch of 1 on a 0.6 M
parameter model instead of 2e-6 / 4e-7 at 64 rollouts of a 1.3 B model. Everything else is the shipped config.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from studio.distill.dmd import dmd_critic_loss, dmd_gradient
from studio.distill.ode_regression import ode_regression_loss
from studio.distill.reward_weighting import AXES, preset, reward_weighted_dmd_loss
from studio.errors import UserError
from studio.runs.video_distill import VideoDistillConfig, VideoDistillMethod
from studio.students.causal_video import build_stream_networks, teacher_ode_pairs
from studio.students.ema import EMA
from studio.train.loop import StepOutput


@dataclass
class StreamR1Config(VideoDistillConfig):
    preset: Literal["stream-r1", "reward-forcing", "dmd"] = "stream-r1"
    """stream-r1 (exp(beta r) with the balanced reward + W) | reward-forcing (exp(beta r_MQ), no W) | dmd (beta 0, W 1)"""
    reward: str = "shapeworld"
    """reward model: shapeworld (differentiable ShapeWorld reward) | a VideoReward (VideoAlign) folder"""
    steps: int = 40
    """DMD iterations (the critic steps every iteration, the generator every update_ratio-th)"""
    batch_size: int = 1
    lr: float = 2e-4
    """generator learning rate (AdamW, betas (0, 0.999); Stream-R1: 2e-6 at 64 rollouts of a 1.3B model)"""
    critic_lr: float = 2e-4
    """critic learning rate (Stream-R1: 4e-7)"""
    lora_rank: int = 0
    """0 = full fine-tuning of the generator (Stream-R1); > 0 = a LoRA of that rank on its copy"""
    critic_lora_rank: int = 0
    """0 = full fine-tuning of the critic; > 0 = a LoRA"""
    update_ratio: int = 5
    """critic updates per generator update (dfake_gen_update_ratio)"""
    guidance_scale: float = 4.0
    """real-score CFG, house convention u + w (c - u) (Stream-R1's guidance_scale 3 is 4 here)"""
    negative: str = ""
    """negative prompt of the real score's CFG"""
    timestep_shift: float = 5.0
    """shift of the DMD timestep sampler (t clamped to [20, 980])"""
    block_size: int = 2
    """latent frames per block (Stream-R1: 3 of 21)"""
    local_attn_size: int = 6
    """latent frames a block attends to in all (sinks + recent + itself); 0 = the whole video (Stream-R1: 9)"""
    sink_size: int = 2
    """first latent frames kept for ever in the window (Stream-R1: 3)"""
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    """per-block denoising steps of the rollout (Self-Forcing's list)"""
    beta: float | None = None
    """inter-reliability strength; None = the preset's (2, or 0 for dmd)"""
    balance_window: int = 50
    balance_warmup: int = 50
    """generator calls before the balance penalty starts (Stream-R1: 50)"""
    ema_decay: float = 0.99
    ema_start: int = 200
    """generator updates before the EMA starts averaging (Stream-R1: 200)"""
    init: str = ""
    """a causal student folder (e.g. of an earlier run's ODE init) to start the generator from; skips the ODE stage"""
    ode_steps: int = 150
    """ODE-regression initialisation steps (0 = none: start from the teacher's weights)"""
    ode_pairs: int = 32
    """teacher ODE trajectories in the initialisation set"""
    ode_substeps: int = 4
    """Euler steps of the teacher ODE between consecutive rollout levels"""
    ode_lr: float = 1e-3
    ode_batch_size: int = 4
    eval_steps: tuple[int, ...] = (4,)
    """denoising steps per block at which the student is evaluated"""


# ------------------------------------------------------------------------------------------ stage 1
class ODEInitStage:
    """Self-Forcing's ODE-regression initialisation of the causal generator from teacher ODE trajectories."""

    name = "ode-init"

    def __init__(self, cfg: StreamR1Config, teacher, generator, prompts: list[str]):
        self.cfg, self.teacher, self.generator = cfg, teacher, generator
        self.steps = int(cfg.ode_steps)
        gen = torch.Generator().manual_seed(int(cfg.seed) + 11)
        self.prompts = [prompts[int(i)] for i in torch.randint(len(prompts), (int(cfg.ode_pairs),), generator=gen)]
        self.gen = torch.Generator().manual_seed(int(cfg.seed) + 12)
        self.opt = torch.optim.AdamW(generator.trainable_parameters(), lr=cfg.ode_lr, betas=(0.0, 0.999),
                                     weight_decay=0.0)
        self._pairs = None

    def optimizers(self) -> dict:
        return {"generator": self.opt}

    def pairs(self):
        """The teacher's ODE trajectories of the initialisation prompts (deterministic; made on first use)."""
        if self._pairs is None:
            c, trajs, ts = self.cfg, [], None
            for i in range(0, len(self.prompts), 8):
                p = teacher_ode_pairs(self.teacher, self.prompts[i:i + 8], denoising_steps=c.denoising_steps,
                                      substeps=c.ode_substeps, guidance_scale=c.guidance_scale,
                                      seed=int(c.seed) * 7919 + i, negative=c.negative)
                trajs.append(p.trajectory)
                ts = p.timesteps
            self._pairs = (torch.cat(trajs), ts)
        return self._pairs

    def train_step(self, step: int, progress: float) -> StepOutput:
        traj, ts = self.pairs()
        idx = torch.randint(traj.shape[0], (int(self.cfg.ode_batch_size),), generator=self.gen)
        cond = self.teacher.encode_prompt([self.prompts[int(i)] for i in idx], self.cfg.negative)
        loss = ode_regression_loss(self.generator, traj[idx], ts, cond, generator=self.gen, clean_context=True)
        return StepOutput({"generator": loss})

    def after_step(self, step: int, out: StepOutput) -> None:
        pass

    def state_dict(self) -> dict:  # the generator's weights are saved once, by the DMD stage that follows
        return {"rng": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["rng"])

    def preview(self):
        return None


# ------------------------------------------------------------------------------------------ stage 2
class StreamR1Stage:
    """Reward-weighted DMD with the two-time-scale update rule (see the module's algorithm box)."""

    name = "dmd"

    def __init__(self, cfg: StreamR1Config, teacher, generator, critic, reward, prompts: list[str]):
        self.cfg, self.real, self.generator, self.critic, self.reward = cfg, teacher, generator, critic, reward
        self.prompts = list(prompts)
        self.steps = int(cfg.steps)
        over = {"balance_window": cfg.balance_window, "balance_warmup": cfg.balance_warmup}
        if cfg.beta is not None:
            over["beta"] = float(cfg.beta)
        self.weighting = preset(cfg.preset, **over)
        self.tracker = self.weighting.tracker()
        self.gen = torch.Generator().manual_seed(int(cfg.seed) + 21)
        betas = (0.0, 0.999)
        self.opt_g = torch.optim.AdamW(generator.trainable_parameters(), lr=cfg.lr, betas=betas, weight_decay=0.0)
        self.opt_c = torch.optim.AdamW(critic.trainable_parameters(), lr=cfg.critic_lr, betas=betas, weight_decay=0.0)
        self.ema = EMA(generator.denoiser, cfg.ema_decay, warmup=False, start_step=cfg.ema_start,
                       trainable_only=True)

    def optimizers(self) -> dict:
        return {"generator": self.opt_g, "critic": self.opt_c}

    def emas(self) -> dict:
        return {"generator_ema": self.ema}

    # -- pieces of one iteration
    def draw_prompts(self, step: int, role: int) -> list[str]:
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + 2 * int(step) + role)
        return [self.prompts[int(i)] for i in torch.randint(len(self.prompts), (int(self.cfg.batch_size),), generator=g)]

    def rollout_seed(self, step: int, role: int) -> int:
        return int(self.cfg.seed) * 1_000_003 + 2 * int(step) + role + 500_000

    @torch.no_grad()
    def score(self, latents: torch.Tensor, prompts: list[str]):
        """``(rewards [B,3], saliency [B,3,F,H,W] or None)`` of the decoded rollout, as detached numbers (no
        gradient path from the reward model to the generator); ``(None, None)`` when the weighting needs none."""
        w = self.weighting
        if w.beta == 0 and not w.spatial:
            return None, None
        pixels = self.real.decode(latents.detach()).float()
        if w.spatial:
            return self.reward.saliency(pixels, prompts)
        return self.reward.scores(pixels, prompts).detach(), None

    def generator_loss(self, step: int) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        prompts = self.draw_prompts(step, 0)
        cond = self.real.encode_prompt(prompts, c.negative)
        x = self.generator.rollout(cond, seed=self.rollout_seed(step, 0), grad_exit_step="random")
        rewards, saliency = self.score(x, prompts)
        dmd = dmd_gradient(self.real, self.critic, x, cond, guidance_scale=c.guidance_scale, fake_guidance_scale=1.0,
                           shift=c.timestep_shift, generator=self.gen)
        out = reward_weighted_dmd_loss(x, dmd.grad, self.weighting, rewards=rewards, saliency=saliency,
                                       tracker=self.tracker)
        logs = {"dmd_t": float(dmd.dmd_t.mean()), "sample_weight": float(out.sample_weight.mean()),
                "r_final": float(out.r_final.mean()), "balance_penalty": float(out.penalty.mean())}
        if rewards is not None:
            logs.update({f"reward_{a}": float(rewards[:, i].mean()) for i, a in enumerate(AXES)})
        return out.loss, logs

    def critic_loss(self, step: int) -> torch.Tensor:
        c = self.cfg
        prompts = self.draw_prompts(step, 1)
        cond = self.real.encode_prompt(prompts, c.negative)
        with torch.no_grad():
            x = self.generator.rollout(cond, seed=self.rollout_seed(step, 1))
        return dmd_critic_loss(self.critic, x, cond, shift=c.timestep_shift, generator=self.gen).loss

    # -- the Stage protocol
    def train_step(self, step: int, progress: float) -> StepOutput:
        losses, logs = {}, {}
        if step % int(self.cfg.update_ratio) == 0:
            losses["generator"], logs = self.generator_loss(step)
        losses["critic"] = self.critic_loss(step)
        logs["critic_loss"] = float(losses["critic"].detach())
        return StepOutput(losses, logs=logs)

    def after_step(self, step: int, out: StepOutput) -> None:
        pass

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "critic": self.critic.state_dict(),
                "rng": self.gen.get_state(), "balance": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.critic.load_state_dict(state["critic"])
        self.gen.set_state(state["rng"])
        self.tracker.load_state_dict(state["balance"])

    @torch.no_grad()
    def preview(self):
        v = self.generator.rollout([self.prompts[0]], seed=0, output="decoded")[0]  # [F,3,H,W]
        return v.permute(2, 0, 3, 1).reshape(v.shape[2], -1, 3)


def load_causal_weights(generator, folder: str) -> None:
    """Start ``generator`` from a causal student folder (its ``student.safetensors``; same teacher, same full / LoRA
    choice), as Stream-R1 starts from Self-Forcing's ``ode_init.pt``."""
    import json
    from pathlib import Path

    meta_file = Path(folder) / "student.json"
    if not meta_file.is_file():
        raise UserError(f"--init {folder}: not a student folder (no student.json); give the student/ folder of an "
                        f"earlier stream-r1 run")
    meta = json.loads(meta_file.read_text())
    if meta.get("student") != "causal-wan":
        raise UserError(f"--init {folder}: a {meta.get('student', 'LoRA')} student, not a causal one")
    generator.load(Path(folder) / meta.get("weights", "student.safetensors"))


# ------------------------------------------------------------------------------------------ the method
class StreamR1Method(VideoDistillMethod):
    """Stream-R1 / Reward Forcing / Self-Forcing DMD into a causal streaming student (module doc)."""

    name = "stream-r1"
    default_for_verb = False
    description = ("Stream-R1: reward-weighted DMD (inter-reliability exp(beta r), intra-perplexity W) of a causal "
                   "streaming student with a KV cache; presets dmd (Self-Forcing) and reward-forcing")
    paper = "https://arxiv.org/abs/2605.03849"
    Config = StreamR1Config

    def validate(self, cfg: StreamR1Config) -> None:
        super().validate(cfg)
        if cfg.update_ratio < 1:
            raise UserError(f"--update-ratio must be >= 1, got {cfg.update_ratio}")
        if cfg.block_size < 1 or cfg.sink_size < 0 or cfg.local_attn_size < 0:
            raise UserError("--block-size must be >= 1 and --sink-size / --local-attn-size >= 0")
        if cfg.ode_steps < 0 or cfg.ode_pairs < 1 or cfg.ode_batch_size < 1:
            raise UserError("--ode-steps must be >= 0 and --ode-pairs / --ode-batch-size >= 1")
        if cfg.lora_rank < 0 or cfg.critic_lora_rank < 0:
            raise UserError("--lora-rank / --critic-lora-rank must be >= 0 (0 = full fine-tuning)")

    def sampler(self, cfg: StreamR1Config) -> dict:
        return {"sampler": "causal", "steps": len(cfg.denoising_steps), "guidance_scale": 1.0}

    def make_student(self, cfg: StreamR1Config, teacher):
        self._nets = build_stream_networks(
            teacher, block_size=cfg.block_size, local_attn_size=cfg.local_attn_size or None,
            sink_size=cfg.sink_size, lora_rank=cfg.lora_rank or None, critic_lora_rank=cfg.critic_lora_rank or None,
            lora_alpha=cfg.lora_alpha, seed=cfg.seed)
        gen = self._nets.generator
        gen.denoising_steps = tuple(int(s) for s in cfg.denoising_steps)
        if cfg.init:
            load_causal_weights(gen, cfg.init)
        return gen

    def stages(self, cfg: StreamR1Config, teacher, student, data) -> list:
        from studio.teachers.rewards import load_reward

        reward = load_reward(cfg.reward, device=teacher.device)
        stages = [ODEInitStage(cfg, teacher, student, data.prompts)] if cfg.ode_steps and not cfg.init else []
        self._dmd = StreamR1Stage(cfg, teacher, student, self._nets.critic, reward, data.prompts)
        return stages + [self._dmd]

    def export(self, cfg: StreamR1Config, stages: list, student):
        dmd = getattr(self, "_dmd", None)
        return dmd.ema.applied() if dmd is not None and dmd.ema.num_updates else contextlib.nullcontext()
