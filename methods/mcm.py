"""MCM: Motion Consistency Model (Zhai et al., NeurIPS 2024, arXiv 2406.06890), as a recipe on the video LCM.

Algorithm box (spec 2.4-2.5; one training step)::

    x0, c    <- training clips (latents) and captions              (video LCM data; LQ clips in quality mode)
    if D on and u < p_mix:  x0 <- sg(student x0-prediction from pure noise at t = 999)   (mixed trajectories)
    L_cd, y  <- latent consistency loss on phi_psi(y) vs phi_psi^-(y^-)                  (motion consistency)
    L_adv    <- -mean D(decode(y at 2 random frames), text(c))                          (image discriminator)
    G step:  L_G = L_cd + lambda_adv L_adv         -> LoRA and the motion head psi
    D step:  L_D = floored-WGAN(D(real frames), D(decode(sg y))) + gp_weight * GP       -> discriminator heads
    psi^-    <- EMA(psi, 0.95)

Real frames for D: ``real_images="video"`` (distillation only: 2 TSN-sampled frames of the same training clips,
with their captions) or ``"hq"`` (quality improvement: a separate high-quality image set with its own captions;
on ShapeWorld :func:`studio.world.clips.hq_images`, drawn for the batch's objects). D reads the same kind of
caption on both sides (:meth:`MCMStage.fake_captions`): in ``hq`` mode the fake frames are captioned with their
object (``"a red ball"``), as the HQ images are, not with the video prompt (``"a red ball moving left"``), which
would let D separate them by the caption alone. Each step logs the motion head's collapse monitor
(``motion_norm_ratio``, ``motion_std_ratio``; :meth:`MCMStage.collapse_monitor`). Inference: the merged LoRA with LCM multistep sampling, CFG
distilled in (guidance 1); the motion head is a training-time construct.

Substitutions and reconstructed choices (documented, configurable):

* **Text condition of D**: MCM projects an OpenCLIP ViT-g-14 text embedding; here D uses the teacher's own text
  encoder, mean-pooled over the prompt's tokens (no extra 1.4 B-parameter model on CPU).
* **Feature backbone**: ``backbone="shapeworld"`` is a fixed seeded conv net (ShapeWorld); ``"dinov2:<path or id>"``
  is DINOv2 through transformers (MCM: ViT-S/14, blocks 2/5/8/11).
* **Learning rates**: MCM scales ``5e-6 * batch/128`` (G) and ``5e-5 * 2 batch/128`` (D) for a 1.7 B UNet at batch
  128; the CPU recipe uses ``lr`` / ``disc_lr`` directly (D 2x G by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods.video_lcm import ConsistencyStage, VideoLCMConfig, VideoLCMMethod
from studio.distill.adversarial import (
    AdaptiveGPWeight,
    Dinov2Backbone,
    ProjectedDiscriminator,
    ShapeWorldFeatureBackbone,
    d_loss,
    decode_random_frames,
    g_loss,
    gradient_penalty,
    tsn_frame_indices,
    video_frames,
)
from studio.distill.consistency import mixed_trajectory_x0
from studio.distill.motion import make_motion, motion_norm_ratio
from studio.errors import UserError
from studio.world.clips import parse_video_prompt
from studio.train.loop import StepOutput


@dataclass
class MCMConfig(VideoLCMConfig):
    motion: str = "learn"
    """motion representation phi: raw | diff | freq_low | freq_high | learn (MCM default) | hlearn"""
    motion_ema: float = 0.95
    disc: bool = True
    """train with the image discriminator (False + mix_p 0 + motion raw = video LCM)"""
    disc_weight: float = 1.0
    """lambda_adv"""
    disc_loss: str = "wgan"
    """wgan (floored, MCM) | hinge | bce"""
    disc_lr: float = 2e-4
    disc_start_step: int = 0
    gp_weight: float = 1e-5
    """gradient-penalty weight (adaptive: x5 after 500 steps with penalty >= 100)"""
    mix_p: float = 0.5
    """probability of starting the trajectory from the student's own one-step sample (while D is on)"""
    real_images: str = "video"
    """video (distillation only: frames of the training clips) | hq (quality improvement: high-quality images)"""
    backbone: str = "shapeworld"
    """shapeworld | dinov2:<path or HF id>"""
    frames_per_clip: int = 2


def pooled_text(cond, negative: bool = False) -> torch.Tensor:
    """Mean over the non-zero token embeddings ``[B, D]`` of a TextCond (the discriminator's text condition)."""
    e = cond.negative_embeds if negative else cond.embeds
    if e.dim() == 2:
        return e.float()
    keep = (e.abs().sum(-1, keepdim=True) > 0).to(e.dtype)
    return ((e * keep).sum(1) / keep.sum(1).clamp_min(1)).float()


def image_caption(prompt: str) -> str:
    """The caption :func:`~studio.world.clips.hq_images` gives an image of a video prompt's object: ``"a red ball"``
    for ``"a red ball moving left, camera panning right"`` (one frame shows shape and colour, not motion); a prompt
    outside the ShapeWorld grammar is returned as it is."""
    try:
        shape, color, _, _ = parse_video_prompt(prompt)
    except UserError:
        return prompt
    return f"a {color} {shape}"


def make_backbone(spec: str):
    if spec == "shapeworld":
        return ShapeWorldFeatureBackbone()
    if spec.startswith("dinov2:"):
        return Dinov2Backbone(spec.split(":", 1)[1])
    raise UserError(f"--backbone {spec!r}: use shapeworld or dinov2:<folder or Hugging Face id>")


class MCMStage(ConsistencyStage):
    name = "mcm"

    def __init__(self, cfg: MCMConfig, teacher, student, data):
        super().__init__(cfg, teacher, student, data)
        if cfg.real_images not in ("video", "hq"):
            raise UserError(f"--real-images must be video or hq, got {cfg.real_images!r}")
        self.motion = make_motion(cfg.motion, teacher.latent_channels, ema_decay=cfg.motion_ema, seed=cfg.seed)
        self.motion_pair = (self.motion.phi, self.motion.phi_target)
        head = list(self.motion.phi.parameters())
        self.opt = torch.optim.AdamW(student.trainable_parameters() + head, lr=cfg.lr, weight_decay=0.0)
        self.disc = None
        if cfg.disc:
            text_dim = pooled_text(teacher.encode_prompt([data.prompts[0] if data.prompts else ""])).shape[-1]
            self.disc = ProjectedDiscriminator(make_backbone(cfg.backbone), text_dim, seed=cfg.seed).to(teacher.device)
            self.opt_d = torch.optim.AdamW(self.disc.trainable_parameters(), lr=cfg.disc_lr, betas=(0.9, 0.999))
            self.gp = AdaptiveGPWeight(cfg.gp_weight)

    def optimizers(self) -> dict:
        return {"generator": self.opt, **({"discriminator": self.opt_d} if self.disc is not None else {})}

    def emas(self) -> dict:
        ema = getattr(self.motion.phi_target, "ema", None)
        return {"motion_target": ema} if ema is not None else {}

    def fake_captions(self, prompts: list[str]) -> list[str]:
        """The caption D reads with each clip's fake frames, the same kind its real frames carry: ``video`` mode
        the clip's prompt (the real frames are that clip's); ``hq`` mode the image caption of the clip's object
        (``"a red ball"``, as :func:`~studio.world.clips.hq_images` captions its images), so the caption alone
        never tells real from fake. Prompts outside the ShapeWorld grammar are kept as they are."""
        if self.cfg.real_images == "video":
            return list(prompts)
        return [image_caption(p) for p in prompts]

    def real_frames(self, step: int, video, prompts: list[str], n: int):
        """Real images for D and their captions: ``k`` TSN frames of each clip with its prompt, or (``hq``) ``n``
        high-quality images of the same objects as the batch's clips (``k`` per clip) with their image captions."""
        k = self.cfg.frames_per_clip
        if self.cfg.real_images == "video":
            idx = tsn_frame_indices(video.shape[1], k, self.gen)
            return video_frames(video, idx).to(self.teacher.device), [p for p in prompts for _ in range(k)]
        from studio.world.clips import hq_images

        objects = [p for p in prompts for _ in range(k)]
        try:
            images, captions = hq_images(n, seed=self.cfg.seed * 7919 + step, size=self.data.size,
                                         prompts=objects if len(objects) == n else None)
        except UserError:   # prompts outside the ShapeWorld grammar: objects drawn uniformly
            images, captions = hq_images(n, seed=self.cfg.seed * 7919 + step, size=self.data.size)
        return images.to(self.teacher.device), captions

    @torch.no_grad()
    def collapse_monitor(self, y: torch.Tensor) -> dict[str, float]:
        """Spec 2.9's monitor of the learned motion head: ``motion_norm_ratio = ||phi(y)|| / ||y||`` (1 at init,
        towards 0 if ``h -> -z``) and ``motion_std_ratio`` = the spread of ``phi(y)`` across the batch over that of
        ``y`` (mean per-element std over the batch; over all elements for a batch of one): 1 at init, towards 0
        if phi collapses to a map that forgets its input (``h(z) -> c - z``), whatever its norm."""
        y = y.detach().float()
        phi = self.motion.phi
        out = phi(y).float()
        if y.shape[0] >= 2:
            num, den = float(out.flatten(1).std(0).mean()), float(y.flatten(1).std(0).mean())
        else:
            num, den = float(out.std()), float(y.std())
        return {"motion_norm_ratio": motion_norm_ratio(phi, y), "motion_std_ratio": num / den if den > 0 else math.nan}

    def train_step(self, step: int, progress: float) -> StepOutput:
        c = self.cfg
        x0_real, prompts, video = self.data.batch(step, c.batch_size, with_video=True)
        cond = self.teacher.encode_prompt(prompts)
        d_on = self.disc is not None and step >= c.disc_start_step
        x0, mixed = x0_real, False  # MCM mixes trajectories only while the discriminator is active
        if d_on:
            x0, mixed = mixed_trajectory_x0(self.student, cond, x0_real, p=c.mix_p, generator=self.gen,
                                            num_ddim_timesteps=c.num_ddim_timesteps)
        l_cd, info = self.consistency(x0, cond)
        logs = {"l_cd": float(l_cd.detach()), "mixed": float(mixed), **self.collapse_monitor(info["y"])}
        if not d_on:
            return StepOutput({"generator": l_cd}, logs=logs)
        k = c.frames_per_clip
        fake_caps = self.fake_captions(list(prompts))
        text = pooled_text(cond if fake_caps == list(prompts) else self.teacher.encode_prompt(fake_caps))
        text = text.repeat_interleave(k, 0)
        fake, _ = decode_random_frames(self.teacher, info["y"], n=k, generator=self.gen, grad=True)
        l_adv = g_loss(self.disc(fake, text, generator=self.gen), c.disc_loss)
        with torch.no_grad():
            fake_d, _ = decode_random_frames(self.teacher, info["y"].detach(), n=k, generator=self.gen, grad=False)
        real, real_caps = self.real_frames(step, video, list(prompts), fake_d.shape[0])
        real_text = pooled_text(self.teacher.encode_prompt(real_caps))
        l_d = d_loss(self.disc(real, real_text, generator=self.gen), self.disc(fake_d, text, generator=self.gen),
                     c.disc_loss)
        gp = gradient_penalty(self.disc, real, fake_d, text, generator=self.gen)
        self.gp.update(step, gp)
        logs.update(l_adv=float(l_adv.detach()), l_d=float(l_d.detach()), gp=float(gp.detach()),
                    gp_weight=self.gp.weight)
        return StepOutput({"generator": l_cd + c.disc_weight * l_adv, "discriminator": l_d + self.gp.weight * gp},
                          logs=logs)

    def state_dict(self) -> dict:
        s = super().state_dict()
        s["motion_head"] = self.motion.phi.state_dict()
        if self.disc is not None:
            s["disc"] = self.disc.state_dict()
            s["gp"] = self.gp.state_dict()
        return s

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.motion.phi.load_state_dict(state["motion_head"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.gp.load_state_dict(state["gp"])


class MCMMethod(VideoLCMMethod):
    """Inference as the video LCM (merged LoRA, LCM multistep sampling, guidance 1)."""

    name = "mcm"
    default_for_verb = False
    description = ("Motion consistency model: video consistency distillation on a motion representation + image "
                   "discriminator + mixed trajectories")
    paper = "https://arxiv.org/abs/2406.06890"
    Config = MCMConfig

    def stages(self, cfg: MCMConfig, teacher, student, data) -> list:
        return [MCMStage(cfg, teacher, student, data)]
