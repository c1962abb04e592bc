"""Differentiable volume rendering of implicit fields (NeRF densities, NeuS signed distances).

Tensor in, tensor out, like the Gaussian and mesh renderers; ``_volume_torch`` holds the slow,
obviously-correct per-ray twin that the tests compare against. Conventions are those of
``studio.cameras``: world-to-camera ``viewmats`` in the OpenCV frame, pinhole ``Ks``, pixel ``(row i,
column j)`` centred at ``(j + 0.5, i + 0.5)``, outputs ``[C,H,W,...]``.

Pieces (threestudio / nerfacc conventions, written from the math, no code copied)
    ``rays_from_cameras``  per-pixel world rays of a ``Cameras`` batch.
    ``ray_aabb``           slab test: where each ray enters and leaves an axis-aligned box.
    ``sample_rays_uniform`` / ``sample_rays_stratified``
                           ``n_samples`` points per ray between ``near`` and ``far``. The samples
                           partition ``[near, far]`` into intervals: sample ``i`` stands for the interval
                           ``[b_i, b_{i+1}]`` around it, ``deltas_i = b_{i+1} - b_i`` and
                           ``sum_i deltas_i = far - near`` exactly (so a homogeneous medium is rendered
                           exactly, whatever the jitter).
    ``composite``          alpha compositing: ``alpha_i = 1 - exp(-sigma_i delta_i)`` (or given alphas),
                           transmittance ``T_i = prod_{j<i} (1 - alpha_j)`` (exclusive product),
                           ``w_i = T_i alpha_i``; ``rgb = sum w_i c_i + (1 - sum w_i) bg``.
    ``neus_alpha``         NeuS: discrete opacity of an SDF interval with the learnable sharpness
                           ``inv_s`` and threestudio's cosine annealing.
    ``OccupancyGrid``      nerfacc-style occupancy grid: an EMA of per-cell occupancy over the bounding
                           box, refreshed every ``update_every`` steps, used to skip empty samples.
    ``render_field``       the convenience renderer: cameras (or rays) -> sample -> (skip) -> field ->
                           alphas -> composite, chunked over rays.

The field protocol (what ``render_field`` calls)
    ``field(points [N,3], dirs [N,3], with_normals=bool) -> dict`` with

    * NeRF (``kind="nerf"``): ``density [N]`` (activated, >= 0), ``rgb [N,3]``, and ``normal [N,3]``
      when ``with_normals``;
    * NeuS (``kind="neus"``): ``sdf [N]``, ``normal [N,3]`` (unit SDF gradient), ``rgb [N,3]``,
      ``inv_s`` (scalar tensor), optionally ``gradient [N,3]`` (raw SDF gradient, for the eikonal loss).

    ``studio.students.fields.NeRFField`` / ``NeuSField`` implement it; any callable returning that
    dict (an analytic SDF in a test, say) works too. ``kind`` defaults to ``field.kind``.

Choices made here (ours, documented)
    * A fixed number of samples per ray between the ray's entry into and exit from ``bbox`` (not
      nerfacc's fixed marching step); rays that miss the box get zero weight.
    * ``depth`` is the *expected* depth ``sum w_i z_i / opacity`` (the "ED" of the Gaussian renderer
      and of the ShapeWorld references), 0 where ``opacity <= 1e-4``. From cameras ``z`` is the
      view-space z (as ``render_mesh``); from raw rays it is the distance along the unit ray.
    * ``normal`` is the accumulated ``sum w_i n_i`` (world frame, threestudio's ``comp_normal``): unit
      length only where the pixel is opaque; divide by its norm for a unit normal map.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError

__all__ = [
    "FIELD_KINDS",
    "OccupancyGrid",
    "composite",
    "cos_anneal_ratio",
    "neus_alpha",
    "normalize_bbox",
    "occupancy_fn",
    "ray_aabb",
    "rays_from_cameras",
    "render_field",
    "sample_rays_stratified",
    "sample_rays_uniform",
]

FIELD_KINDS = ("nerf", "neus")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


# ------------------------------------------------------------------------------------------------
# rays and samples
# ------------------------------------------------------------------------------------------------


def rays_from_cameras(cameras: Any, *, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Per-pixel world rays of ``cameras`` (a ``studio.cameras.Cameras``): ``rays_o, rays_d [C,H,W,3]``.

    The ray of pixel ``(i, j)`` leaves the camera centre through the pixel centre ``(j + 0.5, i + 0.5)``:
    camera-frame direction ``((j + 0.5 - cx) / fx, (i + 0.5 - cy) / fy, 1)`` (zero skew), rotated to the
    world by the camera-to-world matrix. ``normalize=True`` returns unit directions (ray parameter =
    distance); ``normalize=False`` keeps camera-space ``z = 1`` (ray parameter = view-space depth), the
    convention of ``methods.placiddreamer.latent_plane.ring.camera_rays`` (which returns the same rays flattened to
    ``[C,H*W,3]``).
    """
    from ..cameras import Cameras

    _check(isinstance(cameras, Cameras), f"cameras must be a studio.cameras.Cameras, got {type(cameras).__name__}")
    H, W = cameras.height, cameras.width
    dt = cameras.viewmats.dtype if cameras.viewmats.is_floating_point() else torch.float32
    dev = cameras.device
    K = cameras.Ks.to(dt)
    ys = torch.arange(H, dtype=dt, device=dev) + 0.5
    xs = torch.arange(W, dtype=dt, device=dev) + 0.5
    x = (xs[None, None, :] - K[:, 0, 2, None, None]) / K[:, 0, 0, None, None]  # [C,1,W]
    y = (ys[None, :, None] - K[:, 1, 2, None, None]) / K[:, 1, 1, None, None]  # [C,H,1]
    x, y = torch.broadcast_tensors(x, y)
    dirs_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [C,H,W,3]
    c2w = torch.linalg.inv(cameras.viewmats.to(dt))
    rays_d = torch.einsum("cij,chwj->chwi", c2w[:, :3, :3], dirs_cam)
    if normalize:
        rays_d = rays_d / rays_d.norm(dim=-1, keepdim=True)
    rays_o = c2w[:, None, None, :3, 3].expand_as(rays_d)
    return rays_o.contiguous(), rays_d.contiguous()


def normalize_bbox(bbox: Any, *, dtype=torch.float32, device=None) -> Tensor:
    """``bbox`` as a ``[2,3]`` tensor ``(min, max)``: a half-size ``r`` (the cube ``[-r, r]^3``), a pair
    ``(lo, hi)`` of scalars or of 3-vectors, or a ``[2,3]`` tensor."""
    b = torch.as_tensor(bbox, dtype=dtype, device=device)
    if b.dim() == 0:
        b = torch.stack([-b.abs(), b.abs()])
    if b.dim() == 1 and b.shape[0] == 2:
        b = b[:, None]
    _check(b.dim() == 2 and b.shape[0] == 2 and b.shape[1] in (1, 3),
           f"bbox must be a half-size r, a (lo, hi) pair or a [2,3] tensor (min, max), got shape {tuple(b.shape)}")
    b = b.expand(2, 3).clone()
    _check(bool(torch.isfinite(b).all() and (b[1] > b[0]).all()),
           f"bbox needs finite max > min on every axis, got min={b[0].tolist()} max={b[1].tolist()}")
    return b


def ray_aabb(rays_o: Tensor, rays_d: Tensor, bbox: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test of rays ``[...,3]`` against the box ``bbox`` (see ``normalize_bbox``).

    Returns ``near, far, hit [...]`` in ray-parameter units, ``near >= 0`` (a ray starting inside the box
    enters at 0). For missed rays ``far == near``, so samples between them get zero spacing."""
    b = normalize_bbox(bbox, dtype=rays_o.dtype, device=rays_o.device)
    d = torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    t1 = (b[0] - rays_o) / d
    t2 = (b[1] - rays_o) / d
    near = torch.minimum(t1, t2).amax(dim=-1).clamp_min(0.0)
    far = torch.maximum(t1, t2).amin(dim=-1)
    hit = far > near
    far = torch.where(hit, far, near)
    return near, far, hit


def _as_bound(v: Any, like: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    try:
        return torch.broadcast_to(t, like.shape[:-1])
    except RuntimeError:
        raise UserError(f"{name} must be a float or a tensor of shape {tuple(like.shape[:-1])} "
                        f"(one per ray), got shape {tuple(t.shape)}") from None


def _samples(rays_o: Tensor, rays_d: Tensor, near: Any, far: Any, n_samples: int, u: Tensor | None):
    _check(isinstance(rays_o, Tensor) and rays_o.shape[-1:] == (3,) and rays_o.is_floating_point(),
           f"rays_o must be a float tensor [...,3], got {getattr(rays_o, 'shape', type(rays_o).__name__)}")
    _check(isinstance(rays_d, Tensor) and rays_d.shape == rays_o.shape,
           f"rays_d must have the shape of rays_o {tuple(rays_o.shape)}, got {getattr(rays_d, 'shape', None)}")
    _check(isinstance(n_samples, int) and n_samples >= 1, f"n_samples must be a positive int, got {n_samples!r}")
    n = _as_bound(near, rays_o, "near")
    f = _as_bound(far, rays_o, "far")
    _check(bool((f >= n).all()), "far must be >= near for every ray")
    S = n_samples
    span = (f - n)[..., None]
    k = torch.arange(S, dtype=rays_o.dtype, device=rays_o.device)
    frac = (k + 0.5) / S if u is None else (k + u) / S  # position of each sample in [0,1]
    t = n[..., None] + span * frac
    # Interval boundaries: near, midpoints between consecutive samples, far.
    inner = 0.5 * (t[..., 1:] + t[..., :-1])
    bounds = torch.cat([n[..., None], inner, f[..., None]], dim=-1)
    deltas = bounds[..., 1:] - bounds[..., :-1]
    pts = rays_o[..., None, :] + rays_d[..., None, :] * t[..., None]
    return pts, t, deltas


def sample_rays_uniform(rays_o: Tensor, rays_d: Tensor, near: Any, far: Any, n_samples: int,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``n_samples`` evenly spaced samples per ray at the centres of ``n_samples`` equal bins of
    ``[near, far]``. Returns ``points [...,S,3]``, ``t_vals [...,S]``, ``deltas [...,S]`` (bin widths).
    ``generator`` is accepted for signature symmetry and unused."""
    del generator
    return _samples(rays_o, rays_d, near, far, n_samples, None)


def sample_rays_stratified(rays_o: Tensor, rays_d: Tensor, near: Any, far: Any, n_samples: int,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Stratified samples (NeRF): sample ``i`` uniform in bin ``i`` of ``n_samples`` equal bins of
    ``[near, far]``, independently per ray. ``deltas`` are the widths of the intervals between the
    midpoints of consecutive samples (first from ``near``, last to ``far``), so they still sum to
    ``far - near``. Deterministic for a given ``generator``."""
    shape = rays_o.shape[:-1] + (n_samples,)
    u = torch.rand(shape, generator=generator, dtype=rays_o.dtype,
                   device=rays_o.device if generator is None else generator.device)
    return _samples(rays_o, rays_d, near, far, n_samples, u.to(rays_o.device))


# ------------------------------------------------------------------------------------------------
# compositing and NeuS alphas
# ------------------------------------------------------------------------------------------------


def composite(sigmas: Tensor | None, rgbs: Tensor, t_vals: Tensor, deltas: Tensor | None = None, *,
              alphas: Tensor | None = None, normals: Tensor | None = None,
              background: Any = None) -> dict[str, Tensor]:
    """Front-to-back alpha compositing of ``R`` rays with ``S`` samples each.

    Inputs: ``sigmas [R,S]`` densities with ``deltas [R,S]`` interval lengths (then ``alpha_i = 1 -
    exp(-sigma_i delta_i)``), **or** ``alphas [R,S]`` directly (NeuS, see ``neus_alpha``); ``rgbs
    [R,S,D]``; ``t_vals [R,S]`` sample depths; optional ``normals [R,S,3]``; ``background`` None (black),
    a float, a ``[D]`` colour or per-ray colours ``[R,D]``. Leading dims may be any ``[...]``.

    Transmittance is the exclusive product ``T_i = prod_{j<i} (1 - alpha_j)``, computed as
    ``exp(-sum_{j<i} sigma_j delta_j)`` for densities and as ``exp(sum_{j<i} log(1 - alpha_j))``
    (``1 - alpha`` clamped at 1e-10) for alphas. Weights ``w_i = T_i alpha_i`` are >= 0 and sum to
    ``1 - T_S <= 1``.

    Returns ``rgb [R,D]`` (``sum w c + (1 - opacity) bg``), ``opacity [R,1]``, ``depth [R,1]`` (expected
    depth ``sum w t / opacity``, 0 where ``opacity <= 1e-4``), ``depth_sum [R,1]`` (``sum w t``,
    threestudio's unnormalised depth), ``weights [R,S]`` and, with ``normals``, ``normal [R,3]`` =
    ``sum w n``.
    """
    _check(isinstance(rgbs, Tensor) and rgbs.dim() >= 2, "rgbs must be a tensor [R,S,D]")
    lead = rgbs.shape[:-1]
    _check(t_vals.shape == lead, f"t_vals must have shape {tuple(lead)}, got {tuple(t_vals.shape)}")
    if alphas is None:
        _check(sigmas is not None and deltas is not None, "composite needs sigmas and deltas, or alphas")
        _check(sigmas.shape == lead and deltas.shape == lead,
               f"sigmas and deltas must have shape {tuple(lead)}, got {tuple(sigmas.shape)}, {tuple(deltas.shape)}")
        tau = sigmas * deltas
        alpha = 1.0 - torch.exp(-tau)
        excl = torch.cumsum(tau, dim=-1) - tau
        T = torch.exp(-excl)
    else:
        _check(alphas.shape == lead, f"alphas must have shape {tuple(lead)}, got {tuple(alphas.shape)}")
        alpha = alphas
        log1m = torch.log((1.0 - alpha).clamp_min(1e-10))
        excl = torch.cumsum(log1m, dim=-1) - log1m
        T = torch.exp(excl)
    w = T * alpha
    opacity = w.sum(-1, keepdim=True)
    rgb = (w[..., None] * rgbs).sum(-2)
    if background is not None:
        bg = torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device)
        rgb = rgb + (1.0 - opacity) * bg
    depth_sum = (w * t_vals).sum(-1, keepdim=True)
    depth = torch.where(opacity > 1e-4, depth_sum / opacity.clamp_min(1e-4), torch.zeros_like(depth_sum))
    out = {"rgb": rgb, "opacity": opacity, "depth": depth, "depth_sum": depth_sum, "weights": w}
    if normals is not None:
        out["normal"] = (w[..., None] * normals).sum(-2)
    return out


def neus_alpha(sdf: Tensor, cos: Tensor, inv_s: Tensor | float, deltas: Tensor,
               cos_anneal_ratio: float = 1.0) -> Tensor:
    """NeuS discrete opacity of each sample interval (Wang et al. 2021, eq. 13, with threestudio's
    cosine annealing).

    ``sdf [...]`` at the sample (interval midpoint), ``cos [...] = dir . n`` (unit ray direction and unit
    SDF normal), ``inv_s`` the learnable sharpness ``s`` of the logistic CDF ``Phi_s(x) = sigmoid(s x)``,
    ``deltas [...]`` the interval lengths. The SDF at the interval ends is estimated linearly,
    ``sdf -+ c delta / 2``, with the slope

        ``c = -[(1 - r) relu(-cos / 2 + 1/2) + r relu(-cos)]``,  ``r = cos_anneal_ratio``

    (``r = 1``: the true slope ``cos`` where the ray enters the surface, 0 where it leaves; ``r < 1``
    blends in a slope that never vanishes, which helps early training). Then

        ``alpha = clip((Phi_s(sdf_prev) - Phi_s(sdf_next) + 1e-5) / (Phi_s(sdf_prev) + 1e-5), 0, 1)``.
    """
    _check(0.0 <= float(cos_anneal_ratio) <= 1.0, f"cos_anneal_ratio must lie in [0, 1], got {cos_anneal_ratio}")
    r = float(cos_anneal_ratio)
    slope = -(torch.relu(-cos * 0.5 + 0.5) * (1.0 - r) + torch.relu(-cos) * r)
    half = slope * deltas * 0.5
    prev_cdf = torch.sigmoid((sdf - half) * inv_s)
    next_cdf = torch.sigmoid((sdf + half) * inv_s)
    return ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).clamp(0.0, 1.0)


def cos_anneal_ratio(step: int, anneal_end_step: int) -> float:
    """threestudio's NeuS schedule: ``min(1, step / anneal_end_step)`` (1 when ``anneal_end_step <= 0``)."""
    if anneal_end_step <= 0:
        return 1.0
    return float(min(1.0, max(0, step) / anneal_end_step))


# ------------------------------------------------------------------------------------------------
# occupancy grid
# ------------------------------------------------------------------------------------------------


def occupancy_fn(field: Callable, kind: str | None = None, step_size: float = 0.02) -> Callable[[Tensor], Tensor]:
    """The value an ``OccupancyGrid`` stores for ``field``, as a function of points ``[N,3] -> [N]``:
    the opacity of a ``step_size`` long piece of ray at the point.

    * NeRF: ``1 - exp(-density * step_size)``.
    * NeuS: ``neus_alpha`` of an interval of length ``step_size`` crossing the surface head-on
      (``cos = -1``), i.e. ``(Phi_s(sdf + h) - Phi_s(sdf - h)) / Phi_s(sdf + h)`` with ``h = step/2`` —
      threestudio's estimate. It is largest near the zero level set and falls off with ``|sdf| s``.
    """
    kind = _field_kind(field, kind)
    field_device = getattr(field, "device", None)  # the grid may live on another device than the field

    def fn(points: Tensor) -> Tensor:
        p = points if field_device is None else points.to(field_device)
        d = torch.zeros_like(p)
        d[:, 2] = 1.0
        out = field(p, d, with_normals=False)
        if kind == "nerf":
            occ = 1.0 - torch.exp(-out["density"].reshape(-1) * step_size)
        else:
            sdf = out["sdf"].reshape(-1)
            occ = neus_alpha(sdf, -torch.ones_like(sdf), out["inv_s"], torch.full_like(sdf, step_size), 1.0)
        return occ.to(points.device)

    return fn


class OccupancyGrid:
    """A nerfacc-style occupancy grid over an axis-aligned box (pure torch).

    ``values [R,R,R]`` (indexed ``[x, y, z]``) hold an exponential moving *maximum* of a per-cell
    occupancy (``occupancy_fn``: the opacity of a short ray piece, in [0, 1]); ``binary [R,R,R]`` marks
    the cells to sample. ``update`` runs every ``update_every`` steps (``step % update_every == 0``):
    it evaluates the occupancy at one uniformly jittered point in every cell and sets
    ``values = max(decay * values, new)``, then ``binary = values > min(threshold, mean(values))``
    (nerfacc's rule: the mean caps the threshold, so a faint early field keeps its densest cells).
    ``dilate`` grows the binary mask by that many cells: a safety margin, because one jittered point per
    cell misses the thin occupied shell of a sharp surface in some cells (nerfacc uses no margin but a
    finer 128^3 grid refreshed every 16 steps over thousands of steps; our default 32^3 grid with
    ``dilate=1`` gives the same image as no skipping after a single update, see the tests). Before the
    first update every cell is occupied.

    Differences from nerfacc (documented choices): every cell is evaluated at every update (nerfacc
    subsamples after a warm-up; our grids are small), and there is no multi-level cascade.
    """

    def __init__(self, bbox: Any = 1.0, resolution: int = 32, *, threshold: float = 0.01, decay: float = 0.95,
                 update_every: int = 16, dilate: int = 1, device: str | torch.device | None = None):
        _check(isinstance(resolution, int) and resolution >= 2, f"resolution must be an int >= 2, got {resolution!r}")
        _check(0.0 < decay <= 1.0, f"decay must lie in (0, 1], got {decay}")
        _check(threshold >= 0.0, f"threshold must be >= 0, got {threshold}")
        _check(isinstance(update_every, int) and update_every >= 1, f"update_every must be an int >= 1, got {update_every!r}")
        _check(isinstance(dilate, int) and dilate >= 0, f"dilate must be an int >= 0, got {dilate!r}")
        self.bbox = normalize_bbox(bbox, device=device)
        self.resolution = resolution
        self.threshold = float(threshold)
        self.decay = float(decay)
        self.update_every = update_every
        self.dilate = dilate
        R = resolution
        self.values = torch.zeros(R, R, R, device=self.bbox.device)
        self.binary = torch.ones(R, R, R, dtype=torch.bool, device=self.bbox.device)
        self.n_updates = 0

    @property
    def device(self) -> torch.device:
        return self.bbox.device

    @property
    def cell_size(self) -> Tensor:
        return (self.bbox[1] - self.bbox[0]) / self.resolution

    @property
    def occupied_fraction(self) -> float:
        return float(self.binary.float().mean())

    def cell_centers(self) -> Tensor:
        """Centres of all cells ``[R^3,3]`` in ``[x, y, z]`` index order."""
        R = self.resolution
        k = torch.arange(R, dtype=torch.float32, device=self.device) + 0.5
        ix, iy, iz = torch.meshgrid(k, k, k, indexing="ij")
        unit = torch.stack([ix, iy, iz], dim=-1).reshape(-1, 3) / R
        return self.bbox[0] + unit * (self.bbox[1] - self.bbox[0])

    @torch.no_grad()
    def update(self, step: int, occ_fn: Callable[[Tensor], Tensor], *, generator: torch.Generator | None = None,
               force: bool = False, chunk: int = 65536) -> bool:
        """Refresh the grid from ``occ_fn(points [N,3]) -> [N]`` when ``step % update_every == 0`` (or
        ``force``). Returns whether it updated."""
        if not force and step % self.update_every != 0:
            return False
        R = self.resolution
        k = torch.arange(R, dtype=torch.float32, device=self.device)
        ix, iy, iz = torch.meshgrid(k, k, k, indexing="ij")
        idx = torch.stack([ix, iy, iz], dim=-1).reshape(-1, 3)
        u = torch.rand(idx.shape, generator=generator,
                       device=self.device if generator is None else generator.device).to(self.device)
        pts = self.bbox[0] + (idx + u) / R * (self.bbox[1] - self.bbox[0])
        occ = torch.cat([occ_fn(pts[s:s + chunk]).reshape(-1).float() for s in range(0, pts.shape[0], chunk)])
        occ = torch.nan_to_num(occ, nan=0.0).clamp(0.0, 1.0).reshape(R, R, R)
        self.values = torch.maximum(self.values * self.decay, occ)
        thr = min(self.threshold, float(self.values.mean()))
        binary = self.values > thr
        if self.dilate > 0:
            k3 = 2 * self.dilate + 1
            binary = torch.nn.functional.max_pool3d(binary[None, None].float(), k3, stride=1,
                                                    padding=self.dilate)[0, 0] > 0
        self.binary = binary
        self.n_updates += 1
        return True

    def update_from_field(self, step: int, field: Callable, *, kind: str | None = None, step_size: float | None = None,
                          generator: torch.Generator | None = None, force: bool = False) -> bool:
        """``update`` with ``occupancy_fn(field, kind, step_size)``; ``step_size`` defaults to one cell's
        smallest edge."""
        s = float(self.cell_size.min()) if step_size is None else float(step_size)
        return self.update(step, occupancy_fn(field, kind, s), generator=generator, force=force)

    def occupied(self, points: Tensor) -> Tensor:
        """Bool ``[...]``: does each point ``[...,3]`` fall in an occupied cell (False outside the box)."""
        b = self.bbox.to(points)
        unit = (points - b[0]) / (b[1] - b[0])
        inside = ((unit >= 0) & (unit <= 1)).all(-1)
        R = self.resolution
        idx = (unit * R).floor().long().clamp(0, R - 1)
        occ = self.binary.to(points.device)[idx[..., 0], idx[..., 1], idx[..., 2]]
        return occ & inside

    def state_dict(self) -> dict[str, Any]:
        return {"bbox": self.bbox.clone(), "resolution": self.resolution, "threshold": self.threshold,
                "decay": self.decay, "update_every": self.update_every, "dilate": self.dilate,
                "values": self.values.clone(), "binary": self.binary.clone(), "n_updates": self.n_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check(int(state["resolution"]) == self.resolution,
               f"occupancy grid state has resolution {state['resolution']}, this grid {self.resolution}")
        self.bbox = state["bbox"].to(self.device)
        for k in ("threshold", "decay"):
            setattr(self, k, float(state[k]))
        self.update_every, self.dilate = int(state["update_every"]), int(state["dilate"])
        self.values = state["values"].to(self.device)
        self.binary = state["binary"].to(self.device).bool()
        self.n_updates = int(state["n_updates"])


# ------------------------------------------------------------------------------------------------
# the field renderer
# ------------------------------------------------------------------------------------------------


def _field_kind(field: Any, kind: str | None) -> str:
    k = kind if kind is not None else getattr(field, "kind", None)
    _check(k in FIELD_KINDS, f"kind must be one of {FIELD_KINDS} (or set field.kind), got {k!r}")
    return k


def _background_for(background: Any, lead: tuple[int, ...], D: int, like: Tensor, n_cams: int | None) -> Tensor:
    """``background`` broadcast to ``[*lead, D]``: a float, a ``[D]`` colour, ``[C,D]`` per camera (camera
    renders) or any tensor broadcastable to the output (e.g. ``[C,H,W,D]`` per pixel)."""
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if n_cams is not None and bg.dim() == 2 and bg.shape[0] == n_cams and len(lead) == 3:
        bg = bg[:, None, None, :]
    try:
        return torch.broadcast_to(bg, (*lead, D))
    except RuntimeError:
        raise UserError(f"background must be a float, a [{D}] colour, [C,{D}] per-camera colours or a tensor "
                        f"broadcastable to {(*lead, D)}, got shape {tuple(bg.shape)}") from None


def render_field(
    field: Callable[..., dict[str, Tensor]],
    cameras: Any = None,
    *,
    rays: tuple[Tensor, Tensor] | None = None,
    kind: str | None = None,
    n_samples: int = 64,
    bbox: Any = None,
    near: Any = None,
    far: Any = None,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    occupancy_grid: OccupancyGrid | None = None,
    background: Any = 1.0,
    cos_anneal_ratio: float = 1.0,
    with_normals: bool | None = None,
    chunk: int = 4096,
) -> dict[str, Any]:
    """Volume-render an implicit ``field`` (see the module doc for the protocol) into ``cameras``.

    ``cameras``: a ``studio.cameras.Cameras`` (outputs ``[C,H,W,...]``), or pass ``rays=(rays_o, rays_d)``
    of any leading shape ``[...,3]`` (outputs ``[...,...]``; directions are normalised here).
    ``kind``: ``"nerf"`` (density) or ``"neus"`` (SDF, ``neus_alpha`` with ``cos_anneal_ratio``), default
    ``field.kind``. Samples: ``n_samples`` per ray (stratified with ``generator`` when ``stratified``)
    between ``near`` and ``far``, which default to where each ray enters and leaves ``bbox`` (default
    ``field.bbox``, else the cube ``[-1, 1]^3``). ``occupancy_grid``: samples in empty cells are not
    evaluated and get zero opacity. ``background``: float, ``[3]``, ``[C,3]`` or per-pixel ``[C,H,W,3]``.
    ``with_normals`` (default: True for NeuS, False for NeRF) also composites normals.

    Returns ``rgb``, ``opacity [...,1]``, ``depth [...,1]`` (expected view-space z for cameras, distance
    along the ray for rays; 0 where transparent), ``normal [...,3]`` (accumulated ``sum w n``, world
    frame) when normals are on, ``gradient [M,3]`` (raw SDF gradients of the evaluated NeuS samples, for
    ``eikonal``) when the field returns them, and the counts ``n_samples_total`` / ``n_samples_evaluated``.
    Rays are processed ``chunk`` at a time (the autograd graph of every chunk is kept).
    """
    from ..cameras import Cameras

    kind = _field_kind(field, kind)
    if with_normals is None:
        with_normals = kind == "neus"
    _check(isinstance(chunk, int) and chunk >= 1, f"chunk must be a positive int, got {chunk!r}")
    n_cams = None
    if rays is not None:
        _check(cameras is None, "pass either cameras or rays=(rays_o, rays_d), not both")
        _check(isinstance(rays, (tuple, list)) and len(rays) == 2, "rays must be a pair (rays_o [...,3], rays_d [...,3])")
        rays_o, rays_d = rays
        _check(isinstance(rays_o, Tensor) and isinstance(rays_d, Tensor) and rays_o.shape == rays_d.shape
               and rays_o.shape[-1:] == (3,), "rays must be two tensors of equal shape [...,3]")
        rays_d = rays_d / rays_d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        z_scale = None
    else:
        _check(isinstance(cameras, Cameras), f"cameras must be a studio.cameras.Cameras (or pass rays=), got "
                                             f"{type(cameras).__name__}")
        rays_o, rays_d = rays_from_cameras(cameras, normalize=True)
        n_cams = len(cameras)
        # view-space z of a point at distance t along a unit ray: t * (d . optical axis)
        fwd = cameras.viewmats[:, 2, :3].to(rays_d)  # third row of R: the camera z axis in world coordinates
        z_scale = (rays_d * fwd[:, None, None, :]).sum(-1)
    lead = tuple(rays_o.shape[:-1])
    if bbox is None:
        bbox = getattr(field, "bbox", 1.0)
    b = normalize_bbox(bbox, dtype=rays_o.dtype, device=rays_o.device)
    o = rays_o.reshape(-1, 3)
    d = rays_d.reshape(-1, 3)
    R = o.shape[0]
    n0, f0, _ = ray_aabb(o, d, b)
    if near is not None:
        n0 = torch.maximum(n0, _as_bound(near, rays_o, "near").reshape(-1))
    if far is not None:
        f0 = torch.minimum(f0, _as_bound(far, rays_o, "far").reshape(-1))
    f0 = torch.maximum(f0, n0)
    bg = _background_for(background, lead, 3, rays_o, n_cams).reshape(R, 3)
    zs = z_scale.reshape(-1) if z_scale is not None else None
    sampler = sample_rays_stratified if stratified else sample_rays_uniform

    outs: dict[str, list[Tensor]] = {"rgb": [], "opacity": [], "depth": [], "normal": [], "gradient": []}
    n_eval = 0
    for s in range(0, R, chunk):
        oc, dc = o[s:s + chunk], d[s:s + chunk]
        r = oc.shape[0]
        pts, t, deltas = sampler(oc, dc, n0[s:s + chunk], f0[s:s + chunk], n_samples, generator)
        S = pts.shape[1]
        flat = pts.reshape(-1, 3)
        dirs = dc[:, None, :].expand(r, S, 3).reshape(-1, 3)
        keep = (deltas > 0).reshape(-1)
        if occupancy_grid is not None:
            keep = keep & occupancy_grid.occupied(flat)
        sel = keep.nonzero()[:, 0]
        n_eval += int(sel.numel())
        rgb_s = flat.new_zeros(r * S, 3)
        nrm_s = flat.new_zeros(r * S, 3) if with_normals else None
        val_s = flat.new_zeros(r * S)  # density (nerf) or alpha (neus)
        if sel.numel():
            fo = field(flat[sel], dirs[sel], with_normals=with_normals)
            rgb_s = rgb_s.index_put((sel,), fo["rgb"].to(flat.dtype))
            if with_normals:
                nrm_s = nrm_s.index_put((sel,), fo["normal"].to(flat.dtype))
            if kind == "nerf":
                val_s = val_s.index_put((sel,), fo["density"].reshape(-1).to(flat.dtype))
            else:
                nrm = fo["normal"].to(flat.dtype)
                cos = (dirs[sel] * nrm).sum(-1)
                a = neus_alpha(fo["sdf"].reshape(-1).to(flat.dtype), cos, fo["inv_s"], deltas.reshape(-1)[sel],
                               cos_anneal_ratio)
                val_s = val_s.index_put((sel,), a)
                if "gradient" in fo:
                    outs["gradient"].append(fo["gradient"])
        depth_t = t if zs is None else t * zs[s:s + chunk, None]
        args = {"normals": nrm_s.reshape(r, S, 3) if with_normals else None, "background": bg[s:s + chunk]}
        if kind == "nerf":
            comp = composite(val_s.reshape(r, S), rgb_s.reshape(r, S, 3), depth_t, deltas, **args)
        else:
            comp = composite(None, rgb_s.reshape(r, S, 3), depth_t, alphas=val_s.reshape(r, S), **args)
        for k in ("rgb", "opacity", "depth"):
            outs[k].append(comp[k])
        if with_normals:
            outs["normal"].append(comp["normal"])

    result: dict[str, Any] = {k: torch.cat(outs[k]).reshape(*lead, -1) for k in ("rgb", "opacity", "depth")}
    if with_normals:
        result["normal"] = torch.cat(outs["normal"]).reshape(*lead, 3)
    if outs["gradient"]:
        result["gradient"] = torch.cat(outs["gradient"])
    result["n_samples_total"] = R * n_samples
    result["n_samples_evaluated"] = n_eval
    result["kind"] = kind
    return result

