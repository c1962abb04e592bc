"""ODE-regression initialisation of a causal student (CausVid / Self-Forcing ``ode_init``, spec 1.3 and 3.2).

When the teacher is of another class than the causal student (a bidirectional many-step model), Self-Forcing first
regresses the student onto the teacher's deterministic ODE trajectories: pairs ``(noise, trajectory)`` from
:func:`studio.students.causal_video.teacher_ode_pairs`, where ``trajectory[:, k]`` is the teacher's ODE state at
the ``k``-th rollout timestep and ``trajectory[:, -1]`` its clean end point.

:func:`ode_regression_loss` draws, per sample and per block of latent frames, one rollout-step index ``k_b``;
the student sees the whole clip with block ``b`` taken from ``trajectory[:, k_b]`` at timestep ``t_{k_b}``
(diffusion-forcing input: each block at its own noise level, block-causal attention), predicts ``x0`` for every
frame, and the loss is ``mean((x0_pred - trajectory[:, -1])^2)`` over all elements. With ``clean_context=True``
(what the causal students need, as CausVid / Self-Forcing do) the clean end point is one more level to draw, at
timestep 0: such a block is clean context for the later ones (the rollout's KV cache holds clean frames at t = 0) and
its frames are left out of the loss; without it the student never sees clean context in training and its later
blocks degrade at inference.

The student is anything with ``block_size``, ``schedule`` and ``predict_frames(x_t, t_frames [B, F], cond,
output="sample")`` (:class:`~studio.students.causal_video.CausalWanStudent`); this module imports no student.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ode_regression_inputs", "ode_regression_loss"]


def ode_regression_inputs(trajectory: Tensor, timesteps: Sequence[float | int], block_size: int, *,
                          generator: torch.Generator | None = None, index: Tensor | None = None,
                          clean_context: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t [B,C,F,h,w], t_frames [B,F] float64, index [B, blocks])``: each block's frames from the trajectory
    at a random rollout step (``index`` overrides the draw), and the matching per-frame timesteps. With
    ``clean_context`` the draw includes index ``K`` (the clean end point, timestep 0)."""
    B, K1, C, Fr = trajectory.shape[:4]
    K = K1 - 1
    if len(timesteps) != K:
        raise ValueError(f"the trajectory holds {K} noisy levels but {len(timesteps)} timesteps were given")
    nb = -(-Fr // int(block_size))
    levels = K + 1 if clean_context else K
    timesteps = list(timesteps) + [0]
    if index is None:
        index = torch.randint(levels, (B, nb), generator=generator)
    index = torch.as_tensor(index, dtype=torch.long).cpu()
    if tuple(index.shape) != (B, nb):
        raise ValueError(f"index must be [B, blocks] = [{B}, {nb}], got {tuple(index.shape)}")
    frame_idx = index.repeat_interleave(int(block_size), dim=1)[:, :Fr]  # [B, F]
    if int(index.max()) >= levels or int(index.min()) < 0:
        raise ValueError(f"index must lie in [0, {levels - 1}], got values up to {int(index.max())}")
    gather = frame_idx.to(trajectory.device)[:, None, None, :, None, None].expand(B, 1, C, Fr,
                                                                                 *trajectory.shape[4:])
    x_t = torch.gather(trajectory, 1, gather)[:, 0]
    t_frames = torch.as_tensor(list(timesteps), dtype=torch.float64)[frame_idx]
    return x_t, t_frames.to(trajectory.device), index


def ode_regression_loss(student: Any, trajectory: Tensor, timesteps: Sequence[float | int], cond: Any, *,
                        generator: torch.Generator | None = None, index: Tensor | None = None,
                        clean_context: bool = False) -> Tensor:
    """The ODE-regression loss of one batch of teacher trajectories (see the module doc)."""
    x_t, t_frames, idx = ode_regression_inputs(trajectory.detach(), timesteps, student.block_size,
                                               generator=generator, index=index, clean_context=clean_context)
    if all(float(t) == int(t) for t in timesteps):
        t_frames = t_frames.long()
    target = trajectory[:, -1].detach()
    pred = student.predict_frames(x_t, t_frames, cond, output="sample")
    err = (pred.float() - target.float()) ** 2
    if not clean_context:
        return err.mean()
    K, Fr = trajectory.shape[1] - 1, trajectory.shape[3]
    noisy = (idx.repeat_interleave(int(student.block_size), dim=1)[:, :Fr] < K).to(err.device)  # [B, F]
    mask = noisy[:, None, :, None, None].expand_as(err)
    n = int(mask.sum())
    return (err * mask).sum() / n if n else (err * 0).sum()
