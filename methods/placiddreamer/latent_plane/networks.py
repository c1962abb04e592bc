"""The Latent-Plane networks and their UNet hook.

The plug-in reads and rewrites the feature map at the output of one UNet up-block (up-block 2: 640
channels at 32x32 for 256-px Zero123 latents). The 8 samples of a batch are the 8 ring cameras
(:mod:`.ring`).

* :class:`CoarsePlane` predicts a density. For every pixel ray of every ring view it takes 32 uniform
  samples between the ray's entry into and exit from the cube ``[-0.5, 0.5]^3``. It projects each sample
  into all 8 views and reads their features bilinearly (border padding). It builds 9 tokens: a sigma
  token plus one token per view, where a view token is ``Linear(feat -> 32)``, ``PE(camera position)``
  and ``PE(xyz)``. It applies a LayerNorm and then **one** attention module **twice** (the weights are
  shared, as in the official ``nn.Sequential([attn] * 2)``). Density is read from the sigma token and
  volume-rendered into an occupancy map. :meth:`CoarsePlane.density_grid` evaluates the same network on a
  ``res^3`` grid: raw sigma ``[B, R, R, R]`` on ``linspace(-0.5, 0.5, R)^3``, indexed ``[x, y, z]`` in
  **our y-up frame** (:func:`~.gaussian_init.density_to_mesh` turns it into a mesh).
* :class:`FinePlane` runs the same sampling with the full features and shared attention. It outputs
  per-view residual features, volume-renders them with the **coarse** sigma and composites them into the
  feature map: ``f_out = f_in * (1 - occ) + f_rendered``. This is an exact identity where ``occ == 0``.
* :class:`LatentPlane` holds the coarse and fine planes. :meth:`LatentPlane.attach` registers a forward
  hook on ``unet.up_blocks[block_index]`` of any diffusers ``UNet2DConditionModel``.
* :class:`ShapeWorldFeatures`: the host features of a plane that reads ring *images* instead of UNet
  features (our ShapeWorld reconstruction; the embedded default has no multi-view UNet).

Conventions (documented choices)
--------------------------------
* **Time embedding.** Every plane accepts either ``temb``, the UNet's timestep embedding (``emb`` as
  the up-blocks receive it, ``[N, time_embed_dim]``, which is what the official code feeds), or a scalar
  / per-batch ``t``. A ``t`` is mapped by the sinusoidal ``diffusers`` ``get_timestep_embedding`` to
  ``time_embed_dim`` channels, **without** the UNet's learnt MLP: use ``temb`` with the official weights.
  The official code reads the embedding of the first view of each group of 8, and so do we.
* **Conditional branch only** (official: the plane is passed only to the conditional UNet call). When
  hooked, the plane rewrites groups of 8 samples chosen as follows. If ``LatentPlane.enabled`` is False
  it rewrites nothing. Inside ``with plane.branches(mask)``, it rewrites group ``g`` iff ``mask[g]``.
  Otherwise it follows the diffusers convention: a batch of 8 (a separate conditional call, as in the
  official pipeline) is rewritten, and a batch of ``16 k`` is taken as ``cat([uncond, cond])`` with only
  the second half rewritten. Use ``with plane.disabled():`` around the unconditional call when the
  branches run separately. The official schedule, active in the first 45 of 50 steps, is the caller's
  toggle of ``enabled``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ring import (CUBE_HALF, RING_N, camera_rays, positional_encoding, ring_cameras, sample_along_rays,
                   sample_view_features, to_official_frame, volume_render_weights)


def composite(f_in: Tensor, occ: Tensor, rendered: Tensor) -> Tensor:
    """``f_out = f_in * (1 - occ) + rendered``: exactly ``f_in`` where ``occ == 0`` and ``rendered == 0``."""
    return f_in * (1 - occ) + rendered


def _time_features(temb: Tensor | None, t, batch: int, dim: int, device, dtype) -> Tensor:
    """Per-batch time embedding ``[batch, dim]`` from the UNet's ``temb`` (``[batch * 8, dim]`` or
    ``[batch, dim]``; first view of each group) or from a scalar / ``[batch]`` ``t`` (sinusoidal)."""
    if temb is not None:
        if temb.dim() != 2 or temb.shape[-1] != dim:
            raise ValueError(f"temb must have shape [N, {dim}] (the UNet's time embedding), got {tuple(temb.shape)}")
        if temb.shape[0] == batch * RING_N:
            temb = temb.reshape(batch, RING_N, dim)[:, 0]
        elif temb.shape[0] == 1:
            temb = temb.expand(batch, dim)
        elif temb.shape[0] != batch:
            raise ValueError(f"temb has {temb.shape[0]} rows; expected {batch * RING_N}, {batch} or 1")
        return temb.to(device=device, dtype=dtype)
    from diffusers.models.embeddings import get_timestep_embedding

    tt = torch.zeros(batch) if t is None else torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    if tt.numel() == 1:
        tt = tt.expand(batch)
    if tt.numel() != batch:
        raise ValueError(f"t must be a scalar or have {batch} entries, got {tt.numel()}")
    emb = get_timestep_embedding(tt.float(), dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    return emb.to(device=device, dtype=dtype)


def _check_feats(feats: Tensor, feat_dim: int) -> tuple[int, int, int]:
    if feats.dim() != 5 or feats.shape[1] != RING_N or feats.shape[2] != feat_dim:
        raise ValueError(f"features must have shape [B, {RING_N}, {feat_dim}, H, W], got {tuple(feats.shape)}")
    if feats.shape[-1] != feats.shape[-2]:
        raise ValueError(f"feature maps must be square, got {feats.shape[-2]}x{feats.shape[-1]}")
    return feats.shape[0], feats.shape[-2], feats.shape[-1]


def _shared_attention(dim: int, heads: int, dim_head: int) -> nn.Module:
    from diffusers.models.attention_processor import Attention

    return Attention(query_dim=dim, heads=heads, dim_head=dim_head, residual_connection=True)



# ------------------------------------------------------------------------------------------- planes

class CoarsePlane(nn.Module):
    """Density network of the Latent-Plane (official ``LatentPlane_Coarse``).

    The defaults are the official shapes: 640-d features, a 1280-d UNet time embedding, a 32-d latent
    feature, 10 PE frequencies (token width ``32 + 2 * 63 = 158``), attention with 8 heads of 8
    channels, applied ``n_layers = 2`` times with shared weights, and 32 samples per ray.
    """

    def __init__(self, feat_dim: int = 640, time_embed_dim: int = 1280, *, latent_dim: int = 32,
                 time_dim: int = 32, heads: int = 8, dim_head: int = 8, n_freqs: int = 10, n_layers: int = 2,
                 n_samples: int = 32, grid_size: int = 64, chunk: int = 32768):
        super().__init__()
        self.config = dict(feat_dim=feat_dim, time_embed_dim=time_embed_dim, latent_dim=latent_dim,
                           time_dim=time_dim, heads=heads, dim_head=dim_head, n_freqs=n_freqs, n_layers=n_layers,
                           n_samples=n_samples, grid_size=grid_size, chunk=chunk)
        self.feat_dim, self.time_embed_dim, self.n_freqs = feat_dim, time_embed_dim, n_freqs
        self.n_layers, self.n_samples, self.grid_size, self.chunk = n_layers, n_samples, grid_size, chunk
        pe = 3 + 6 * n_freqs
        self.width = latent_dim + 2 * pe
        self.feature_proj = nn.Linear(feat_dim, latent_dim)          # official latent_feature_ln
        self.time_proj = nn.Linear(time_embed_dim, time_dim)         # official time_feature_ln
        self.sigma_token = nn.Parameter(torch.randn(latent_dim))     # official sigma_embeddings
        self.sigma_query = nn.Linear(latent_dim + time_dim, self.width)  # official sigma_query_ln
        self.norm = nn.LayerNorm(self.width)                         # official transformer_layer_norm
        self.attn = _shared_attention(self.width, heads, dim_head)   # official transformer.0 (== .1)
        self.sigma_head = nn.Linear(self.width, 1)                   # official sigma_net
        ring = ring_cameras(32)
        self.register_buffer("cam_pe", positional_encoding(to_official_frame(ring.centers), n_freqs),
                             persistent=False)

    # -- internals -----------------------------------------------------------------------------------------
    def time_features(self, batch: int, temb: Tensor | None = None, t=None) -> Tensor:
        dev, dt = self.sigma_token.device, self.sigma_token.dtype
        return _time_features(temb, t, batch, self.time_embed_dim, dev, dt)

    def _sigma_query(self, tfeat: Tensor) -> Tensor:
        tok = torch.cat([self.sigma_token[None].expand(tfeat.shape[0], -1), self.time_proj(tfeat)], dim=-1)
        return self.sigma_query(tok)  # [B, width]

    def point_sigma(self, proj_feats: Tensor, pts: Tensor, query: Tensor) -> Tensor:
        """Raw density at world points ``pts [P,3]``. ``proj_feats [B,V,latent,H,W]`` are the features
        after :attr:`feature_proj` and ``query [B, width]`` is the sigma token. Returns ``[B, P]``."""
        B = proj_feats.shape[0]
        out = []
        for s in range(0, pts.shape[0], max(1, self.chunk // max(B, 1))):
            p = pts[s: s + max(1, self.chunk // max(B, 1))]
            P = p.shape[0]
            f = sample_view_features(proj_feats, p)  # [B,P,V,L]
            xyz = positional_encoding(to_official_frame(p), self.n_freqs).to(f.dtype)
            tok = torch.cat([f, self.cam_pe.to(f.dtype)[None, None].expand(B, P, -1, -1),
                             xyz[None, :, None].expand(B, P, RING_N, -1)], dim=-1)
            tok = torch.cat([query[:, None, None].expand(B, P, 1, -1).to(f.dtype), tok], dim=2)
            x = self.norm(tok.reshape(B * P, RING_N + 1, self.width))
            for _ in range(self.n_layers):
                x = self.attn(x)
            out.append(self.sigma_head(x[:, 0]).reshape(B, P))
        return torch.cat(out, dim=1)

    def project(self, feats: Tensor) -> Tensor:
        """``Linear(feat -> latent)`` on the feature maps ``[B,V,C,H,W]`` (it commutes with bilinear
        sampling, so it is applied before sampling, as in the official code)."""
        return self.feature_proj(feats.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)

    # -- public --------------------------------------------------------------------------------------------
    def render_rays(self, feats: Tensor, rays_o: Tensor, rays_d: Tensor, *, temb: Tensor | None = None,
                    t=None) -> dict[str, Tensor]:
        """Occupancy of arbitrary rays ``rays_o, rays_d [R,3]`` (unnormalised directions, world frame):
        ``occ [B,R]``, ``sigma [B,R,S]`` (raw), ``weights [B,R,S]``, ``dists [R,S]``, ``pts [R,S,3]``."""
        B, _, _ = _check_feats(feats, self.feat_dim)
        feats = feats.to(self.sigma_token.dtype)
        pts, dists, _ = sample_along_rays(rays_o.to(feats), rays_d.to(feats), self.n_samples)
        R, S = dists.shape
        query = self._sigma_query(self.time_features(B, temb, t))
        sigma = self.point_sigma(self.project(feats), pts.reshape(-1, 3), query).reshape(B, R, S)
        w = volume_render_weights(sigma, dists[None])
        return {"occ": w.sum(-1), "sigma": sigma, "weights": w, "dists": dists, "pts": pts}

    def forward(self, feats: Tensor, temb: Tensor | None = None, t=None, views: Sequence[int] | None = None
                ) -> dict[str, Tensor]:
        """Render the ring views ``views`` (default all 8) at the feature resolution: ``occ [B,V',1,H,W]``,
        ``sigma [B,V',H*W,S]``, ``dists [V',H*W,S]``."""
        B, H, W = _check_feats(feats, self.feat_dim)
        views = list(range(RING_N)) if views is None else list(views)
        ro, rd = camera_rays(ring_cameras(W))
        ro, rd = ro[views].reshape(-1, 3), rd[views].reshape(-1, 3)
        r = self.render_rays(feats, ro, rd, temb=temb, t=t)
        V = len(views)
        return {"occ": r["occ"].reshape(B, V, 1, H, W), "sigma": r["sigma"].reshape(B, V, H * W, -1),
                "weights": r["weights"].reshape(B, V, H * W, -1), "dists": r["dists"].reshape(V, H * W, -1)}

    def density_grid(self, feats: Tensor, temb: Tensor | None = None, t=None, res: int | None = None) -> Tensor:
        """Raw sigma on ``linspace(-0.5, 0.5, res)^3`` (default ``grid_size`` = 64), ``[B,res,res,res]``,
        indexed ``[x, y, z]`` in our y-up frame."""
        B, _, _ = _check_feats(feats, self.feat_dim)
        res = self.grid_size if res is None else int(res)
        feats = feats.to(self.sigma_token.dtype)
        g = torch.linspace(-CUBE_HALF, CUBE_HALF, res, device=feats.device, dtype=feats.dtype)
        pts = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
        query = self._sigma_query(self.time_features(B, temb, t))
        return self.point_sigma(self.project(feats), pts, query).reshape(B, res, res, res)


class FinePlane(nn.Module):
    """Feature network of the Latent-Plane (official ``LatentPlane_Fine``).

    The tokens are one per view, ``[feature (C), PE(camera), PE(xyz)]`` (width ``640 + 126 = 766``
    officially). A LayerNorm is followed by one attention module (8 heads of 32 channels) applied twice.
    The first ``C`` channels of the output are a residual added to each view's sampled feature. A ray of
    view ``i`` renders view ``i``'s residual-corrected features with the coarse sigma.
    """

    def __init__(self, feat_dim: int = 640, *, heads: int = 8, dim_head: int = 32, n_freqs: int = 10,
                 n_layers: int = 2, n_samples: int = 32, chunk: int = 32768):
        super().__init__()
        self.config = dict(feat_dim=feat_dim, heads=heads, dim_head=dim_head, n_freqs=n_freqs, n_layers=n_layers,
                           n_samples=n_samples, chunk=chunk)
        self.feat_dim, self.n_freqs, self.n_layers, self.n_samples, self.chunk = (feat_dim, n_freqs, n_layers,
                                                                                  n_samples, chunk)
        self.width = feat_dim + 2 * (3 + 6 * n_freqs)
        self.norm = nn.LayerNorm(self.width)                        # official transformer_layer_norm
        self.attn = _shared_attention(self.width, heads, dim_head)  # official transformer.0 (== .1)
        ring = ring_cameras(32)
        self.register_buffer("cam_pe", positional_encoding(to_official_frame(ring.centers), n_freqs),
                             persistent=False)
        self.register_buffer("cam_dirs", ring.centers / ring.centers.norm(dim=-1, keepdim=True), persistent=False)

    def point_features(self, feats: Tensor, pts: Tensor, view_weights: Tensor) -> Tensor:
        """Residual-corrected features at ``pts [P,3]`` mixed over the views with ``view_weights [P,V]``
        (one-hot for a ring ray: view ``i`` reads its own token, as in the official code): ``[B,P,C]``."""
        B = feats.shape[0]
        out = []
        step = max(1, self.chunk // max(B, 1))
        for s in range(0, pts.shape[0], step):
            p, vw = pts[s: s + step], view_weights[s: s + step].to(feats.dtype)
            P = p.shape[0]
            f = sample_view_features(feats, p)  # [B,P,V,C]
            xyz = positional_encoding(to_official_frame(p), self.n_freqs).to(f.dtype)
            tok = torch.cat([f, self.cam_pe.to(f.dtype)[None, None].expand(B, P, -1, -1),
                             xyz[None, :, None].expand(B, P, RING_N, -1)], dim=-1)
            x = self.norm(tok.reshape(B * P, RING_N, self.width))
            for _ in range(self.n_layers):
                x = self.attn(x)
            corrected = f + x[..., :self.feat_dim].reshape(B, P, RING_N, self.feat_dim)
            out.append((corrected * vw[None, :, :, None]).sum(2))
        return torch.cat(out, dim=1)

    def forward(self, feats: Tensor, sigma: Tensor, views: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Rewrite the ring views ``views`` (default all). ``sigma [B,V',H*W,S]`` is the coarse raw density
        of those views' rays. Returns ``sample [B,V',C,H,W]`` (composited), ``rendered`` and ``occ``."""
        B, H, W = _check_feats(feats, self.feat_dim)
        views = list(range(RING_N)) if views is None else list(views)
        V = len(views)
        ro, rd = camera_rays(ring_cameras(W))
        pts, dists, _ = sample_along_rays(ro[views].to(feats), rd[views].to(feats), self.n_samples)  # [V,HW,S,*]
        S = dists.shape[-1]
        if sigma.shape != (B, V, H * W, S):
            raise ValueError(f"sigma must have shape {(B, V, H * W, S)}, got {tuple(sigma.shape)}")
        w = volume_render_weights(sigma.to(feats.dtype), dists[None])  # [B,V,HW,S]
        onehot = F.one_hot(torch.as_tensor(views, device=feats.device), RING_N)  # [V,8]
        vw = onehot[:, None, None, :].expand(V, H * W, S, RING_N).reshape(-1, RING_N)
        own = self.point_features(feats, pts.reshape(-1, 3), vw).reshape(B, V, H * W, S, self.feat_dim)
        rendered = (w[..., None] * own).sum(-2)  # [B,V,HW,C]
        occ = w.sum(-1)
        rendered = rendered.permute(0, 1, 3, 2).reshape(B, V, self.feat_dim, H, W)
        occ = occ.reshape(B, V, 1, H, W)
        f_in = feats[:, views]
        return {"sample": composite(f_in, occ, rendered), "rendered": rendered, "occ": occ}

    def render_rays(self, feats: Tensor, rays_o: Tensor, rays_d: Tensor, sigma: Tensor, *,
                    views: Tensor | None = None, sharpness: float = 10.0) -> dict[str, Tensor]:
        """Features rendered along arbitrary rays ``[R,3]`` with the coarse ``sigma [B,R,S]``. Returns
        ``rendered [B,R,C]`` and ``occ [B,R]``. ``views [R]`` (ring view index per ray) reads that view's
        token, as :meth:`forward` does. A novel view (``views=None``) has no token of its own, so each ray
        blends the 8 views' corrected features with ``softmax(sharpness * cos(ray origin, ring
        camera))``. This is our reconstruction, used for the held-out-view training loss."""
        B, _, _ = _check_feats(feats, self.feat_dim)
        pts, dists, _ = sample_along_rays(rays_o.to(feats), rays_d.to(feats), self.n_samples)
        R, S = dists.shape
        w = volume_render_weights(sigma.to(feats.dtype), dists[None])  # [B,R,S]
        if views is not None:
            vw = F.one_hot(torch.as_tensor(views, device=feats.device).long(), RING_N).to(feats.dtype)
        else:
            o = rays_o.to(feats) / rays_o.to(feats).norm(dim=-1, keepdim=True).clamp_min(1e-9)
            vw = torch.softmax(sharpness * (o @ self.cam_dirs.to(feats).T), dim=-1)  # [R,V]
        vw = vw[:, None].expand(R, S, RING_N).reshape(-1, RING_N)
        f = self.point_features(feats, pts.reshape(-1, 3), vw).reshape(B, R, S, self.feat_dim)
        return {"rendered": (w[..., None] * f).sum(-2), "occ": w.sum(-1)}


class LatentPlane(nn.Module):
    """Coarse + fine planes acting on a batch of ``8 k`` feature maps (groups of 8 ring views).

    ``forward(sample [N,C,H,W], temb=None, t=None)`` returns ``sample`` (rewritten), ``occ [N,1,H,W]``
    and ``sigma [N,H*W,S]``. :meth:`attach` hooks it into a diffusers UNet (see the module doc for the
    branch selection). After each hooked call, :attr:`last` holds ``occ``, ``sigma``, ``groups`` and,
    with ``record_grid=True``, ``voxel_sigma [G,R,R,R]`` for the mesh.
    """

    def __init__(self, coarse: CoarsePlane, fine: FinePlane | None = None):
        super().__init__()
        if fine is not None and fine.feat_dim != coarse.feat_dim:
            raise ValueError(f"coarse and fine planes disagree on feat_dim ({coarse.feat_dim} vs {fine.feat_dim})")
        if fine is not None and fine.n_samples != coarse.n_samples:
            raise ValueError("coarse and fine planes must use the same number of samples per ray")
        self.coarse, self.fine = coarse, fine
        self.enabled = True
        self.record_grid = False
        self.grid_res: int | None = None
        self.last: dict[str, Any] = {}
        self._mask: list[bool] | None = None
        self._handle = None
        self._unet_ref = None

    @property
    def feat_dim(self) -> int:
        return self.coarse.feat_dim

    def forward(self, sample: Tensor, temb: Tensor | None = None, t=None) -> dict[str, Tensor]:
        N, C, H, W = sample.shape
        if N % RING_N != 0:
            raise ValueError(f"the Latent-Plane needs groups of {RING_N} views; got a batch of {N}")
        if C != self.feat_dim:
            raise ValueError(f"the Latent-Plane expects {self.feat_dim}-channel features, got {C}")
        B = N // RING_N
        dtype = self.coarse.sigma_token.dtype
        feats = sample.reshape(B, RING_N, C, H, W).to(dtype)
        c = self.coarse(feats, temb=temb, t=t)
        if self.fine is not None:
            out = self.fine(feats, c["sigma"])["sample"]
        else:
            out = feats
        return {"sample": out.reshape(N, C, H, W).to(sample.dtype), "occ": c["occ"].reshape(N, 1, H, W),
                "sigma": c["sigma"].reshape(N, H * W, -1), "feats": feats}

    # -- branch selection ----------------------------------------------------------------------------------
    def group_mask(self, n_groups: int) -> list[bool]:
        """Which groups of 8 the hook rewrites (module doc)."""
        if not self.enabled:
            return [False] * n_groups
        if self._mask is not None:
            if len(self._mask) != n_groups:
                raise ValueError(f"branch mask has {len(self._mask)} entries but the batch has {n_groups} groups of 8")
            return list(self._mask)
        if n_groups == 1:
            return [True]
        if n_groups % 2 == 0:  # diffusers CFG layout: cat([uncond, cond])
            return [False] * (n_groups // 2) + [True] * (n_groups // 2)
        raise ValueError(f"cannot tell the conditional branch in a batch of {n_groups} groups of 8; "
                         "wrap the call in `with plane.branches(mask):`")

    @contextlib.contextmanager
    def branches(self, mask: Sequence[bool]) -> Iterator[LatentPlane]:
        """Rewrite exactly the groups of 8 with ``mask[g]`` True during the block."""
        old = self._mask
        self._mask = [bool(m) for m in mask]
        try:
            yield self
        finally:
            self._mask = old

    @contextlib.contextmanager
    def disabled(self) -> Iterator[LatentPlane]:
        """Rewrite nothing during the block (e.g. around the unconditional UNet call)."""
        old = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = old

    # -- hooking -------------------------------------------------------------------------------------------
    def _hook(self, module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        N = hidden.shape[0]
        if N % RING_N != 0:
            raise ValueError(f"the Latent-Plane hook needs a batch of 8 k samples (8 ring views), got {N}")
        G = N // RING_N
        mask = self.group_mask(G)
        self.last = {}
        if not any(mask):
            return None
        temb = kwargs.get("temb", args[1] if len(args) > 1 else None)
        _, C, H, W = hidden.shape
        m = torch.tensor(mask, device=hidden.device)
        x = hidden.reshape(G, RING_N, C, H, W)[m].reshape(-1, C, H, W)
        te = None
        if temb is not None:
            te = temb.reshape(G, RING_N, -1)[m].reshape(-1, temb.shape[-1]) if temb.shape[0] == N else temb[:1]
        res = self.forward(x, temb=te)
        new = hidden.clone().reshape(G, RING_N, C, H, W)
        new[m] = res["sample"].reshape(-1, RING_N, C, H, W).to(new.dtype)
        new = new.reshape(N, C, H, W)
        self.last = {"occ": res["occ"], "sigma": res["sigma"], "groups": mask}
        if self.record_grid:
            self.last["voxel_sigma"] = self.coarse.density_grid(res["feats"], temb=te, res=self.grid_res)
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        return new

    def attach(self, unet: nn.Module, block_index: int = 2) -> LatentPlane:
        """Hook into ``unet.up_blocks[block_index]`` (forward hook with kwargs, so the block's ``temb`` is
        read). Any diffusers ``UNet2DConditionModel`` works; its block's output channels must equal
        ``feat_dim``. Re-attaching first detaches."""
        self.detach()
        blocks = getattr(unet, "up_blocks", None)
        if blocks is None or not (-len(blocks) <= block_index < len(blocks)):
            n = 0 if blocks is None else len(blocks)
            raise ValueError(f"the UNet has {n} up_blocks; block_index {block_index} is out of range")
        self._handle = blocks[block_index].register_forward_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        """Remove the hook; the UNet is then exactly as before ``attach``."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None



# --------------------------------------------------------------------------- host features of an image-reading plane

class ShapeWorldFeatures(nn.Module):
    """Host features for ShapeWorld (our reconstruction; the embedded default has no multi-view UNet).

    The input is ring-view images ``[..., 3, H, W]`` in [0,1] on white. The output is ``3 + n_random``
    channels: the RGB itself, then ``tanh`` of a fixed random 3x3 convolution of ``rgb - 1`` (zero on
    the white background), which gives edge and colour-contrast channels. The weights come from
    ``seed``, are frozen, and are saved with the plane.
    """

    def __init__(self, n_random: int = 5, seed: int = 0):
        super().__init__()
        self.n_random, self.seed = int(n_random), int(seed)
        g = torch.Generator().manual_seed(self.seed)
        self.register_buffer("weight", torch.randn(self.n_random, 3, 3, 3, generator=g) / 3.0)

    @property
    def feat_dim(self) -> int:
        return 3 + self.n_random

    def forward(self, rgb: Tensor) -> Tensor:
        lead = rgb.shape[:-3]
        x = rgb.reshape(-1, *rgb.shape[-3:]).float()
        if self.n_random == 0:
            return x.reshape(*lead, 3, *x.shape[-2:])
        r = torch.tanh(F.conv2d(F.pad(x - 1.0, (1, 1, 1, 1), mode="replicate"), self.weight.to(x)))
        return torch.cat([x, r], dim=1).reshape(*lead, self.feat_dim, *x.shape[-2:])
