"""Video LCM: latent consistency distillation of a text-to-video teacher into a LoRA on its own denoiser.

The baseline of MCM (arXiv 2406.06890; MCM with the ``raw`` motion representation, no discriminator and no mixed
trajectories) and of AnimateLCM-style few-step video generators. Algorithm (per step; spec 1.1 / 2.4)::

    x0, c   <- a batch of training clips (teacher latents) and captions
    n ~ U{0..49};  t_s = tau_n;  t_e = max(t_s - 20, 0);  w ~ U[w_min, w_max]
    y       = f_theta(x_s, t_s)                         student (LoRA on), the only forward with grad
    x_e     = DDIM(teacher_cfg(x_s, t_s, c, w))         teacher (LoRA off), no grad
    y^-     = f_sg(theta)(x_e, t_e)                     the student itself under stop-grad (LoRA: no EMA)
    L       = pseudo-Huber(y, y^-)

Inference: the merged LoRA with multistep consistency sampling (LCM scheduler) at 1-8 steps, guidance 1 (CFG is
distilled in). Everything above is :func:`studio.distill.consistency.latent_consistency_loss`; this file only
wires it into a stage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.distill.consistency import latent_consistency_loss
from studio.train.loop import StepOutput
from studio.runs.video_distill import VideoDistillConfig, VideoDistillMethod


@dataclass
class VideoLCMConfig(VideoDistillConfig):
    w_min: float = 5.0
    """teacher guidance in the LCM form pred = cond + w (cond - uncond), w ~ U[w_min, w_max] (MCM: 5..15)"""
    w_max: float = 15.0
    timestep_scaling: float = 4.0
    """lambda of the boundary scalings c_skip / c_out (MCM's scripts: 4; diffusers: 10)"""
    num_ddim_timesteps: int = 50
    huber_c: float = 0.001
    loss: str = "huber"
    """huber | l2"""


class ConsistencyStage:
    """One stage of (video) latent consistency distillation; subclasses add terms (MCM)."""

    name = "lcd"
    #: ``(phi, phi_target)`` motion representation of the consistency distance (None: identity = video LCM)
    motion_pair = None

    def __init__(self, cfg: VideoLCMConfig, teacher, student, data):
        self.cfg, self.teacher, self.student, self.data = cfg, teacher, student, data
        self.steps = int(cfg.steps)
        self.gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
        self.opt = torch.optim.AdamW(student.trainable_parameters(), lr=cfg.lr, weight_decay=0.0)

    def optimizers(self) -> dict:
        return {"generator": self.opt}

    def consistency(self, x0, cond):
        c = self.cfg
        return latent_consistency_loss(self.student, self.teacher, x0, cond, w_range=(c.w_min, c.w_max),
                                       num_ddim_timesteps=c.num_ddim_timesteps, timestep_scaling=c.timestep_scaling,
                                       loss=c.loss, huber_c=c.huber_c, generator=self.gen, motion=self.motion_pair)

    def train_step(self, step: int, progress: float) -> StepOutput:
        x0, prompts = self.data.batch(step, self.cfg.batch_size)
        cond = self.teacher.encode_prompt(prompts)
        loss, info = self.consistency(x0, cond)
        return StepOutput(loss, logs={"t_start": float(info["t_start"].float().mean())})

    def after_step(self, step: int, out: StepOutput) -> None:
        pass

    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "generator_rng": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.gen.set_state(state["generator_rng"])

    @torch.no_grad()
    def preview(self):
        """One-step sample of the first prompt: the frames side by side ``[H, F*W, 3]``."""
        from studio.teachers.sampling import lcm_sample

        v = lcm_sample(self.student, [self.data.prompts[0]], steps=1, seed=0,
                       timestep_scaling=self.cfg.timestep_scaling)[0]  # [F,3,H,W]
        return v.permute(2, 0, 3, 1).reshape(v.shape[2], -1, 3)


class VideoLCMMethod(VideoDistillMethod):
    default_for_verb = True
    name = "lcm"
    description = "Video latent consistency distillation into a LoRA student (LCM / MCM's raw baseline)"
    paper = "https://arxiv.org/abs/2310.04378"
    Config = VideoLCMConfig

    def sampler(self, cfg: VideoLCMConfig) -> dict:
        return {"sampler": "lcm", "steps": 4, "guidance_scale": 1.0, "timestep_scaling": cfg.timestep_scaling,
                "original_steps": cfg.num_ddim_timesteps}

    def stages(self, cfg: VideoLCMConfig, teacher, student, data) -> list:
        return [ConsistencyStage(cfg, teacher, student, data)]
