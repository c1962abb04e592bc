"""Native C++/OpenMP multi-resolution hash-grid encoding (``cuda_ext/cpu/hashgrid.cpp``), built on first use
by ``studio.ext``; the kernel behind ``HashGridEncoding(backend="native")`` (and ``"auto"`` on CPU).

Contract:
    available() -> bool          builds/loads the extension on first call, never raises
    load_error() -> str | None
    hash_encode(points [N,3], embeddings [rows,F], resolutions, offsets, dense, log2_size, n_active)
        -> features [N, L*F]     ``points`` already clamped to [0,1]^3 and of the embeddings' dtype
                                 (float32 / float64, CPU); levels >= n_active output zeros.

The math (grid coordinates, dense / hashed rows, trilinear weights) is the torch twin's,
``HashGridEncoding.forward``; the kernel file documents the derivative formulas.

Autograd: ``_HashEncode`` (features) has a native backward, ``_HashEncodeBackward`` (d points, d
embeddings), which is itself an autograd Function with a native backward (``hash_double_backward``:
d/d grad_out, d/d points, d/d embeddings). So ``create_graph=True`` gradients, i.e. NeRF normal losses
and NeuS's eikonal loss (the gradient of d features / d points w.r.t. the embeddings), stay native;
third derivatives are not supported (``once_differentiable``). The table gradients are accumulated per
level by one thread in point order: deterministic for any thread count.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from studio.ext import Extension

EXT_NAME = "studio_native_hashgrid"
EXT_SOURCES = ["cpu/hashgrid.cpp"]
# -ffp-contract=off: no fused multiply-adds, so grid coordinates and weights round like the torch twin.
EXT_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
EXT_LDFLAGS = ["-fopenmp"]

_EXT = Extension(EXT_NAME, EXT_SOURCES, extra_cflags=EXT_CFLAGS, extra_ldflags=EXT_LDFLAGS)
_load = _EXT.load
available = _EXT.available  #: whether the extension builds and loads (tried once per process; never raises)
load_error = _EXT.load_error  #: why it is unavailable (None if it loaded or was not tried yet)

Meta = tuple[list[int], list[int], list[int], int, int]  # resolutions, offsets, dense (0/1), log2_size, n_active


def _grad(g: Tensor | None, like: Tensor) -> Tensor:
    """An incoming gradient as a contiguous tensor of ``like``'s dtype (empty when absent)."""
    if g is None:
        return like.new_empty((0,))
    return g.to(like.dtype).contiguous()


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points, embeddings, meta):
        out = _load().hash_forward(points, embeddings, *meta)
        ctx.save_for_backward(points, embeddings)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, g_out):
        points, embeddings = ctx.saved_tensors
        need_p, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_out is None or not (need_p or need_e):
            return None, None, None
        gp, ge = _HashEncodeBackward.apply(_grad(g_out, points), points, embeddings, ctx.meta, need_p, need_e)
        return (gp if need_p else None), (ge if need_e else None), None


class _HashEncodeBackward(torch.autograd.Function):
    """(d points, d embeddings) of ``_HashEncode`` given ``grad_out``; differentiable once more (natively)."""

    @staticmethod
    def forward(ctx, g_out, points, embeddings, meta, need_p, need_e):
        gp, ge = _load().hash_backward(g_out, points, embeddings, *meta, bool(need_p), bool(need_e))
        ctx.save_for_backward(g_out, points, embeddings)
        ctx.meta = meta
        ctx.set_materialize_grads(False)
        if not need_p:
            ctx.mark_non_differentiable(gp)
        if not need_e:
            ctx.mark_non_differentiable(ge)
        return gp, ge

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_points, gg_table):
        g_out, points, embeddings = ctx.saved_tensors
        need_g, need_p, need_e = ctx.needs_input_grad[:3]
        if (gg_points is None and gg_table is None) or not (need_g or need_p or need_e):
            return None, None, None, None, None, None
        if gg_points is not None and gg_points.numel() == 0:
            gg_points = None
        if gg_table is not None and gg_table.numel() == 0:
            gg_table = None
        d_g, d_p, d_e = _load().hash_double_backward(
            g_out, points, embeddings, _grad(gg_points, points), _grad(gg_table, points), *ctx.meta,
            bool(need_g), bool(need_p), bool(need_e and gg_points is not None),
        )
        return ((d_g if need_g else None), (d_p if need_p else None),
                (d_e if need_e and gg_points is not None else None), None, None, None)


def hash_encode(points: Tensor, embeddings: Tensor, resolutions: list[int], offsets: list[int], dense: list[int],
                log2_size: int, n_active: int) -> Tensor:
    """Encode ``points [N,3]`` (clamped, embeddings' dtype, CPU) -> ``[N, L*F]``; differentiable twice."""
    meta: Meta = (list(resolutions), list(offsets), [int(bool(d)) for d in dense], int(log2_size), int(n_active))
    return _HashEncode.apply(points.contiguous(), embeddings.contiguous(), meta)
