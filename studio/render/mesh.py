"""Differentiable triangle-mesh rasterization: tensor in, tensor out (the studio's nvdiffrast / pytorch3d).

Used for DMTet geometry, normal maps, texture stages and mesh previews. Conventions are those of the
Gaussian renderer and ``studio.cameras``: world-to-camera ``viewmats [C,4,4]`` in the OpenCV frame (x
right, y down, z forward), pinhole ``Ks [C,3,3]``, pixel ``(row i, column j)`` centred at
``(j + 0.5, i + 0.5)``, outputs ``[C,H,W,...]``.

Pipeline
    1. ``project_vertices`` (torch, every backend): camera transform and pinhole projection to
       ``verts_screen [C,V,3] = (x_pix, y_pix, z_view)``; autograd carries gradients from here on to
       the vertices, ``viewmats`` and ``Ks``.
    2. rasterization of the projected triangles (the backend): per pixel the visible face, its
       perspective-correct barycentrics and view-space depth; rules in ``_mesh_torch`` /
       ``cuda_ext/cuda/mesh_math.h``. Barycentrics and depth are differentiable w.r.t.
       ``verts_screen`` for fixed visibility (analytic backward in native / CUDA).
    3. ``interpolate`` (torch): vertex attributes at pixels, differentiable w.r.t. the attributes
       and, through the barycentrics, the vertex positions.
    4. ``antialias`` (torch): silhouette edge antialiasing in the style of nvdiffrast, which gives
       the gradients w.r.t. vertex positions that visibility changes at silhouettes would otherwise
       lack (see its docstring).

Backends (``backend=``)
    ``torch``   dense reference twin (every pixel against every face; slow, obviously correct)
    ``native``  C++/OpenMP tile rasterizer (``cuda_ext/cpu/mesh_raster.cpp``), analytic backward
    ``cuda``    CUDA kernels (``cuda_ext/cuda/mesh_raster.cu``), analytic backward
    ``auto``    CUDA tensors -> cuda (else torch, with a warning), CPU -> native when it builds, else torch

Choices made here (not taken from a paper): no back-face culling; no near-plane clipping (a face
with a vertex at ``z <= near_plane`` is dropped whole, fine for cameras outside the object);
``depth`` is the view-space z (not NDC), 0 on background.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError, warn_once
from ._common import camera_centers
from ._mesh_torch import rasterize_screen_torch

MESH_BACKENDS = ("auto", "torch", "native", "cuda")
NORMAL_MODES = ("vertex", "face", "none")



def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


# ------------------------------------------------------------------------------------------------
# validation and backend choice
# ------------------------------------------------------------------------------------------------


def _check_verts(verts: Any, name: str = "verts") -> None:
    _check(isinstance(verts, Tensor), f"{name} must be a torch.Tensor [V,3] or [C,V,3], got {type(verts).__name__}")
    _check(verts.dim() in (2, 3) and verts.shape[-1] == 3,
           f"{name} must have shape [V,3] or [C,V,3], got {tuple(verts.shape)}")
    _check(verts.is_floating_point(), f"{name} must be a floating-point tensor, got dtype {verts.dtype}")
    _check(bool(torch.isfinite(verts).all()), f"{name} contains NaN or Inf values; check the mesh you pass")


def _check_faces(faces: Any, n_verts: int, device: torch.device) -> None:
    _check(isinstance(faces, Tensor), f"faces must be an integer torch.Tensor [F,3], got {type(faces).__name__}")
    _check(faces.dim() == 2 and faces.shape[1] == 3, f"faces must have shape [F,3], got {tuple(faces.shape)}")
    _check(not faces.is_floating_point() and faces.dtype != torch.bool,
           f"faces must hold integer vertex indices (torch.long), got dtype {faces.dtype}")
    _check(faces.device == device, f"faces is on {faces.device} but verts is on {device}; move them to one device")
    if faces.numel():
        lo, hi = int(faces.min()), int(faces.max())
        _check(lo >= 0 and hi < n_verts,
               f"faces index vertices {lo}..{hi} but verts has only {n_verts} rows; faces must lie in [0, {n_verts})")


def _check_cameras(viewmats: Any, Ks: Any, verts: Tensor, width: Any, height: Any) -> int:
    _check(isinstance(viewmats, Tensor) and viewmats.dim() == 3 and tuple(viewmats.shape[1:]) == (4, 4),
           f"viewmats must be a tensor [C,4,4], got {getattr(viewmats, 'shape', type(viewmats).__name__)}")
    C = viewmats.shape[0]
    _check(C >= 1, "viewmats must hold at least one camera: shape [C,4,4] with C >= 1")
    _check(isinstance(Ks, Tensor) and tuple(Ks.shape) == (C, 3, 3),
           f"Ks must be a tensor [C,3,3] with C={C}, got {getattr(Ks, 'shape', type(Ks).__name__)}")
    _check(isinstance(width, int) and width > 0, f"width must be a positive int, got {width!r}")
    _check(isinstance(height, int) and height > 0, f"height must be a positive int, got {height!r}")
    if verts.dim() == 3:
        _check(verts.shape[0] == C, f"verts [C,V,3] must have C={C} (one per camera), got {tuple(verts.shape)}")
    for name, t in (("viewmats", viewmats), ("Ks", Ks)):
        _check(t.device == verts.device, f"{name} is on {t.device} but verts is on {verts.device}; use one device")
        _check(bool(torch.isfinite(t).all()), f"{name} contains NaN or Inf values")
    return C


def resolve_mesh_backend(backend: str, device: torch.device) -> str:
    """The rasterization backend ``backend`` resolves to for tensors on ``device`` (module docstring)."""
    from . import _mesh_ext

    _check(backend in MESH_BACKENDS, f"backend must be one of {MESH_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if _mesh_ext.available("cuda"):
                return "cuda"
            warn_once("mesh-auto-cuda", "CUDA mesh rasterizer unavailable "
                       f"({_mesh_ext.load_error('cuda')}); falling back to the slow torch twin")
            return "torch"
        if device.type == "cpu" and _mesh_ext.available("native"):
            return "native"
        return "torch"
    if backend == "native":
        _check(device.type == "cpu", f"backend='native' runs on CPU tensors, got tensors on {device}; "
                                     "use backend='cuda' or 'auto'")
        if not _mesh_ext.available("native"):
            warn_once("mesh-native", f"native mesh rasterizer unavailable ({_mesh_ext.load_error('native')}); "
                                      "using the torch backend")
            return "torch"
    if backend == "cuda":
        _check(device.type == "cuda", f"backend='cuda' needs CUDA tensors, got tensors on {device}; "
                                      "use backend='native' or 'auto'")
        if not _mesh_ext.available("cuda"):
            raise RuntimeError(f"CUDA mesh rasterizer unavailable: {_mesh_ext.load_error('cuda')}; run `studio doctor`")
    return backend


# ------------------------------------------------------------------------------------------------
# projection, rasterization, interpolation
# ------------------------------------------------------------------------------------------------


def project_vertices(verts: Tensor, viewmats: Tensor, Ks: Tensor, near_plane: float = 0.01) -> Tensor:
    """Pinhole projection ``[V,3]`` / ``[C,V,3]`` -> ``verts_screen [C,V,3] = (x_pix, y_pix, z_view)``.

    ``x_pix = (K00 x + K01 y) / z + K02``, ``y_pix = K11 y / z + K12`` with ``(x, y, z)`` the camera-space
    point. Vertices at ``z <= near_plane`` get a placeholder divisor 1 (finite values, zero gradient):
    the rasterizer drops every face that touches them anyway.
    """
    R = viewmats[:, :3, :3]
    t = viewmats[:, :3, 3]
    v = verts if verts.dim() == 3 else verts[None]
    cam = (v[:, :, None, :] * R[:, None, :, :]).sum(-1) + t[:, None, :]  # [C,V,3]
    x, y, z = cam.unbind(-1)
    zs = torch.where(z > near_plane, z, torch.ones_like(z))
    K = Ks[:, None]
    u = (K[..., 0, 0] * x + K[..., 0, 1] * y) / zs + K[..., 0, 2]
    w = K[..., 1, 1] * y / zs + K[..., 1, 2]
    return torch.stack([u, w, z], dim=-1)


def rasterize_mesh(
    verts: Tensor,
    faces: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    near: float = 0.01,
    far: float = 100.0,
    backend: str = "auto",
) -> dict[str, Any]:
    """Rasterize a triangle mesh into ``C`` cameras.

    ``verts [V,3]`` (shared) or ``[C,V,3]`` (one per camera), ``faces [F,3]`` integer. Returns a dict:

    * ``face_id [C,H,W]`` long, the visible face (-1 on background);
    * ``bary [C,H,W,3]`` perspective-correct barycentrics of that face's vertices (0 on background);
    * ``depth [C,H,W]`` view-space z of the surface (0 on background);
    * ``mask [C,H,W]`` bool (``face_id >= 0``);
    * ``verts_screen [C,V,3]`` the projected vertices (in the graph; used by ``antialias``), and
      ``width``, ``height``, ``near``, ``far``, ``backend``.

    ``bary`` and ``depth`` are differentiable w.r.t. ``verts``, ``viewmats`` and ``Ks`` for fixed
    visibility; use ``antialias`` for gradients from silhouettes. Bad inputs raise ``UserError``.
    """
    _check_verts(verts)
    C = _check_cameras(viewmats, Ks, verts, width, height)
    _check_faces(faces, verts.shape[-2], verts.device)
    _check(0 < near < far, f"need 0 < near < far, got near={near}, far={far}")
    backend = resolve_mesh_backend(backend, verts.device)
    dt = verts.dtype
    vs = project_vertices(verts, viewmats.to(dt), Ks.to(dt), near)
    faces_l = faces.long()
    if backend == "torch" or faces.shape[0] == 0:
        fid, bary, depth = rasterize_screen_torch(vs, faces_l, width, height, near, far)
    else:
        from . import _mesh_ext

        fid, bary, depth = _mesh_ext.rasterize_screen(vs, faces, width, height, near, far, backend)
        fid = fid.long()
        bary, depth = bary.to(dt), depth.to(dt)
    return {
        "face_id": fid,
        "bary": bary,
        "depth": depth,
        "mask": fid >= 0,
        "verts_screen": vs,
        "width": width,
        "height": height,
        "near": near,
        "far": far,
        "n_cameras": C,
        "backend": backend,
    }


def interpolate(attrs: Tensor, rast: dict[str, Any], faces: Tensor) -> Tensor:
    """Per-pixel attributes ``[C,H,W,D]`` from vertex attributes ``[V,D]`` or ``[C,V,D]``.

    ``out = sum_k bary_k * attrs[faces[face_id, k]]`` (0 on background). Differentiable w.r.t. ``attrs``
    and, through ``rast["bary"]``, the vertex positions. Works for every backend (plain torch gathers).
    """
    fid, bary = rast["face_id"], rast["bary"]
    C = fid.shape[0]
    _check(isinstance(attrs, Tensor) and attrs.dim() in (2, 3) and attrs.is_floating_point(),
           f"attrs must be a float tensor [V,D] or [C,V,D], got {getattr(attrs, 'shape', type(attrs).__name__)}")
    _check(attrs.dim() == 2 or attrs.shape[0] == C, f"attrs [C,V,D] must have C={C}, got {tuple(attrs.shape)}")
    V = attrs.shape[-2]
    if faces.numel():
        _check(int(faces.max()) < V, f"faces index vertex {int(faces.max())} but attrs has only {V} rows")
    D = attrs.shape[-1]
    mask = fid >= 0
    idx = faces.long()[fid.clamp_min(0)]  # [C,H,W,3]
    if attrs.dim() == 3:
        idx = idx + (torch.arange(C, device=idx.device) * V)[:, None, None, None]
        table = attrs.reshape(C * V, D)
    else:
        table = attrs
    b = bary.to(attrs.dtype)
    out = b[..., 0:1] * table[idx[..., 0]] + b[..., 1:2] * table[idx[..., 1]] + b[..., 2:3] * table[idx[..., 2]]
    return torch.where(mask[..., None], out, torch.zeros_like(out))


# ------------------------------------------------------------------------------------------------
# normals
# ------------------------------------------------------------------------------------------------


def _face_cross(verts: Tensor, faces: Tensor) -> Tensor:
    f = faces.long()
    v0, v1, v2 = verts[..., f[:, 0], :], verts[..., f[:, 1], :], verts[..., f[:, 2], :]
    return torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)


def face_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """Unit face normals ``[F,3]`` / ``[C,F,3]`` by the right-hand rule: counter-clockwise faces (seen
    from outside) point outward. Degenerate faces get the zero vector."""
    n = _face_cross(verts, faces)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-20)


def vertex_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals ``[V,3]`` / ``[C,V,3]``.

    Each vertex sums the unnormalised cross products ``(v1 - v0) x (v2 - v0)`` (length = twice the face
    area) of its faces, then normalises; vertices without faces get the zero vector.
    """
    cross = _face_cross(verts, faces)  # [...,F,3]
    f = faces.long().reshape(-1)
    contrib = cross.unsqueeze(-2).expand(*cross.shape[:-1], 3, 3).reshape(*cross.shape[:-2], -1, 3)
    acc = torch.zeros_like(verts).index_add(-2, f, contrib)
    return acc / acc.norm(dim=-1, keepdim=True).clamp_min(1e-20)


# ------------------------------------------------------------------------------------------------
# antialiasing
# ------------------------------------------------------------------------------------------------


def mesh_edge_topology(faces: Tensor) -> Tensor:
    """For every face and edge ``k`` (the edge opposite vertex ``k``), the face across it: ``[F,3]`` long,
    ``-1`` on a boundary edge, ``-2`` on a non-manifold edge (more than two faces). Topology only: compute
    it once per mesh and pass it to ``antialias(..., topology=)``."""
    f = faces.long()
    F = f.shape[0]
    if F == 0:
        return f.new_empty((0, 3))
    e = torch.stack([f[:, [1, 2]], f[:, [2, 0]], f[:, [0, 1]]], dim=1)  # [F,3,2]
    n = int(f.max()) + 1
    key = (e.min(-1).values * n + e.max(-1).values).reshape(-1)
    order = torch.argsort(key, stable=True)
    sk = key[order]
    _, inv, counts = torch.unique_consecutive(sk, return_inverse=True, return_counts=True)
    cnt = counts[inv]
    pos = torch.arange(sk.numel(), device=f.device)
    same_next = torch.cat([sk[1:] == sk[:-1], sk.new_zeros(1, dtype=torch.bool)])
    partner = order[torch.where(same_next, pos + 1, (pos - 1).clamp_min(0))] // 3
    nb_sorted = torch.where(cnt == 2, partner, torch.where(cnt == 1, -torch.ones_like(partner),
                                                           -2 * torch.ones_like(partner)))
    nb = torch.empty_like(nb_sorted)
    nb[order] = nb_sorted
    return nb.reshape(F, 3)


def _edge_fn(tri: Tensor, k: int, px: Tensor, py: Tensor) -> Tensor:
    """Edge function ``e_k`` (edge opposite vertex k) of triangles ``tri [M,3,>=2]`` at points ``[M]``."""
    a, b = tri[:, (k + 1) % 3], tri[:, (k + 2) % 3]
    return (a[:, 0] - px) * (b[:, 1] - py) - (b[:, 0] - px) * (a[:, 1] - py)


def antialias(image: Tensor, rast: dict[str, Any], faces: Tensor, *, topology: Tensor | None = None) -> Tensor:
    """Silhouette edge antialiasing (nvdiffrast-style analytic AA, our own formulation): ``[C,H,W,D]``.

    For every pair of horizontally or vertically adjacent pixels with different ``face_id``, the pixel
    of smaller depth (background = infinitely far) is "in" and its face ``T`` the occluder. Walking from
    the in-centre to the out-centre (``t`` from 0 to 1, the pixel boundary at ``t = 1/2``), the segment
    leaves ``T`` through the edge with the smallest crossing ``t = e(in) / (e(in) - e(out))`` (edge
    functions are affine along the segment). The pair is antialiased only if that edge is a
    **silhouette edge** in this view (a boundary or non-manifold edge, or its neighbour face has the
    opposite screen orientation or is culled) and it is closer to perpendicular to the pair's axis
    (horizontal pairs take edges with ``|dy| >= |dx|``, vertical pairs the others), so every edge is
    handled along exactly one axis. Then, with colours ``c_in``, ``c_out`` of the input image::

        t > 1/2: out pixel += (t - 1/2) (c_in - c_out)     (T covers part of the out pixel)
        t < 1/2: in pixel  += (1/2 - t) (c_out - c_in)     (T misses part of the in pixel)

    This is the coverage of the pixel cell along the axis, so the image is continuous in the vertex
    positions, and a pixel's gradient w.r.t. the crossing ``t`` is ``c_in - c_out``: moving a silhouette
    edge outward raises the share of the occluder's colour in the pixels it enters. Processing each
    row (column) crossing along one axis makes the antialiased coverage of a triangle a piecewise-linear
    estimate of its area whose derivative follows the exact area's (tested). Differentiable w.r.t.
    ``image`` and (through ``rast["verts_screen"]``) vertex positions and cameras. Plain torch on the
    (sparse) edge pixels, for every backend; pass ``topology`` to skip recomputing the edge adjacency.
    """
    fid = rast["face_id"]
    C, H, W = fid.shape
    _check(isinstance(image, Tensor) and image.dim() == 4 and tuple(image.shape[:3]) == (C, H, W),
           f"image must be [C,H,W,D] with C,H,W={C},{H},{W} (the rasterization's), got "
           f"{getattr(image, 'shape', type(image).__name__)}")
    vs = rast["verts_screen"]
    f = faces.long()
    if f.shape[0] == 0:
        return image
    topo = mesh_edge_topology(f) if topology is None else topology.long()
    _check(tuple(topo.shape) == tuple(f.shape), f"topology must be [F,3] from mesh_edge_topology(faces), "
                                                f"got {tuple(topo.shape)}")
    D = image.shape[-1]
    with torch.no_grad():
        tri_all = vs.detach()[:, f]  # [C,F,3,3]
        x, y, z = tri_all.unbind(-1)
        area = (x[..., 1] - x[..., 0]) * (y[..., 2] - y[..., 0]) - (x[..., 2] - x[..., 0]) * (y[..., 1] - y[..., 0])
        sgn = torch.sign(area) * (z > rast["near"]).all(-1)  # 0: culled or degenerate
        nb_sgn = torch.where(topo[None] >= 0, sgn[:, topo.clamp_min(0)], torch.zeros_like(sgn)[:, :, None])
        silhouette = (topo[None] < 0) | (nb_sgn != sgn[..., None]) | (nb_sgn == 0)  # [C,F,3]
        depth = torch.where(fid >= 0, rast["depth"].detach(), torch.full_like(rast["depth"].detach(), float("inf")))
    flat = image.reshape(C * H * W, D)
    out = flat
    dt = vs.dtype
    for axis in (2, 1):  # 2: horizontal neighbours (j, j+1); 1: vertical (i, i+1)
        with torch.no_grad():
            if axis == 2:
                fa, fb, da, db = fid[:, :, :-1], fid[:, :, 1:], depth[:, :, :-1], depth[:, :, 1:]
            else:
                fa, fb, da, db = fid[:, :-1, :], fid[:, 1:, :], depth[:, :-1, :], depth[:, 1:, :]
            c, i, j = (fa != fb).nonzero(as_tuple=True)
            if c.numel() == 0:
                continue
            a_front = da[c, i, j] <= db[c, i, j]
            i2, j2 = (i, j + 1) if axis == 2 else (i + 1, j)
            ii = torch.where(a_front, i, i2)
            jj = torch.where(a_front, j, j2)
            io = torch.where(a_front, i2, i)
            jo = torch.where(a_front, j2, j)
            face = fid[c, ii, jj]
        tri = vs[c[:, None], f[face]]  # [M,3,3] with autograd
        px_in, py_in = jj.to(dt) + 0.5, ii.to(dt) + 0.5
        px_out, py_out = jo.to(dt) + 0.5, io.to(dt) + 0.5
        e_in = torch.stack([_edge_fn(tri, k, px_in, py_in) for k in range(3)], dim=-1)  # [M,3]
        e_out = torch.stack([_edge_fn(tri, k, px_out, py_out) for k in range(3)], dim=-1)
        with torch.no_grad():
            s = sgn[c, face][:, None]
            exits = (s * e_in >= 0) & (s * e_out < 0) & (s != 0)
            denom = torch.where(exits, e_in - e_out, torch.ones_like(e_in))
            t_all = torch.where(exits, e_in / denom, torch.full_like(e_in, float("inf")))
            k = t_all.argmin(-1)
            ok = exits.any(-1) & silhouette[c, face, k]
            ta = tri.detach()
            a_pt = ta[torch.arange(k.numel(), device=k.device), (k + 1) % 3]
            b_pt = ta[torch.arange(k.numel(), device=k.device), (k + 2) % 3]
            ex, ey = (b_pt[:, 0] - a_pt[:, 0]).abs(), (b_pt[:, 1] - a_pt[:, 1]).abs()
            ok &= (ey >= ex) if axis == 2 else (ex > ey)
            sel = ok.nonzero()[:, 0]
        if sel.numel() == 0:
            continue
        ks = k[sel]
        ei = e_in[sel].gather(1, ks[:, None])[:, 0]
        eo = e_out[sel].gather(1, ks[:, None])[:, 0]
        t = ei / (ei - eo)
        idx_in = (c[sel] * H + ii[sel]) * W + jj[sel]
        idx_out = (c[sel] * H + io[sel]) * W + jo[sel]
        col_in, col_out = flat[idx_in], flat[idx_out]
        w_out = (t - 0.5).clamp_min(0)[:, None].to(image.dtype)
        w_in = (0.5 - t).clamp_min(0)[:, None].to(image.dtype)
        out = out.index_add(0, idx_out, w_out * (col_in - col_out)).index_add(0, idx_in, w_in * (col_out - col_in))
    return out.reshape(C, H, W, D)


# ------------------------------------------------------------------------------------------------
# convenience renderer
# ------------------------------------------------------------------------------------------------


_antialias = antialias  # render_mesh's `antialias` flag shadows the function inside it


def _unpack_cameras(cameras: Any, width: int | None, height: int | None) -> tuple[Tensor, Tensor, int, int]:
    from ..cameras import Cameras

    if isinstance(cameras, Cameras):
        w = cameras.width if width is None else width
        h = cameras.height if height is None else height
        _check((w, h) == (cameras.width, cameras.height),
               f"width/height {w}x{h} differ from the cameras' {cameras.width}x{cameras.height}; "
               "use cameras.resized(width, height)")
        return cameras.viewmats, cameras.Ks, w, h
    _check(isinstance(cameras, (tuple, list)) and len(cameras) == 2,
           "cameras must be a studio.cameras.Cameras or a (viewmats [C,4,4], Ks [C,3,3]) pair")
    _check(width is not None and height is not None, "width and height are required with a (viewmats, Ks) pair")
    return cameras[0], cameras[1], width, height


def background_colors(background: Any, C: int, D: int, like: Tensor) -> Tensor:
    """``background`` (a float, a ``[D]`` colour or ``[C,D]`` colours) as ``[C,1,1,D]``."""
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    ok = (bg.dim() == 0 or (bg.dim() == 1 and bg.shape[0] in (1, D))
          or (bg.dim() == 2 and bg.shape[0] in (1, C) and bg.shape[1] in (1, D)))
    _check(ok, f"background must be a float, a [{D}] colour or [C,{D}] colours with C={C}, got shape {tuple(bg.shape)}")
    return bg.expand(C, D)[:, None, None, :]


def render_mesh(
    verts: Tensor,
    faces: Tensor,
    cameras: Any,
    width: int | None = None,
    height: int | None = None,
    *,
    vertex_colors: Tensor | None = None,
    normals: bool | str = True,
    background: float | Sequence[float] | Tensor = 1.0,
    antialias: bool = True,
    near: float = 0.01,
    far: float = 100.0,
    backend: str = "auto",
    topology: Tensor | None = None,
) -> dict[str, Any]:
    """Render a mesh for previews, normal maps and texture stages.

    ``cameras`` is a ``studio.cameras.Cameras`` or a ``(viewmats, Ks)`` pair (then ``width``/``height``
    are required). ``vertex_colors [V,D]`` / ``[C,V,D]`` are interpolated unlit; without them the mesh
    is shaded grey with a two-sided headlight (``0.8 * (0.25 + 0.75 |n . l|)``, ``l`` towards the camera
    centre), a preview look only. ``normals``: ``True`` / ``"vertex"`` interpolated area-weighted vertex
    normals (renormalised), ``"face"`` flat face normals, ``False`` / ``"none"`` none.

    Returns ``rgb [C,H,W,D]`` (composited over ``background``), ``alpha [C,H,W,1]``, ``depth [C,H,W,1]``
    (view-space z, 0 on background), ``normal [C,H,W,3]`` (world space, unit, 0 on background; absent
    with ``normals=False``), ``face_id [C,H,W]``, ``mask [C,H,W]`` and ``rast``. With
    ``antialias`` (default) rgb and alpha go through ``antialias``, so silhouettes carry
    gradients to the vertices; depth and normal are not antialiased.
    """
    viewmats, Ks, width, height = _unpack_cameras(cameras, width, height)
    mode = ("vertex" if normals else "none") if isinstance(normals, bool) else normals
    _check(mode in NORMAL_MODES, f"normals must be True, False or one of {NORMAL_MODES}, got {normals!r}")
    rast = rasterize_mesh(verts, faces, viewmats, Ks, width, height, near=near, far=far, backend=backend)
    C = rast["n_cameras"]
    fid = rast["face_id"]
    mask = rast["mask"]
    maskf = mask[..., None].to(verts.dtype)

    def gather_face(fn: Tensor) -> Tensor:  # [F,3] or [C,F,3] -> [C,H,W,3]
        g = fid.clamp_min(0)
        vals = fn[g] if fn.dim() == 2 else fn[torch.arange(C, device=g.device)[:, None, None], g]
        return vals * maskf

    normal = None
    if mode == "vertex":
        n = interpolate(vertex_normals(verts, faces), rast, faces)
        normal = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12) * maskf
    elif mode == "face":
        normal = gather_face(face_normals(verts, faces))

    if vertex_colors is not None:
        _check(isinstance(vertex_colors, Tensor) and vertex_colors.dim() in (2, 3)
               and vertex_colors.shape[-2] == verts.shape[-2],
               f"vertex_colors must be [V,D] or [C,V,D] with V={verts.shape[-2]}, got "
               f"{getattr(vertex_colors, 'shape', type(vertex_colors).__name__)}")
        color = interpolate(vertex_colors.to(verts.dtype), rast, faces)
    else:
        shade_n = normal if normal is not None else gather_face(face_normals(verts, faces))
        pos = interpolate(verts, rast, faces)
        to_cam = camera_centers(viewmats.to(verts.dtype))[:, None, None, :] - pos
        to_cam = to_cam / to_cam.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        lambert = (shade_n * to_cam).sum(-1, keepdim=True).abs()
        color = (0.8 * (0.25 + 0.75 * lambert)).expand(C, height, width, 3)
    D = color.shape[-1]
    bg = background_colors(background, C, D, color)
    rgb = color * maskf + bg * (1 - maskf)
    alpha = maskf
    if antialias:
        both = _antialias(torch.cat([rgb, alpha], dim=-1), rast, faces, topology=topology)
        rgb, alpha = both[..., :D], both[..., D:]
    out = {
        "rgb": rgb,
        "alpha": alpha,
        "depth": rast["depth"][..., None],
        "face_id": fid,
        "mask": mask,
        "rast": rast,
    }
    if normal is not None:
        out["normal"] = normal
    return out


__all__ = [
    "MESH_BACKENDS",
    "antialias",
    "face_normals",
    "interpolate",
    "mesh_edge_topology",
    "project_vertices",
    "rasterize_mesh",
    "render_mesh",
    "resolve_mesh_backend",
    "vertex_normals",
]
