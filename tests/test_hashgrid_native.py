"""Parity tests: the native C++/OpenMP hash-grid encoding against the torch formulation of
``HashGridEncoding`` (the same module with ``backend="torch"``).

Tolerances: forward and table gradients agree to 1e-6 (float32) / 1e-12 (float64) absolute (in practice
bit-identical: the same products in the same order, no FMA); point gradients, whose per-level sums
are ordered differently from torch's autograd, to 1e-5 (float32) / 1e-10 (float64) relative to the
largest entry. Gradcheck / gradgradcheck run on a tiny float64 grid (one dense and two hashed levels).
"""
from __future__ import annotations

import pytest
import torch

from studio.errors import UserError
from studio.students import _hashgrid_ext
from studio.students.fields import HashGridEncoding, NeuSField, eikonal_loss

pytestmark = pytest.mark.skipif(
    not _hashgrid_ext.available(), reason=f"native hash-grid extension unavailable: {_hashgrid_ext.load_error()}"
)

FWD_ATOL = {torch.float32: 1e-6, torch.float64: 1e-12}
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _close_rel(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-12)
    assert err <= rtol * scale, f"max err {err:.3g} > {rtol:.1g} * {scale:.3g}"


def _points(n: int, dtype, seed: int = 0) -> torch.Tensor:
    """Random points plus corners, faces, cell boundaries and out-of-range points (clamped)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g, dtype=torch.float64)
    special = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0.5], [0.5, 0.5, 0.5], [0.25, 0.75, 1.0],
                            [-0.2, 0.3, 1.4], [1.0 / 16, 2.0 / 16, 3.0 / 16]], dtype=torch.float64)
    return torch.cat([special, x]).to(dtype)


def _encoders(dtype, **kw):
    kw.setdefault("init_scale", 0.5)  # large features so that errors are visible
    enc = HashGridEncoding(**kw).to(dtype)
    enc.backend = "torch"
    nat = HashGridEncoding(**kw).to(dtype)
    nat.backend = "native"
    nat.load_state_dict(enc.state_dict())
    return enc, nat


CONFIGS = [
    {},  # default: 16 levels x 2 features, dense then hashed levels
    {"n_levels": 4, "n_features_per_level": 3, "log2_hashmap_size": 10, "base_resolution": 4, "per_level_scale": 2.0},
    {"n_levels": 3, "n_features_per_level": 1, "log2_hashmap_size": 6, "base_resolution": 5, "per_level_scale": 1.5},
    {"n_levels": 5, "n_features_per_level": 4, "log2_hashmap_size": 12, "base_resolution": 2, "per_level_scale": 3.0},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_forward_and_backward_parity(dtype, cfg):
    enc, nat = _encoders(dtype, **CONFIGS[cfg])
    x = _points(3000, dtype, seed=cfg).requires_grad_(True)
    a = enc(x)
    b = nat(x)
    assert a.shape == b.shape == (x.shape[0], enc.n_output_dims)
    assert (a - b).abs().max().item() <= FWD_ATOL[dtype]
    w = torch.cos(3.0 * a.detach())  # a non-uniform upstream gradient
    gx_a, ge_a = torch.autograd.grad(a, (x, enc.embeddings), w)
    gx_b, ge_b = torch.autograd.grad(b, (x, nat.embeddings), w)
    assert (ge_a - ge_b).abs().max().item() <= FWD_ATOL[dtype] * max(1.0, ge_a.abs().max().item())
    _close_rel(gx_b, gx_a, GRAD_RTOL[dtype])
    # (-0.2, 0.3, 1.4): the clamped coordinates get no gradient (as torch), the in-range one does
    assert gx_b[5, 0] == 0 and gx_b[5, 2] == 0 and gx_a[5, 0] == 0 and gx_b[5, 1] != 0


def test_leading_shape_and_no_grad():
    enc, nat = _encoders(torch.float32, n_levels=4, log2_hashmap_size=10)
    x = torch.rand(2, 5, 7, 3)
    with torch.no_grad():
        out = nat(x)
    assert out.shape == (2, 5, 7, enc.n_output_dims) and not out.requires_grad
    torch.testing.assert_close(out, enc(x).detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_double_backward_eikonal_parity(dtype):
    """The NeuS eikonal path: d/d(embeddings, MLP, points) of |d sdf / d x| with create_graph."""
    cfg = {"n_levels": 6, "n_features_per_level": 2, "log2_hashmap_size": 11, "base_resolution": 4, "per_level_scale": 1.8}
    enc, nat = _encoders(dtype, **cfg)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(enc.n_output_dims, 16), torch.nn.Softplus(),
                              torch.nn.Linear(16, 1, bias=False)).to(dtype)
    x0 = _points(800, dtype, seed=3)

    def run(e):
        x = x0.clone().requires_grad_(True)
        sdf = mlp(e(x))[:, 0]
        g = torch.autograd.grad(sdf, x, torch.ones_like(sdf), create_graph=True)[0]
        loss = eikonal_loss(g) + (g * torch.linspace(-1, 1, 3, dtype=dtype)).sum()
        return g, torch.autograd.grad(loss, (e.embeddings, x, *mlp.parameters()))

    g_a, grads_a = run(enc)
    g_b, grads_b = run(nat)
    _close_rel(g_b, g_a, GRAD_RTOL[dtype])
    for ga, gb in zip(grads_a, grads_b):
        _close_rel(gb, ga, 10 * GRAD_RTOL[dtype])
    assert grads_b[0].abs().sum() > 0  # the eikonal term reaches the embeddings


def _tiny_meta():
    enc = HashGridEncoding(n_levels=3, n_features_per_level=2, log2_hashmap_size=6, base_resolution=2,
                           per_level_scale=2.0)
    assert 0 < int(enc.dense_levels.sum()) < 3  # one dense, two hashed levels
    return enc, enc._native_meta


def test_gradcheck_and_gradgradcheck_float64():
    enc, meta = _tiny_meta()
    g = torch.Generator().manual_seed(1)
    E = (torch.rand(enc.embeddings.shape, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    # interior points, away from cell boundaries of every level (finite differences cross none)
    x = (0.05 + 0.9 * torch.rand(6, 3, generator=g, dtype=torch.float64)).requires_grad_(True)

    def f(pts, emb):
        return _hashgrid_ext.hash_encode(pts, emb, *meta, enc.n_levels)

    assert torch.autograd.gradcheck(f, (x, E), eps=1e-7, atol=1e-6)
    assert torch.autograd.gradgradcheck(f, (x, E), eps=1e-7, atol=1e-6)
    # progressive band: one active level
    assert torch.autograd.gradgradcheck(lambda p, e: _hashgrid_ext.hash_encode(p, e, *meta, 1), (x, E),
                                        eps=1e-7, atol=1e-6)


def test_progressive_band_mask():
    kw = {"n_levels": 6, "log2_hashmap_size": 10, "base_resolution": 4, "start_level": 2, "update_steps": 10}
    enc, nat = _encoders(torch.float64, **kw)
    x = _points(500, torch.float64).requires_grad_(True)
    F_ = enc.n_features_per_level
    for step, active in ((0, 2), (15, 3), (1000, 6)):
        assert enc.update_step(step) == nat.update_step(step) == active
        a, b = enc(x), nat(x)
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
        assert b[:, active * F_:].abs().sum() == 0 and b[:, :active * F_].abs().sum() > 0
        ge = torch.autograd.grad(b.sum(), nat.embeddings, retain_graph=True)[0]
        start = int(nat.level_offsets[active]) if active < nat.n_levels else ge.shape[0]
        assert ge[start:].abs().sum() == 0 and ge[:start].abs().sum() > 0
        gx_a = torch.autograd.grad(a.pow(2).sum(), x)[0]
        gx_b = torch.autograd.grad(b.pow(2).sum(), x)[0]
        _close_rel(gx_b, gx_a, 1e-10)


def test_table_gradient_deterministic_across_threads():
    _enc, nat = _encoders(torch.float32, n_levels=8, log2_hashmap_size=12)
    x = torch.rand(20000, 3, generator=torch.Generator().manual_seed(5))
    old = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(nat(x).pow(2).sum(), nat.embeddings)[0])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1])


def test_backend_option(monkeypatch):
    with pytest.raises(UserError, match="backend"):
        HashGridEncoding(n_levels=2, backend="cuda")
    enc = HashGridEncoding(n_levels=2, log2_hashmap_size=8)
    assert enc.backend == "auto" and "backend=auto" in repr(enc)
    with pytest.raises(UserError, match="backend"):
        enc.backend = "fast"
    x = torch.rand(64, 3)
    calls = []
    real = _hashgrid_ext.hash_encode
    monkeypatch.setattr(_hashgrid_ext, "hash_encode", lambda *a: calls.append(1) or real(*a))
    enc(x)
    assert calls == [1]  # auto on CPU float32 -> native
    enc.backend = "torch"
    enc(x)
    assert calls == [1]
    # auto falls back to torch, warning once, when the extension is unavailable
    from studio import errors

    monkeypatch.setattr(errors, "_warned", set())
    monkeypatch.setattr(_hashgrid_ext, "available", lambda: False)
    enc.backend = "auto"
    with pytest.warns(RuntimeWarning, match="native hash-grid extension unavailable"):
        out = enc(x)
    assert calls == [1] and out.shape == (64, enc.n_output_dims)


def test_neus_field_native_matches_torch():
    kw = {"n_levels": 4, "log2_hashmap_size": 10, "base_resolution": 4, "hidden_dim": 16, "normal_method": "autograd"}
    a, b = NeuSField(**kw), NeuSField(**kw)
    a.encoding.backend, b.encoding.backend = "torch", "native"
    with torch.no_grad():
        b.encoding.embeddings.copy_(a.encoding.embeddings.uniform_(-0.3, 0.3))
    pts = torch.rand(300, 3) * 1.6 - 0.8
    dirs = torch.nn.functional.normalize(torch.randn(300, 3), dim=-1)
    losses = []
    for f in (a, b):
        out = f(pts, dirs, with_normals=True)
        loss = eikonal_loss(out["gradient"]) + out["rgb"].mean() + out["sdf"].mean()
        losses.append((loss, torch.autograd.grad(loss, f.encoding.embeddings)[0]))
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-5, atol=1e-6)
    _close_rel(losses[1][1], losses[0][1], 1e-4)
