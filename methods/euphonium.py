"""Euphonium: process-reward-gradient-guided SDE sampling + Dual-Reward GRPO (spec 4; Flow-GRPO and DanceGRPO as
presets), on the video RL kind (:mod:`studio.runs.video_rl`).

Algorithm box (spec 4.3-4.5; one training step)::

    c, x_0   <- P training prompts, each repeated G times; one initial noise per prompt, shared by its group
    rollout  (no grad) for i = 0..N-1 on sigmas = shift(linspace(1, 0, N + 1)):
        v       = v_theta_old(x_i, sigma_i, c)
        mu_base = x_i - Delta_i v + (g^2 / 2) s_hat Delta_i                   (Flow-GRPO: g = a sqrt(s/(1-s)); DanceGRPO: g = eta)
        if i in the PRM window:  (R_i, G_i) = PRM(x_i, sigma_i, c), grad     (else R_i = 0)
        x_{i+1} = mu_base + c_g Delta_i G_i + g sqrt(Delta_i) xi             (c_g, or KL mode g^2 / (2 beta))
        logp_i  = mean log N(x_{i+1}; mu_base, g^2 Delta_i)                  (the unguided mean)
    r^O      <- outcome reward of decode(x_N)                                (ShapeWorld reward; no PRM)
    A^O, A^P <- group-normalised r^O, and per step R_{i+1} (the state transition i produced; A^P = 0 off the window)
    K        <- per sample a random floor(0.6 (N - 1)) of the transitions 0..N-2
    loss     =  w_O L_clip(rho, A^O) + w_P L_clip(rho, A^P)                  rho = exp(logpi_theta - logp_old)
              + kl_coef ||v_theta - v_ref||^2 Delta / (2 g^2 sigma^2)        (optional)
              + distill_weight ||v_theta - sg(v_old - c_g G_i)||^2           (explicit distillation only)
    theta    <- AdamW step (LoRA or full), grad-clip

Presets (``--preset``): ``flow-grpo`` (Flow-GRPO's diffusion, a = 0.7, outcome advantages only, no PRM),
``dance-grpo`` (constant eta, outcome only, no PRM) and ``euphonium`` (DanceGRPO's SDE + PRM guidance on the last
quarter of the steps + Dual-Reward advantages). With a zero PRM gradient the euphonium preset *is* the dance-grpo
one (tested). Every knob of the preset can be set on its own (``--noise-level``, ``--prm``, ``--advantage-mode``...).

The distillation objective (spec 4.6). ``--distill implicit`` (default) is the released code: the PRM drift only
shapes the rollouts, both log-probabilities use the unguided mean, so GRPO raises the plain network's likelihood
of the guided, high-advantage transitions and inference needs no PRM. ``--distill explicit`` adds the regression
``||v_theta(x_i) - sg(v_old(x_i) - c_g' G_i)||^2`` on the guided steps of the trained transitions, with the exact
velocity equivalent ``c_g' = c_g / (1 + g^2 (1 - sigma) / (2 sigma))`` (DanceGRPO form; ``c_g`` in the Flow-GRPO
form). **A documented reconstruction**: the release has no explicit loss and the paper body was not available
(:func:`studio.distill.grpo.guidance_distill_loss`).

CPU defaults differ from the released HunyuanVideo recipe (lr 1e-6 full fine-tune, 16 steps, shift 5, eta 0.25,
c_g 0.01, G = 8, accum 4, 501 steps): a LoRA (rank 16, lr 2e-4), 8 steps at the policy's own shift, 30 updates, G = 4 x 2
prompts, and c_g = 10 for ShapeWorld's trained PRM: on the policy's late rollout states its gradient is about 1e-3
RMS and 0.08 at most per element (measured), so ``c_g Delta G`` reaches the SDE noise's scale (``eta sqrt(Delta)``)
only on the object's pixels, where the release's 0.01 would do nothing.

Process-reward credit (spec 4.9's suspected off-by-one, measured in docs/notes/issue19-locate.md): the release
credits transition i (x_i -> x_{i+1}) with the PRM score of its *input* state x_i, a value fixed before the
transition is drawn, so that process advantage carries no signal about the transition (on a toy Gaussian policy
with an exact PRM, process-only GRPO then lowers the reward below the base policy's; crediting R(x_{i+1}) raises
it). The default credits the produced state (``--process-credit output``); ``--process-credit input`` is the
release's alignment.

Gaps kept as the release has them (spec 4.9): the KL-mode scale g^2 / (2 beta) alone does not sample the tilted
target (the exact scale is ``(sigma / (1 - sigma) + g^2 / 2) / beta``,
:func:`studio.teachers.sampling.tilted_guidance_scale`; measured in ``tests/test_euphonium_parts.py``); Flow-GRPO's
SDE window is replaced by the same timestep subsampling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from studio.distill.grpo import (dual_reward_grpo_loss, group_advantages, guidance_distill_loss,
                                 process_advantages, subsample_timesteps, velocity_kl)
from studio.errors import UserError
from studio.runs.video_rl import VideoRLConfig, VideoRLMethod
from studio.teachers.process_reward import load_process_reward
from studio.teachers.sampling import (flow_sde_diffusion, flow_sde_rollout, flow_sde_step, noise_generator,
                                      shared_noise_groups, shifted_sigmas)
from studio.train.loop import StepOutput

#: preset -> (SDE form, noise level, PRM, advantage mode)
PRESETS = {
    "flow-grpo": ("flow-grpo", 0.7, "none", "none"),
    "dance-grpo": ("dance-grpo", 0.25, "none", "none"),
    "euphonium": ("dance-grpo", 0.25, "shapeworld-video-prm", "both"),
}


@dataclass
class EuphoniumConfig(VideoRLConfig):
    preset: Literal["euphonium", "dance-grpo", "flow-grpo"] = "euphonium"
    """euphonium (PRM-guided SDE + dual reward) | dance-grpo (constant eta) | flow-grpo (a sqrt(s/(1-s))); outcome only"""
    sde_form: Literal["dance-grpo", "flow-grpo"] | None = None
    """diffusion of the SDE; None = the preset's"""
    noise_level: float | None = None
    """eta (dance-grpo form) or a (flow-grpo form); None = the preset's (0.25 / 0.7)"""
    shift: float | None = None
    """flow shift of the rollout sigmas shift(linspace(1, 0, N + 1)); None = the policy's own"""
    prompts_per_step: int = 2
    group_size: int = 4
    """G rollouts per prompt, sharing one initial noise"""
    timestep_fraction: float = 0.6
    """each rollout trains on a random floor(fraction (N - 1)) of its transitions (the last step is not trained)"""
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    prm: str | None = None
    """process reward model: shapeworld-video-prm (trained) | shapeworld-video-exact-prm | none | a folder; None = the preset's"""
    guidance: float = 10.0
    """c_g: the PRM gradient's scale in the drift (x Delta); the release uses 0.01 with its own PRM's gradients"""
    kl_beta: float | None = None
    """KL mode: c_g = g^2 / (2 beta) instead of --guidance (the release's negative guidance scale)"""
    guidance_start: int | None = None
    """first guided step (0-based); None = the last quarter of the steps (12 of 16)"""
    guidance_end: int = -1
    """last guided step, inclusive (-1 = the last)"""
    normalize_grad: bool = False
    advantage_mode: Literal["both", "none", "only"] | None = None
    """both (outcome + process) | none (outcome only: Flow-GRPO / DanceGRPO) | only (process only); None = the preset's"""
    process_credit: Literal["input", "output"] = "output"
    """which PRM score a transition x_i -> x_{i+1} is credited with: output (R(x_{i+1}), the state it produced) |
    input (R(x_i), the release's alignment: a value fixed before the transition, so its process advantage carries
    no signal about it; measured in docs/notes/issue19-locate.md)"""
    outcome_weight: float = 1.0
    process_weight: float = 1.0
    kl_coef: float = 0.0
    """weight of ||v - v_ref||^2 Delta / (2 g^2 sigma^2) (0 = off, as in the release)"""
    logprob_mean: Literal["base", "guided"] = "base"
    """mean of the log-probabilities: base (unguided, the release) | guided"""
    distill: Literal["implicit", "explicit"] = "implicit"
    """implicit (the release: unguided-mean GRPO) | explicit (+ the reconstructed regression of spec 4.6)"""
    distill_weight: float = 1.0


def preset_values(cfg: EuphoniumConfig) -> tuple[str, float, str, str]:
    """``(sde_form, noise_level, prm, advantage_mode)``: the preset's, overridden by the fields that are set."""
    form, level, prm, mode = PRESETS[cfg.preset]
    return (cfg.sde_form or form, float(level if cfg.noise_level is None else cfg.noise_level),
            prm if cfg.prm is None else cfg.prm, cfg.advantage_mode or mode)


def credited_process_rewards(process_rewards: Tensor, credit: str = "input") -> Tensor:
    """``[B, N]``: the PRM score each transition ``i`` (``x_i -> x_{i+1}``) is credited with. ``process_rewards[:,
    i]`` is the score of the rollout's state ``x_i`` (0 off the PRM window). ``"input"`` (the release) keeps it:
    transition ``i`` gets ``R(x_i)``, a value fixed before the transition is drawn, so ``E[A^P_i grad log p(x_{i+1}
    | x_i) | x_i] = 0`` on-policy (a pure-noise term; spec 4.9 flags it as a possible off-by-one). ``"output"``:
    transition ``i`` gets ``R(x_{i+1})``, the score of the state it produced (column ``i + 1``; the last transition,
    never trained, gets 0)."""
    if credit == "input":
        return process_rewards
    if credit != "output":
        raise UserError(f"--process-credit must be input or output, got {credit!r}")
    return torch.cat([process_rewards[:, 1:], torch.zeros_like(process_rewards[:, :1])], dim=1)


class EuphoniumStage:
    """One stage of GRPO on flow-SDE rollouts (the algorithm box of the module doc)."""

    name = "grpo"

    def __init__(self, cfg: EuphoniumConfig, policy, reference, reward, prompts: list[str], evaluator=None,
                 prm=None):
        self.cfg, self.policy, self.reference, self.reward = cfg, policy, reference, reward
        self.prompts, self.evaluator = list(prompts), evaluator
        self.form, self.noise_level, prm_spec, self.mode = preset_values(cfg)
        self.prm = prm if prm is not None else load_process_reward(prm_spec)
        if self.mode != "none" and self.prm is None:
            raise UserError(f"--advantage-mode {self.mode} needs a process reward model (--prm)")
        if cfg.distill == "explicit" and self.prm is None:
            raise UserError("--distill explicit regresses onto the PRM-guided velocity and needs --prm")
        self.steps = int(cfg.steps)
        shift = float(cfg.shift if cfg.shift is not None else policy.schedule.shift)
        self.sigmas = shifted_sigmas(cfg.sampling_steps, shift)
        N = int(cfg.sampling_steps)
        start = int(cfg.guidance_start) if cfg.guidance_start is not None else (3 * N) // 4
        self.window = (start, int(cfg.guidance_end), 1)
        self.gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
        self.opt = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.curve: list[dict] = []

    def optimizers(self) -> dict:
        return {"policy": self.opt}

    # ------------------------------------------------------------------ the policy as a velocity field
    def velocity(self, model, x: Tensor, sigma: Tensor | float, cond) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        t = model.schedule.timestep_from_sigma(s).to(x.device)
        return model.predict(x, t, cond, guidance_scale=float(self.cfg.guidance_scale), output="flow")

    def _sde(self, **kw) -> dict:
        sigma_max = float(self.sigmas[1])
        return dict(form=self.form, noise_level=self.noise_level, sigma_max=sigma_max, **kw)

    # ------------------------------------------------------------------ one step
    def rollout(self, step: int):
        """Rollouts of the step's prompts (no grad; PRM gradients recorded per guided step)."""
        c = self.cfg
        G = int(c.group_size)
        pidx = torch.randint(len(self.prompts), (int(c.prompts_per_step),), generator=self.gen).tolist()
        prompts = [self.prompts[i] for i in pidx for _ in range(G)]
        cond = self.policy.encode_prompt(prompts)
        noise = shared_noise_groups(self.policy.noise(len(pidx), seed=int(c.seed) * 7919 + step), G)
        grads: dict[float, Tensor] = {}

        def prm(x, sigma):
            r, g = self.prm.reward_and_grad(x, sigma, prompts)
            grads[float(sigma)] = g
            return r, g

        with torch.no_grad():
            roll = flow_sde_rollout(lambda x, s: self.velocity(self.policy, x, s, cond), noise, self.sigmas,
                                    form=self.form, noise_level=self.noise_level, generator=self.gen,
                                    process_reward=prm if self.prm is not None else None,
                                    guidance_scale=c.guidance, kl_beta=c.kl_beta, window=self.window,
                                    normalize_grad=c.normalize_grad, logprob_mean=c.logprob_mean)
            videos = self.policy.decode(roll["latents"][:, -1]).float()
            r_o = self.reward(videos, prompts)
        roll["grads"] = grads
        return prompts, cond, roll, r_o

    def train_step(self, step: int, progress: float) -> StepOutput:
        c = self.cfg
        G = int(c.group_size)
        prompts, cond, roll, r_o = self.rollout(step)
        if roll["log_probs"] is None:
            raise UserError("--noise-level 0 makes the rollout the ODE, whose log-probabilities are undefined")
        a_o = group_advantages(r_o, G)                                        # [B]
        a_p = process_advantages(credited_process_rewards(roll["process_rewards"].double(), c.process_credit), G)
        N = int(c.sampling_steps)
        B = len(prompts)
        keep = subsample_timesteps(B, N, c.timestep_fraction, generator=self.gen)  # [B, k]
        k = keep.shape[1]
        lats, sig = roll["latents"], roll["sigmas"]
        rows = torch.arange(B)
        loss = lats.new_zeros(())
        logs = {"reward": float(r_o.mean()), "reward_std": float(r_o.std()) if B > 1 else 0.0}
        distill_total, kl_total = 0.0, 0.0
        for j in range(k):
            i = keep[:, j]
            x_i, x_next = lats[rows, i], lats[rows, i + 1]
            s_i, s_next = sig[i], sig[i + 1]
            v = self.velocity(self.policy, x_i, s_i, cond)
            out = flow_sde_step(x_i, v, s_i.to(x_i.dtype), s_next.to(x_i.dtype), sample=x_next,
                                **self._sde())
            old = roll["log_probs"][rows, i]
            l_grpo, info = dual_reward_grpo_loss(out.log_prob[:, None], old[:, None], a_o.to(v.dtype),
                                                 a_p[rows, i][:, None].to(v.dtype), mode=self.mode,
                                                 outcome_weight=c.outcome_weight, process_weight=c.process_weight,
                                                 clip_range=c.clip_range, adv_clip_max=c.adv_clip_max, normalizer=k)
            loss = loss + l_grpo
            if c.kl_coef > 0:
                with torch.no_grad():
                    v_ref = self.velocity(self.reference, x_i, s_i, cond)
                g = torch.as_tensor(flow_sde_diffusion(s_i, self.form, self.noise_level, float(sig[1])))
                kl = (velocity_kl(v, v_ref, s_i.to(v.dtype), (s_i - s_next).to(v.dtype), 1.0)
                      / (g * g).to(v.dtype)).mean() / k  # per-sample g (the Flow-GRPO form varies with sigma)
                loss = loss + c.kl_coef * kl
                kl_total += float(kl.detach())
            if c.distill == "explicit":
                d = self.distill_term(v, x_i, s_i, i, roll)
                if d is not None:
                    loss = loss + c.distill_weight * d / k
                    distill_total += float(d.detach()) / k
        logs.update({"ratio_max_dev": float((info["ratio"] - 1).abs().max()),
                     "guided_steps": int(roll["guided"].sum()), "process_reward": float(
                         roll["process_rewards"][:, roll["guided"]].mean()) if bool(roll["guided"].any()) else 0.0})
        if c.kl_coef > 0:
            logs["kl"] = kl_total
        if c.distill == "explicit":
            logs["distill"] = distill_total
        return StepOutput(loss, logs=logs)

    def distill_term(self, v: Tensor, x_i: Tensor, s_i: Tensor, i: Tensor, roll: dict) -> Tensor | None:
        """The explicit regression on the samples whose transition ``i`` was guided (``None`` when none was)."""
        guided = roll["guided"][i]
        if not bool(guided.any()):
            return None
        G = torch.zeros_like(v)
        for b in torch.nonzero(guided).flatten().tolist():
            G[b] = roll["grads"][float(roll["sigmas"][i[b]])][b].to(v.dtype)
        if self.cfg.kl_beta is not None:
            g = flow_sde_diffusion(s_i.to(v.dtype), self.form, self.noise_level, float(roll["sigmas"][1]))
            c_g = (g * g / (2.0 * float(self.cfg.kl_beta))) if isinstance(g, float) else None
            if c_g is None:
                raise UserError("--distill explicit with --kl-beta supports the dance-grpo form (constant eta)")
        else:
            c_g = float(self.cfg.guidance)
        noise = self.noise_level if self.form == "dance-grpo" else None
        return guidance_distill_loss(v, v.detach(), G, c_g, weight=guided.to(v.dtype) * len(guided) / guided.sum(),
                                     sigma=s_i.to(v.dtype), noise_level=noise)

    def after_step(self, step: int, out: StepOutput) -> None:
        e = int(self.cfg.eval_every)
        if self.evaluator is not None and e > 0 and (step + 1) % e == 0 and step + 1 < self.steps:
            self.curve.append({"step": step + 1, **self.evaluator()})

    def state_dict(self) -> dict:
        return {"policy": _trainable_state(self.policy), "generator_rng": self.gen.get_state(),
                "curve": list(self.curve)}

    def load_state_dict(self, state: dict) -> None:
        _load_trainable_state(self.policy, state["policy"])
        self.gen.set_state(state["generator_rng"])
        self.curve = list(state.get("curve", []))

    @torch.no_grad()
    def preview(self):
        """One plain-sampler sample of the first training prompt: frames side by side ``[H, F*W, 3]``."""
        from studio.teachers.sampling import flow_euler_sample

        v = flow_euler_sample(self.policy, [self.prompts[0]], steps=int(self.cfg.sampling_steps),
                              guidance_scale=float(self.cfg.guidance_scale), seed=0)[0]  # [F,3,H,W]
        return v.permute(2, 0, 3, 1).reshape(v.shape[2], -1, 3)


def _trainable_state(policy) -> dict:
    if hasattr(policy, "adapter_enabled"):  # a LoRA student: the adapter tensors
        return policy.state_dict()
    return {k: v.detach().clone() for k, v in policy.denoiser.state_dict().items()}


def _load_trainable_state(policy, state: dict) -> None:
    if hasattr(policy, "adapter_enabled"):
        policy.load_state_dict(state)
    else:
        policy.denoiser.load_state_dict(state)


class EuphoniumMethod(VideoRLMethod):
    name = "euphonium"
    default_for_verb = True
    description = ("Euphonium: PRM-gradient-guided SDE rollouts + Dual-Reward GRPO (presets flow-grpo, dance-grpo, "
                   "euphonium); the student samples without a reward model")
    paper = "https://arxiv.org/abs/2602.04928"
    Config = EuphoniumConfig

    def validate(self, cfg: EuphoniumConfig) -> None:
        super().validate(cfg)
        if cfg.group_size < 2 or cfg.prompts_per_step < 1:
            raise UserError(f"--group-size must be >= 2 and --prompts-per-step >= 1, got {cfg.group_size}, "
                            f"{cfg.prompts_per_step}")
        if not 0 < cfg.timestep_fraction <= 1:
            raise UserError(f"--timestep-fraction must lie in (0, 1], got {cfg.timestep_fraction}")
        if cfg.kl_beta is not None and cfg.kl_beta <= 0:
            raise UserError(f"--kl-beta must be > 0, got {cfg.kl_beta}")
        _, level, _, _ = preset_values(cfg)
        if level <= 0:
            raise UserError(f"--noise-level must be > 0 (the ODE has no log-probabilities), got {level}")

    def stages(self, cfg, policy, reference, reward, prompts, evaluator) -> list:
        return [EuphoniumStage(cfg, policy, reference, reward, prompts, evaluator)]
