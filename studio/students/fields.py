"""Implicit-field students for DreamPolish's geometry stages: a hash-grid NeRF (G1) and a NeuS SDF (G2).

Spec: ``specs/placiddreamer_dreampolish.md`` sections 1 and 3.3 (threestudio / DreamCraft3D
conventions). Written from the papers' math and the spec; no code copied.

* :class:`HashGridEncoding`: Instant-NGP's multi-resolution hash encoding (torch, or a native C++ kernel).
* :class:`NeRFField`: hash grid + small MLPs; density with Magic3D's blob bias, colour head, normals
  from the density gradient. Renders with ``studio.render.render_field(kind="nerf")``.
* :class:`NeuSField`: SDF MLP on a hash grid with sphere initialisation, a learnable sharpness
  ``inv_s`` (NeuS's "deviation network"), normals from the SDF gradient, :func:`eikonal_loss`.
* :func:`neus_from_nerf`: fit a NeuS field whose zero level set is a NeRF's density iso-surface
  (the G1 -> G2 hand-over).
* :func:`sdf_grid` / :func:`extract_mesh`: the field's scalar on a grid and marching cubes (for DMTet
  initialisation and mesh export).

Both fields implement the field protocol of ``studio.render.volume``: ``field(points, dirs,
with_normals=...) -> dict`` and own all their trainable parameters. ``param_groups`` splits them the
threestudio way (hash grid lr 0.01, MLPs 1e-3) and ``make_optimizer`` builds Adam with betas (0.9, 0.99)
and eps 1e-15 (threestudio's ProlificDreamer / DreamCraft3D optimiser settings, spec section 1).
Coordinates are world coordinates inside the cube ``[-radius, radius]^3`` (``field.bbox``); the encoding
sees them mapped to ``[0, 1]^3`` and clamped there.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError, warn_once
from ..io.atomic import atomic_write_bytes
from ..render.volume import normalize_bbox
from ..seeding import seeded

__all__ = [
    "HASH_PRIMES",
    "HashGridEncoding",
    "NeRFField",
    "NeuSField",
    "eikonal_loss",
    "extract_mesh",
    "load_field",
    "neus_from_nerf",
    "sdf_grid",
]

#: Instant-NGP's spatial-hash primes (the first is 1 for cache coherence along x).
HASH_PRIMES = (1, 2654435761, 805459861)
FIELD_FORMAT = "studio.field"
FIELD_VERSION = 1


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


# ------------------------------------------------------------------------------------------------
# hash grid
# ------------------------------------------------------------------------------------------------


_ENCODING_BACKENDS = ("auto", "torch", "native")


class HashGridEncoding(nn.Module):
    """Multi-resolution hash encoding (Instant-NGP, Müller et al. 2022) in torch or native C++ (``backend``).

    Level ``l`` (``0 .. n_levels - 1``) is a grid of ``N_l = floor(base_resolution * per_level_scale^l)``
    cells per axis over ``[0, 1]^3``, i.e. ``N_l + 1`` vertices per axis, each vertex owning a feature
    vector of ``n_features_per_level``. A level whose ``(N_l + 1)^3`` vertices fit into ``T =
    2^log2_hashmap_size`` entries is stored densely (vertex ``(i, j, k)`` at ``i + j (N+1) + k (N+1)^2``,
    no collisions); finer levels use the spatial hash ``(i * 1 xor j * 2654435761 xor k * 805459861) mod
    T`` and collide. A point's level feature is the trilinear interpolation of its cell's 8 vertex
    features; the output concatenates the levels: ``[..., n_levels * n_features_per_level]``. Inputs are
    clamped to ``[0, 1]^3``. The table is initialised uniformly in ``[-init_scale, init_scale]``. The
    default ``per_level_scale = 256^(1/15)`` (threestudio's value) takes 16 levels from 16 to 4096 cells.

    Progressive band (threestudio's ``ProgressiveBandHashGrid``, DreamCraft3D's coarse stage): with
    ``start_level`` set, only the first ``start_level`` levels are active; ``update_step(step)`` enables
    one more level every ``update_steps`` steps after ``start_step``. Inactive levels output zeros (and so
    receive no gradient).

    Backends (``backend=``, also settable later as ``encoding.backend``): ``"torch"`` is the formulation
    below (one gather of ``8 n_levels`` rows per point); ``"native"`` is the C++/OpenMP kernel
    ``cuda_ext/cpu/hashgrid.cpp`` (``studio.students._hashgrid_ext``, built on first use), the same math
    with native backward and double backward (so NeRF normal losses and NeuS's eikonal term stay native);
    ``"auto"`` (default) uses native for CPU float32/float64 tensors when the extension builds and torch
    otherwise (warning once if the build fails). ``"native"`` falls back to torch with a warning where it
    cannot run (no compiler, non-float dtype); it raises for non-CPU tensors. Both give the same results
    (parity tests in ``tests/test_hashgrid_native.py``); profiling (``benchmarks/fields.py``) showed the
    torch encoding at ~93% of a CPU field evaluation, hence the kernel.
    """

    def __init__(self, n_levels: int = 16, n_features_per_level: int = 2, log2_hashmap_size: int = 15,
                 base_resolution: int = 16, per_level_scale: float = 1.447269237440378, *,
                 init_scale: float = 1e-4, start_level: int | None = None, start_step: int = 0,
                 update_steps: int | None = None, seed: int = 0, backend: str = "auto"):
        super().__init__()
        _check(isinstance(n_levels, int) and n_levels >= 1, f"n_levels must be an int >= 1, got {n_levels!r}")
        _check(isinstance(n_features_per_level, int) and n_features_per_level >= 1,
               f"n_features_per_level must be an int >= 1, got {n_features_per_level!r}")
        _check(isinstance(log2_hashmap_size, int) and 4 <= log2_hashmap_size <= 26,
               f"log2_hashmap_size must be an int in 4..26, got {log2_hashmap_size!r}")
        _check(isinstance(base_resolution, int) and base_resolution >= 1,
               f"base_resolution must be an int >= 1, got {base_resolution!r}")
        _check(per_level_scale >= 1.0, f"per_level_scale must be >= 1, got {per_level_scale}")
        if start_level is not None:
            _check(1 <= start_level <= n_levels, f"start_level must lie in 1..{n_levels}, got {start_level}")
            _check(update_steps is not None and update_steps >= 1,
                   "a progressive band (start_level) needs update_steps >= 1")
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.base_resolution = base_resolution
        self.per_level_scale = float(per_level_scale)
        self.start_level, self.start_step, self.update_steps = start_level, int(start_step), update_steps
        T = 2 ** log2_hashmap_size
        res, sizes, dense = [], [], []
        for lvl in range(n_levels):
            n = math.floor(base_resolution * per_level_scale ** lvl)
            verts = (n + 1) ** 3
            res.append(n)
            dense.append(verts <= T)
            sizes.append(min(verts, T))
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        self.register_buffer("resolutions", torch.tensor(res, dtype=torch.long), persistent=False)
        self.register_buffer("dense_levels", torch.tensor(dense, dtype=torch.bool), persistent=False)
        self.register_buffer("level_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("level_sizes", torch.tensor(sizes, dtype=torch.long), persistent=False)
        self.register_buffer("level_mask", torch.ones(n_levels), persistent=False)
        # dense levels come first (resolutions grow with the level)
        self._n_dense = sum(dense)
        assert all(dense[:self._n_dense]) and not any(dense[self._n_dense:])
        g = torch.Generator().manual_seed(int(seed))
        table = (torch.rand(sum(sizes), n_features_per_level, generator=g) * 2 - 1) * init_scale
        self.embeddings = nn.Parameter(table)
        self.current_level = n_levels
        self._native_meta = (res, offsets, [int(d) for d in dense], int(log2_hashmap_size))
        self.backend = backend
        if start_level is not None:
            self.update_step(0)

    @property
    def backend(self) -> str:
        """``"auto"``, ``"torch"`` or ``"native"`` (see the class docstring)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        _check(value in _ENCODING_BACKENDS, f"backend must be one of {_ENCODING_BACKENDS}, got {value!r}")
        self._backend = value

    def _use_native(self, p: Tensor) -> bool:
        """Whether this call runs the native kernel (resolves ``backend`` for ``p``'s device and dtype)."""
        if self._backend == "torch":
            return False
        from . import _hashgrid_ext

        if self._backend == "native":
            _check(p.device.type == "cpu", f"HashGridEncoding backend='native' runs on CPU tensors, got {p.device}; "
                   "use backend='auto' or 'torch'")
        elif p.device.type != "cpu":
            return False
        if p.dtype not in (torch.float32, torch.float64):
            if self._backend == "native":
                warn_once("hashgrid-native-dtype", f"native hash grid supports float32/float64, not {p.dtype}; "
                          "using the torch encoding")
            return False
        if not _hashgrid_ext.available():
            warn_once("hashgrid-native", f"native hash-grid extension unavailable ({_hashgrid_ext.load_error()}); "
                      "using the torch encoding (slower on CPU); run `studio doctor`")
            return False
        return True

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def update_step(self, global_step: int) -> int:
        """Set the progressive band for ``global_step``; returns the number of active levels."""
        if self.start_level is None:
            self.current_level = self.n_levels
        else:
            grown = max(int(global_step) - self.start_step, 0) // self.update_steps
            self.current_level = min(self.start_level + grown, self.n_levels)
        self.level_mask.copy_((torch.arange(self.n_levels, device=self.level_mask.device) < self.current_level).float())
        return self.current_level

    def table_index(self, level: int, coords: Tensor) -> Tensor:
        """Row of ``embeddings`` that holds vertex ``coords [...,3]`` (integer, ``0..N_l``) of ``level``."""
        lv = torch.as_tensor(level, device=coords.device).long()
        return self._index(coords.long(), lv)

    def _index(self, c: Tensor, levels: Tensor) -> Tensor:
        """Table rows of integer vertices ``c [...,3]``; ``levels`` broadcasts against ``c[..., 0]``."""
        verts = self.resolutions[levels] + 1
        dense_idx = c[..., 0] + c[..., 1] * verts + c[..., 2] * verts * verts
        hashed = (c[..., 0] * HASH_PRIMES[0]) ^ (c[..., 1] * HASH_PRIMES[1]) ^ (c[..., 2] * HASH_PRIMES[2])
        hashed = hashed & (2 ** self.log2_hashmap_size - 1)
        local = torch.where(self.dense_levels[levels], dense_idx, hashed)
        return local + self.level_offsets[levels]

    def forward(self, x: Tensor) -> Tensor:
        """Encode points ``x [...,3]`` in ``[0,1]^3`` -> ``[..., n_levels * n_features_per_level]``."""
        _check(isinstance(x, Tensor) and x.shape[-1:] == (3,), f"x must be a tensor [...,3], got {getattr(x, 'shape', None)}")
        lead = x.shape[:-1]
        p = x.reshape(-1, 3).to(self.embeddings.dtype).clamp(0.0, 1.0)
        N, L = p.shape[0], self.n_levels
        if self._use_native(p):
            from ._hashgrid_ext import hash_encode

            out = hash_encode(p, self.embeddings, *self._native_meta, self.current_level)
            return out.reshape(*lead, L * self.n_features_per_level)
        res = self.resolutions
        pos = p[:, None, :] * res.to(p.dtype)[None, :, None]  # [N,L,3]
        cell = torch.minimum(pos.detach().floor().long(), (res - 1)[None, :, None])  # x = 1 -> last cell
        frac = pos - cell.to(pos.dtype)
        # The 8 corners factor per axis: corner (bx, by, bz) has coordinate cell_a + b_a on axis a, weight
        # prod_a (frac_a if b_a else 1 - frac_a) and (dense or hashed) index combining per-axis terms.
        # Broadcasting [N,L,2,1,1] (x) [N,L,1,2,1] (y) [N,L,1,1,2] (z) keeps the work per corner to one op.
        c2 = torch.stack([cell, cell + 1], dim=-1)  # [N,L,3,2]
        w2 = torch.stack([1.0 - frac, frac], dim=-1)  # [N,L,3,2]
        w = w2[:, :, 0, :, None, None] * w2[:, :, 1, None, :, None] * w2[:, :, 2, None, None, :]
        nd = int(self._n_dense)
        parts = []
        # Per-axis terms are reduced to int32 before the [N,L,8] combination (4-8x less memory traffic):
        # exact, because table rows stay below 2^31 and (a ^ b ^ c) & m == (a & m) ^ (b & m) ^ (c & m).
        if nd > 0:
            v = (res[:nd] + 1)[None, :, None]
            cx = c2[:, :nd, 0].int()
            cy = (c2[:, :nd, 1] * v).int()
            cz = (c2[:, :nd, 2] * (v * v)).int()
            parts.append(cx[:, :, :, None, None] + cy[:, :, None, :, None] + cz[:, :, None, None, :])
        if nd < L:
            m = 2 ** self.log2_hashmap_size - 1
            hx = ((c2[:, nd:, 0] * HASH_PRIMES[0]) & m).int()
            hy = ((c2[:, nd:, 1] * HASH_PRIMES[1]) & m).int()
            hz = ((c2[:, nd:, 2] * HASH_PRIMES[2]) & m).int()
            parts.append((hx[:, :, :, None, None] ^ hy[:, :, None, :, None]) ^ hz[:, :, None, None, :])
        idx = torch.cat(parts, dim=1) + self.level_offsets.int()[None, :, None, None, None]  # [N,L,2,2,2]
        F_ = self.n_features_per_level
        feats = self.embeddings.index_select(0, idx.reshape(-1).long()).reshape(N, L, 8, F_)  # long: fast backward
        out = torch.einsum("nlc,nlcf->nlf", w.reshape(N, L, 8), feats)  # one pass (vs mul + sum)
        if self.current_level < L:
            out = out * self.level_mask.to(p.dtype)[None, :, None]
        return out.reshape(*lead, L * self.n_features_per_level)

    def extra_repr(self) -> str:
        return (f"n_levels={self.n_levels}, features={self.n_features_per_level}, T=2^{self.log2_hashmap_size}, "
                f"resolutions={self.resolutions.tolist()}, dense_levels={int(self.dense_levels.sum())}, "
                f"active_levels={self.current_level}, backend={self.backend}")


def _mlp(n_in: int, hidden: int, n_out: int, n_hidden_layers: int) -> nn.Sequential:
    """threestudio's ``VanillaMLP``: Linear layers without bias, ReLU between. Without biases a zero
    input gives exactly zero output, so the analytic bias of a field (blob, sphere) is its initial state."""
    layers: list[nn.Module] = []
    d = n_in
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(d, hidden, bias=False), nn.ReLU(inplace=False)]
        d = hidden
    layers.append(nn.Linear(d, n_out, bias=False))
    return nn.Sequential(*layers)


_DENSITY_ACTIVATIONS = ("softplus", "shifted_softplus", "exp", "relu")


def _activate_density(raw: Tensor, name: str) -> Tensor:
    if name == "softplus":
        return F.softplus(raw)
    if name == "shifted_softplus":
        return F.softplus(raw - 1.0)
    if name == "exp":
        return torch.exp(raw.clamp_max(20.0))
    return F.relu(raw)


def eikonal_loss(gradients: Tensor) -> Tensor:
    """Eikonal regulariser ``mean((|grad f| - 1)^2)`` over SDF gradients ``[...,3]`` (0 for a true SDF)."""
    return ((gradients.norm(dim=-1) - 1.0) ** 2).mean()


# ------------------------------------------------------------------------------------------------
# fields
# ------------------------------------------------------------------------------------------------


class _ImplicitField(nn.Module):
    """Shared parts: encoding, colour head, bbox mapping, optimiser groups, checkpoints."""

    kind = ""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        c = dict(config)
        _check(c["radius"] > 0, f"radius must be > 0, got {c['radius']}")
        _check(c["normal_method"] in ("autograd", "finite_difference"),
               f"normal_method must be 'autograd' or 'finite_difference', got {c['normal_method']!r}")
        self.config = c
        self.radius = float(c["radius"])
        self.normal_method = c["normal_method"]
        self.fd_eps = float(c["fd_eps"])
        self.encoding = HashGridEncoding(
            c["n_levels"], c["n_features_per_level"], c["log2_hashmap_size"], c["base_resolution"],
            c["per_level_scale"], start_level=c["start_level"], start_step=c["start_step"],
            update_steps=c["update_steps"], seed=c["seed"])
        with seeded(c["seed"]):
            self._build_heads()
            self.color_net = _mlp(self.encoding.n_output_dims, c["hidden_dim"], 3, c["n_hidden_layers"])
        self.step = 0

    def _build_heads(self) -> None:
        raise NotImplementedError

    @property
    def bbox(self) -> Tensor:
        """``[2,3]`` (min, max) of the field's cube (what ``render_field`` samples by default)."""
        return normalize_bbox(self.radius)

    @property
    def device(self) -> torch.device:
        return self.encoding.embeddings.device

    def encode(self, points: Tensor) -> Tensor:
        return self.encoding((points + self.radius) / (2.0 * self.radius))

    def color(self, points: Tensor) -> Tensor:
        return torch.sigmoid(self.color_net(self.encode(points)))

    def update_step(self, global_step: int) -> None:
        """Per-step schedules (progressive hash band)."""
        self.step = int(global_step)
        self.encoding.update_step(global_step)

    def _scalar(self, points: Tensor) -> Tensor:  # density (NeRF) or sdf (NeuS), [N]
        raise NotImplementedError

    def _fd_gradient(self, points: Tensor) -> Tensor:
        """Central differences of the field's scalar with step ``fd_eps``: ``[N,3]``."""
        e = self.fd_eps
        offs = torch.eye(3, dtype=points.dtype, device=points.device) * e
        pts = torch.cat([points[:, None, :] + offs, points[:, None, :] - offs], dim=1).reshape(-1, 3)
        v = self._scalar(pts).reshape(-1, 2, 3)
        return (v[:, 0] - v[:, 1]) / (2 * e)

    def _value_and_gradient(self, points: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Scalar ``[N]`` and its spatial gradient ``[N,3]`` (``None`` if not needed). With autograd the
        gradient is part of the graph (create_graph) whenever grad mode is on, so losses on normals and
        the eikonal term train the field."""
        if not need_grad:
            return self._scalar(points), None
        if self.normal_method == "finite_difference":
            return self._scalar(points), self._fd_gradient(points)
        train = torch.is_grad_enabled()
        with torch.enable_grad():
            x = points if points.requires_grad else points.detach().requires_grad_(True)
            v = self._scalar(x)
            g = torch.autograd.grad(v, x, torch.ones_like(v), create_graph=train)[0]
        if not train:
            v, g = v.detach(), g.detach()
        return v, g

    # -- optimisation ----------------------------------------------------------------------------
    def param_groups(self, lr_encoding: float = 0.01, lr_mlp: float = 1e-3, **extra_lrs: float) -> list[dict[str, Any]]:
        """Adam parameter groups, each named: ``encoding`` (hash table), ``geometry`` (density / SDF
        MLP), ``color`` (colour MLP) and, for NeuS, ``variance``. ``extra_lrs`` sets a group's rate by
        name (``lr_variance=...``)."""
        groups = [
            {"name": "encoding", "params": [self.encoding.embeddings], "lr": float(lr_encoding)},
            {"name": "geometry", "params": list(self._geometry_params()), "lr": float(lr_mlp)},
            {"name": "color", "params": list(self.color_net.parameters()), "lr": float(lr_mlp)},
        ]
        groups += self._extra_groups(lr_mlp)
        for key, lr in extra_lrs.items():
            name = key.removeprefix("lr_")
            hit = [g for g in groups if g["name"] == name]
            _check(bool(hit), f"unknown parameter group {name!r}; groups: {[g['name'] for g in groups]}")
            hit[0]["lr"] = float(lr)
        return groups

    def _geometry_params(self):
        raise NotImplementedError

    def _extra_groups(self, lr_mlp: float) -> list[dict[str, Any]]:
        return []

    def make_optimizer(self, lr_encoding: float = 0.01, lr_mlp: float = 1e-3, *, betas=(0.9, 0.99),
                       eps: float = 1e-15, **extra_lrs: float) -> torch.optim.Adam:
        """Adam over ``param_groups`` (threestudio: betas (0.9, 0.99), eps 1e-15)."""
        return torch.optim.Adam(self.param_groups(lr_encoding, lr_mlp, **extra_lrs), betas=betas, eps=eps)

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``path`` (``.safetensors`` added if missing) atomically: the state dict, with the class,
        config and step as JSON in the header. Reload with :func:`load_field`."""
        from safetensors.torch import save as st_save

        p = Path(path)
        if p.suffix != ".safetensors":
            p = p.with_name(p.name + ".safetensors")
        info = {"format": FIELD_FORMAT, "version": FIELD_VERSION, "class": type(self).__name__,
                "config": self.config, "step": self.step, "metadata": dict(metadata or {})}
        try:
            text = json.dumps(info, sort_keys=True)
        except TypeError as exc:
            raise UserError(f"field metadata must be JSON-serialisable: {exc}") from None
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        return atomic_write_bytes(p, st_save(tensors, metadata={"studio": text}))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, radius={self.radius}, normal_method={self.normal_method}"


def _field_config(**kw: Any) -> dict[str, Any]:
    return kw


class NeRFField(_ImplicitField):
    """Hash-grid NeRF (DreamPolish stage G1; threestudio's ``ImplicitVolume``).

    ``density(x) = act(MLP_d(enc(x)) + bias(x))`` with ``act`` softplus (or shifted_softplus / exp /
    relu) and the Magic3D blob bias ``bias(x) = blob_density * (1 - |x| / blob_radius)`` (``"blob"``;
    ``"none"`` for none). The MLPs have no biases and the hash table starts at ~1e-4, so at
    initialisation ``density(x) ~= act(bias(x))``: a soft ball of radius ~``blob_radius``. Colour:
    ``sigmoid(MLP_c(enc(x)))`` (grey 0.5 at init; view-independent, as threestudio's text-to-3D
    fields). Normals: ``-grad density / |grad density|`` by autograd or central differences.
    ``isosurface_threshold`` is the density level of the exported surface (threestudio's default
    for ``ImplicitVolume`` is 25; reconstructed, not verified against a paper).
    """

    kind = "nerf"

    def __init__(self, *, radius: float = 1.0, n_levels: int = 16, n_features_per_level: int = 2,
                 log2_hashmap_size: int = 15, base_resolution: int = 16, per_level_scale: float = 1.447269237440378,
                 start_level: int | None = None, start_step: int = 0, update_steps: int | None = None,
                 hidden_dim: int = 64, n_hidden_layers: int = 1, density_activation: str = "softplus",
                 density_bias: str = "blob", blob_density: float = 10.0, blob_radius: float = 0.5,
                 isosurface_threshold: float = 25.0, normal_method: str = "finite_difference",
                 fd_eps: float = 1e-2, seed: int = 0):
        _check(density_activation in _DENSITY_ACTIVATIONS,
               f"density_activation must be one of {_DENSITY_ACTIVATIONS}, got {density_activation!r}")
        _check(density_bias in ("blob", "none"), f"density_bias must be 'blob' or 'none', got {density_bias!r}")
        _check(blob_radius > 0, f"blob_radius must be > 0, got {blob_radius}")
        super().__init__(_field_config(
            radius=radius, n_levels=n_levels, n_features_per_level=n_features_per_level,
            log2_hashmap_size=log2_hashmap_size, base_resolution=base_resolution, per_level_scale=per_level_scale,
            start_level=start_level, start_step=start_step, update_steps=update_steps, hidden_dim=hidden_dim,
            n_hidden_layers=n_hidden_layers, density_activation=density_activation, density_bias=density_bias,
            blob_density=blob_density, blob_radius=blob_radius, isosurface_threshold=isosurface_threshold,
            normal_method=normal_method, fd_eps=fd_eps, seed=seed))
        self.density_activation = density_activation
        self.isosurface_threshold = float(isosurface_threshold)

    def _build_heads(self) -> None:
        c = self.config
        self.density_net = _mlp(self.encoding.n_output_dims, c["hidden_dim"], 1, c["n_hidden_layers"])

    def _geometry_params(self):
        return self.density_net.parameters()

    def density_bias(self, points: Tensor) -> Tensor:
        """The analytic pre-activation bias ``[N]`` (Magic3D blob or 0)."""
        if self.config["density_bias"] == "none":
            return points.new_zeros(points.shape[:-1])
        c = self.config
        return c["blob_density"] * (1.0 - points.norm(dim=-1) / c["blob_radius"])

    def density(self, points: Tensor) -> Tensor:
        """Activated density ``[N]`` at world points ``[N,3]``."""
        raw = self.density_net(self.encode(points))[..., 0] + self.density_bias(points)
        return _activate_density(raw, self.density_activation)

    _scalar = density

    def normals(self, points: Tensor) -> Tensor:
        """Unit normals ``-grad density / |grad density|`` ``[N,3]`` (``normal_method``)."""
        _, g = self._value_and_gradient(points, True)
        return -g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def forward(self, points: Tensor, dirs: Tensor | None = None, *, with_normals: bool = False) -> dict[str, Tensor]:
        """The render protocol: ``density [N]``, ``rgb [N,3]`` and, with normals, ``normal [N,3]``.
        ``dirs`` is unused (view-independent colour)."""
        dens, g = self._value_and_gradient(points, with_normals)
        out = {"density": dens, "rgb": self.color(points)}
        if g is not None:
            out["normal"] = -g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return out


class NeuSField(_ImplicitField):
    """Hash-grid NeuS SDF (DreamPolish stage G2; threestudio's ``ImplicitSDF`` + NeuS renderer).

    ``sdf(x) = MLP_s(enc(x)) + (|x| - sphere_radius)`` (``sdf_bias="sphere"``; ``"none"`` for none): with
    bias-free MLPs and a ~1e-4 table the initial field is the sphere SDF, so its eikonal residual is ~0.
    Sharpness ``inv_s = exp(10 * variance)`` (NeuS's single-parameter "deviation network"), clamped to
    ``[1e-6, 1e6]``; ``variance`` starts at ``init_variance`` (0.3 -> inv_s ~ 20, NeuS's value).
    Normals: the unit SDF gradient (autograd by default, part of the graph while training; or central
    differences, DreamCraft3D's choice). Colour: ``sigmoid(MLP_c(enc(x)))``.
    """

    kind = "neus"

    def __init__(self, *, radius: float = 1.0, n_levels: int = 16, n_features_per_level: int = 2,
                 log2_hashmap_size: int = 15, base_resolution: int = 16, per_level_scale: float = 1.447269237440378,
                 start_level: int | None = None, start_step: int = 0, update_steps: int | None = None,
                 hidden_dim: int = 64, n_hidden_layers: int = 1, sdf_bias: str = "sphere", sphere_radius: float = 0.5,
                 init_variance: float = 0.3, normal_method: str = "autograd", fd_eps: float = 1e-2, seed: int = 0):
        _check(sdf_bias in ("sphere", "none"), f"sdf_bias must be 'sphere' or 'none', got {sdf_bias!r}")
        _check(sphere_radius > 0, f"sphere_radius must be > 0, got {sphere_radius}")
        super().__init__(_field_config(
            radius=radius, n_levels=n_levels, n_features_per_level=n_features_per_level,
            log2_hashmap_size=log2_hashmap_size, base_resolution=base_resolution, per_level_scale=per_level_scale,
            start_level=start_level, start_step=start_step, update_steps=update_steps, hidden_dim=hidden_dim,
            n_hidden_layers=n_hidden_layers, sdf_bias=sdf_bias, sphere_radius=sphere_radius,
            init_variance=init_variance, normal_method=normal_method, fd_eps=fd_eps, seed=seed))
        self.variance = nn.Parameter(torch.tensor(float(init_variance)))

    def _build_heads(self) -> None:
        c = self.config
        self.sdf_net = _mlp(self.encoding.n_output_dims, c["hidden_dim"], 1, c["n_hidden_layers"])

    def _geometry_params(self):
        return self.sdf_net.parameters()

    def _extra_groups(self, lr_mlp: float) -> list[dict[str, Any]]:
        return [{"name": "variance", "params": [self.variance], "lr": float(lr_mlp)}]

    @property
    def inv_s(self) -> Tensor:
        """NeuS sharpness ``s = exp(10 variance)`` (scalar tensor, differentiable)."""
        return torch.exp(self.variance * 10.0).clamp(1e-6, 1e6)

    def sdf_bias(self, points: Tensor) -> Tensor:
        if self.config["sdf_bias"] == "none":
            return points.new_zeros(points.shape[:-1])
        return points.norm(dim=-1) - self.config["sphere_radius"]

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance ``[N]`` (negative inside)."""
        return self.sdf_net(self.encode(points))[..., 0] + self.sdf_bias(points)

    _scalar = sdf

    def gradient(self, points: Tensor) -> Tensor:
        """SDF gradient ``[N,3]`` (``normal_method``)."""
        return self._value_and_gradient(points, True)[1]

    def eikonal_loss(self, points: Tensor) -> Tensor:
        """:func:`eikonal_loss` of the SDF gradient at ``points [N,3]``."""
        return eikonal_loss(self.gradient(points))

    def forward(self, points: Tensor, dirs: Tensor | None = None, *, with_normals: bool = True) -> dict[str, Tensor]:
        """The render protocol: ``sdf [N]``, ``rgb [N,3]``, ``inv_s`` and, with normals, ``normal [N,3]``
        and the raw ``gradient [N,3]`` (for the eikonal loss). ``dirs`` is unused."""
        sdf, g = self._value_and_gradient(points, with_normals)
        out = {"sdf": sdf, "rgb": self.color(points), "inv_s": self.inv_s}
        if g is not None:
            out["gradient"] = g
            out["normal"] = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return out


def load_field(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> NeRFField | NeuSField:
    """Rebuild a field written by ``field.save`` (safetensors only; nothing is unpickled)."""
    from safetensors import safe_open

    p = Path(path)
    if p.suffix != ".safetensors" and not p.is_file():
        p = p.with_name(p.name + ".safetensors")
    _check(p.is_file(), f"field checkpoint '{path}' not found; expected a file written by NeRFField/NeuSField.save")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            info = json.loads((f.metadata() or {})["studio"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear UserError
        raise UserError(f"could not read field checkpoint '{p}': {exc}") from None
    classes = {"NeRFField": NeRFField, "NeuSField": NeuSField}
    _check(info.get("format") == FIELD_FORMAT and info.get("class") in classes,
           f"'{p}' is not a studio field checkpoint (format {info.get('format')!r}, class {info.get('class')!r})")
    field = classes[info["class"]](**info["config"])
    field.load_state_dict(tensors)
    field.update_step(int(info.get("step", 0)))
    return field.to(device)


# ------------------------------------------------------------------------------------------------
# grids, meshes, conversion
# ------------------------------------------------------------------------------------------------


def _grid_points(resolution: int, bbox: Tensor, device) -> Tensor:
    axes = [torch.linspace(float(bbox[0, i]), float(bbox[1, i]), resolution, device=device) for i in range(3)]
    X, Y, Z = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([X, Y, Z], dim=-1).reshape(-1, 3)


def _scalar_of(field: Any, points: Tensor) -> Tensor:
    kind = getattr(field, "kind", None)
    out = field(points, None, with_normals=False)
    if kind == "neus" or "sdf" in out:
        return out["sdf"].reshape(-1)
    return out["density"].reshape(-1)


@torch.no_grad()
def sdf_grid(field: Any, resolution: int = 64, bbox: Any = None, *, chunk: int = 65536) -> Tensor:
    """The field's scalar on ``linspace(bbox_min, bbox_max, resolution)^3``: ``[R,R,R]`` indexed
    ``[x, y, z]`` (corner-aligned, so the grid includes the box faces). NeuS gives the SDF (negative
    inside), NeRF the activated density. ``bbox`` defaults to ``field.bbox``."""
    _check(isinstance(resolution, int) and resolution >= 2, f"resolution must be an int >= 2, got {resolution!r}")
    b = normalize_bbox(getattr(field, "bbox", 1.0) if bbox is None else bbox)
    dev = getattr(field, "device", torch.device("cpu"))
    pts = _grid_points(resolution, b, dev)
    vals = torch.cat([_scalar_of(field, pts[s:s + chunk]) for s in range(0, pts.shape[0], chunk)])
    return vals.reshape(resolution, resolution, resolution).float().cpu()


def extract_mesh(field: Any, resolution: int = 64, threshold: float | None = None, bbox: Any = None) -> tuple[Tensor, Tensor]:
    """Marching cubes (scikit-image) of the field's surface: ``(verts [V,3] float32, faces [F,3] long)``
    in world coordinates, faces counter-clockwise seen from outside (outward normals, the convention
    of ``studio.render.face_normals``).

    NeuS: the level set ``sdf = threshold`` (default 0). NeRF: ``density = threshold`` (default
    ``field.isosurface_threshold``), the inside being denser. Raises ``UserError`` when scikit-image is
    missing or the level lies outside the grid's range (no surface)."""
    try:
        from skimage.measure import marching_cubes
    except ImportError:
        raise UserError("extract_mesh needs scikit-image for marching cubes: pip install scikit-image") from None
    b = normalize_bbox(getattr(field, "bbox", 1.0) if bbox is None else bbox)
    vals = sdf_grid(field, resolution, b)
    if getattr(field, "kind", None) == "neus":
        level = 0.0 if threshold is None else float(threshold)
        vol, lv = -vals, -level  # inside positive
    else:
        level = float(getattr(field, "isosurface_threshold", 25.0) if threshold is None else threshold)
        vol, lv = vals, level
    lo, hi = float(vol.min()), float(vol.max())
    if not lo < lv < hi:
        raise UserError(f"no surface at level {level}: the field's values range over "
                        f"[{float(vals.min()):.3g}, {float(vals.max()):.3g}] on a {resolution}^3 grid; "
                        "pass a threshold inside that range")
    spacing = ((b[1] - b[0]) / (resolution - 1)).tolist()
    verts, faces, _, _ = marching_cubes(vol.numpy(), level=lv, spacing=tuple(spacing))
    v = torch.as_tensor(verts.copy(), dtype=torch.float32) + b[0]
    # With "inside = larger values" scikit-image winds faces clockwise seen from outside; flip them.
    f = torch.as_tensor(faces[:, ::-1].copy(), dtype=torch.long)
    return v, f


def _iso_crossings(vals: Tensor, thr: float, bbox: Tensor) -> Tensor:
    """Points where the grid ``vals [R,R,R]`` (on ``linspace(bbox)^3``) crosses ``thr`` along the grid
    edges, placed by linear interpolation between the two grid points (as marching cubes does): ``[M,3]``."""
    R = vals.shape[0]
    pts = _grid_points(R, bbox, "cpu").reshape(R, R, R, 3)
    out = []
    for ax in range(3):
        a, b = vals.narrow(ax, 0, R - 1), vals.narrow(ax, 1, R - 1)
        pa, pb = pts.narrow(ax, 0, R - 1), pts.narrow(ax, 1, R - 1)
        cross = (a > thr) != (b > thr)
        t = ((thr - a) / (b - a))[cross].clamp(0, 1)[:, None]
        out.append(pa[cross] + t * (pb[cross] - pa[cross]))
    return torch.cat(out)


def neus_from_nerf(nerf: NeRFField, *, threshold: float | None = None, neus: NeuSField | None = None,
                   steps: int = 300, batch: int = 4096, resolution: int = 48, lr_encoding: float = 0.01,
                   lr_mlp: float = 1e-3, normal_weight: float = 0.1, eikonal_weight: float = 0.1,
                   sign_weight: float = 1.0, color_weight: float = 1.0, seed: int = 0,
                   **neus_kwargs: Any) -> NeuSField:
    """Fit a :class:`NeuSField` whose zero level set is ``nerf``'s iso-surface ``density = threshold``.

    Our reconstruction of the NeRF -> NeuS hand-over of DreamCraft3D-style pipelines (spec 3.3, G1 ->
    G2); the papers do not spell it out. It is an IGR-style fit (Gropp et al. 2020, "Implicit Geometric
    Regularization"): surface samples pin the zero level set, the eikonal term makes the field a
    distance, and a hinge on the occupancy sign removes spurious surfaces. Steps:

    1. The NeRF's density on a ``resolution^3`` grid over its box (``threshold`` defaults to
       ``nerf.isosurface_threshold``). Where it crosses the threshold along a grid edge a *surface
       point* is placed by linear interpolation (as marching cubes does); its target normal is the
       NeRF's ``-grad density`` direction there.
    2. Unless ``neus`` is given, a NeuS field with the NeRF's encoding settings is built, its initial
       sphere radius the equal-volume radius ``(3 V / 4 pi)^(1/3)`` of the occupied grid
       (``neus_kwargs`` override any NeuS argument).
    3. ``steps`` Adam steps on ``batch`` points each: half surface points, a quarter uniform in the box,
       a quarter surface points jittered by one grid cell. Loss

       ``mean |sdf(surface)| + normal_weight mean |grad sdf(surface) - n|^2``
       ``+ eikonal_weight eikonal(all) + sign_weight mean relu(-s(x) sdf(x))`` (off-surface points,
       ``s = +1`` outside, ``-1`` inside by the NeRF's occupancy: zero once the sign is right, so it
       never inflates the SDF) ``+ color_weight MSE(rgb_neus, rgb_nerf)`` on the surface points.

    Returns the fitted NeuS field (its ``inv_s`` is left at its initial value).
    """
    _check(isinstance(nerf, NeRFField), f"nerf must be a NeRFField, got {type(nerf).__name__}")
    _check(isinstance(steps, int) and steps >= 0, f"steps must be an int >= 0, got {steps!r}")
    _check(isinstance(batch, int) and batch >= 4, f"batch must be an int >= 4, got {batch!r}")
    thr = float(nerf.isosurface_threshold if threshold is None else threshold)
    dev = nerf.device
    b = nerf.bbox
    dens = sdf_grid(nerf, resolution, b)  # [R,R,R] on CPU
    frac_in = float((dens > thr).float().mean())
    _check(0.0 < frac_in < 1.0, f"the NeRF has no surface at density {thr}: the occupied fraction of its box is "
                                f"{frac_in:.3g} on a {resolution}^3 grid; pass a threshold between its density "
                                f"values [{float(dens.min()):.3g}, {float(dens.max()):.3g}]")
    cell = float((b[1] - b[0]).max()) / (resolution - 1)
    surf = _iso_crossings(dens, thr, b).to(dev)
    with torch.no_grad():
        surf_n = torch.cat([nerf.normals(surf[s:s + 65536]) for s in range(0, surf.shape[0], 65536)])
        surf_rgb = torch.cat([nerf.color(surf[s:s + 65536]) for s in range(0, surf.shape[0], 65536)])
    if neus is None:
        volume = frac_in * float((b[1] - b[0]).prod())
        cfg = {k: nerf.config[k] for k in ("radius", "n_levels", "n_features_per_level", "log2_hashmap_size",
                                           "base_resolution", "per_level_scale", "hidden_dim", "n_hidden_layers")}
        cfg["sphere_radius"] = (3.0 * volume / (4.0 * math.pi)) ** (1.0 / 3.0)
        cfg.update(neus_kwargs)
        neus = NeuSField(**cfg).to(dev)
    bd = b.to(dev)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    opt = neus.make_optimizer(lr_encoding, lr_mlp)
    n_s = batch // 2
    n_u = (batch - n_s) // 2
    n_j = batch - n_s - n_u
    for _ in range(steps):
        i_s = torch.randint(0, surf.shape[0], (n_s,), generator=g).to(dev)
        uni = bd[0] + torch.rand(n_u, 3, generator=g).to(dev) * (bd[1] - bd[0])
        i_j = torch.randint(0, surf.shape[0], (n_j,), generator=g).to(dev)
        jit = surf[i_j] + torch.randn(n_j, 3, generator=g).to(dev) * cell
        off = torch.cat([uni, jit])
        with torch.no_grad():
            side = torch.where(nerf.density(off) > thr, -1.0, 1.0)  # +1 outside, -1 inside
        out = neus(torch.cat([surf[i_s], off]), None, with_normals=True)
        sdf, grad = out["sdf"], out["gradient"]
        loss = sdf[:n_s].abs().mean()
        loss = loss + normal_weight * ((grad[:n_s] - surf_n[i_s]) ** 2).sum(-1).mean()
        loss = loss + eikonal_weight * eikonal_loss(grad) + sign_weight * F.relu(-side * sdf[n_s:]).mean()
        if color_weight > 0:
            loss = loss + color_weight * F.mse_loss(out["rgb"][:n_s], surf_rgb[i_s])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return neus
