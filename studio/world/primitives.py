"""Procedural surfaces with exact ground truth, turned into Gaussian sets.

Each primitive samples points uniformly by area on its surface together with the exact outward
normal; ``surfels_to_gaussians`` turns oriented points into flat Gaussians (two axes in the tangent
plane, a thin one along the normal), so renders show crisp, shaded-looking surfaces and the true
surface is known for metrics (Chamfer distance, normals, silhouettes).

World frame: y-up, the object's *front* faces +z (see ``studio.cameras``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Surface:
    points: Tensor  # [P,3]
    normals: Tensor  # [P,3] unit, outward
    colors: Tensor  # [P,3] in [0,1]

    def __len__(self) -> int:
        return self.points.shape[0]

    @staticmethod
    def cat(parts: list["Surface"]) -> "Surface":
        return Surface(*(torch.cat([getattr(p, k) for p in parts]) for k in ("points", "normals", "colors")))

    def transformed(self, offset=(0.0, 0.0, 0.0), scale: float = 1.0) -> "Surface":
        return Surface(self.points * scale + torch.tensor(offset), self.normals, self.colors)

    def rotated(self, axis: str, degrees: float) -> "Surface":
        """Rotate points and normals about the world ``axis`` ("x", "y" or "z") through the origin
        (right-handed: ``rotated("x", 90)`` takes +y to +z)."""
        R = rotation_matrix(axis, degrees)
        return Surface(self.points @ R.T, self.normals @ R.T, self.colors)

    def recolored(self, mask: Tensor, color) -> "Surface":
        """Copy with ``colors[mask] = color``."""
        col = self.colors.clone()
        col[mask] = torch.as_tensor(color, dtype=col.dtype)
        return Surface(self.points, self.normals, col)


def rotation_matrix(axis: str, degrees: float) -> Tensor:
    """3x3 right-handed rotation about a world axis."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    if axis == "x":
        m = [[1, 0, 0], [0, c, -s], [0, s, c]]
    elif axis == "y":
        m = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    elif axis == "z":
        m = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    else:
        raise ValueError(f"axis must be 'x', 'y' or 'z', got {axis!r}")
    return torch.tensor(m, dtype=torch.float32)


def _rgb(color, n: int) -> Tensor:
    return torch.as_tensor(color, dtype=torch.float32).reshape(1, 3).expand(n, 3).clone()


def sphere(n: int, radius: float, color, g: torch.Generator) -> Surface:
    d = torch.randn(n, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    return Surface(d * radius, d, _rgb(color, n))


def box(n: int, half: tuple[float, float, float], color, g: torch.Generator, face_colors=None) -> Surface:
    """Axis-aligned box; ``face_colors`` optionally maps face names (+x,-x,+y,-y,+z,-z) to colours."""
    hx, hy, hz = half
    faces = [  # (axis, sign, area)
        (0, 1, hy * hz), (0, -1, hy * hz), (1, 1, hx * hz), (1, -1, hx * hz), (2, 1, hx * hy), (2, -1, hx * hy)]
    names = ["+x", "-x", "+y", "-y", "+z", "-z"]
    areas = torch.tensor([f[2] for f in faces])
    which = torch.multinomial(areas / areas.sum(), n, replacement=True, generator=g)
    u = torch.rand(n, 3, generator=g) * 2 - 1
    p = u * torch.tensor(half)
    nrm = torch.zeros(n, 3)
    col = _rgb(color, n)
    for i, (axis, sign, _) in enumerate(faces):
        m = which == i
        p[m, axis] = sign * half[axis]
        nrm[m, axis] = float(sign)
        if face_colors and names[i] in face_colors:
            col[m] = torch.tensor(face_colors[names[i]], dtype=torch.float32)
    return Surface(p, nrm, col)


def cylinder(n: int, radius: float, half_height: float, color, g: torch.Generator, caps: bool = True) -> Surface:
    side = 2 * math.pi * radius * 2 * half_height
    cap = math.pi * radius**2 if caps else 0.0
    total = side + 2 * cap
    k_side = int(round(n * side / total))
    th = torch.rand(k_side, generator=g) * 2 * math.pi
    y = (torch.rand(k_side, generator=g) * 2 - 1) * half_height
    p_side = torch.stack([radius * torch.sin(th), y, radius * torch.cos(th)], -1)
    n_side = torch.stack([torch.sin(th), torch.zeros_like(th), torch.cos(th)], -1)
    parts = [Surface(p_side, n_side, _rgb(color, k_side))]
    if caps:
        k_cap = n - k_side
        r = radius * torch.sqrt(torch.rand(k_cap, generator=g))
        th = torch.rand(k_cap, generator=g) * 2 * math.pi
        sign = torch.where(torch.rand(k_cap, generator=g) < 0.5, -1.0, 1.0)
        p = torch.stack([r * torch.sin(th), sign * half_height, r * torch.cos(th)], -1)
        nn = torch.stack([torch.zeros_like(r), sign, torch.zeros_like(r)], -1)
        parts.append(Surface(p, nn, _rgb(color, k_cap)))
    return Surface.cat(parts)


def cone(n: int, radius: float, height: float, color, g: torch.Generator) -> Surface:
    """Cone with its base disc at y=0 and apex at y=height (side surface + base)."""
    slant = math.hypot(radius, height)
    side, base = math.pi * radius * slant, math.pi * radius**2
    k_side = int(round(n * side / (side + base)))
    s = torch.sqrt(torch.rand(k_side, generator=g))  # area-uniform along the slant
    th = torch.rand(k_side, generator=g) * 2 * math.pi
    r = radius * s
    p_side = torch.stack([r * torch.sin(th), height * (1 - s), r * torch.cos(th)], -1)
    ny = radius / slant
    nr = height / slant
    n_side = torch.stack([nr * torch.sin(th), torch.full_like(th, ny), nr * torch.cos(th)], -1)
    k_base = n - k_side
    rb = radius * torch.sqrt(torch.rand(k_base, generator=g))
    tb = torch.rand(k_base, generator=g) * 2 * math.pi
    p_base = torch.stack([rb * torch.sin(tb), torch.zeros_like(rb), rb * torch.cos(tb)], -1)
    n_base = torch.tensor([0.0, -1.0, 0.0]).expand(k_base, 3)
    return Surface.cat([Surface(p_side, n_side, _rgb(color, k_side)), Surface(p_base, n_base, _rgb(color, k_base))])


def torus(n: int, major: float, minor: float, color, g: torch.Generator) -> Surface:
    """Torus around the y axis, area-uniform by rejection on the tube angle."""
    out_p, out_n = [], []
    have = 0
    while have < n:
        m = 2 * (n - have) + 16
        u = torch.rand(m, generator=g) * 2 * math.pi
        v = torch.rand(m, generator=g) * 2 * math.pi
        w = torch.rand(m, generator=g)
        keep = w <= (major + minor * torch.cos(v)) / (major + minor)
        u, v = u[keep], v[keep]
        nrm = torch.stack([torch.cos(v) * torch.sin(u), torch.sin(v), torch.cos(v) * torch.cos(u)], -1)
        ring = torch.stack([major * torch.sin(u), torch.zeros_like(u), major * torch.cos(u)], -1)
        out_p.append(ring + minor * nrm)
        out_n.append(nrm)
        have += u.numel()
    p, nn = torch.cat(out_p)[:n], torch.cat(out_n)[:n]
    return Surface(p, nn, _rgb(color, n))


def disk(n: int, radius: float, color, g: torch.Generator) -> Surface:
    """Flat disc in the xz-plane at y=0 with normal +y (rotate / offset it into place)."""
    r = radius * torch.sqrt(torch.rand(n, generator=g))
    th = torch.rand(n, generator=g) * 2 * math.pi
    p = torch.stack([r * torch.sin(th), torch.zeros_like(r), r * torch.cos(th)], -1)
    return Surface(p, torch.tensor([0.0, 1.0, 0.0]).expand(n, 3).clone(), _rgb(color, n))


def hemisphere(n: int, radius: float, color, g: torch.Generator, base_color=None) -> Surface:
    """Closed upper half ball: the dome (y >= 0) plus its base disc at y=0 (normal -y).

    ``base_color`` colours the disc (default: ``color``)."""
    dome_area, base_area = 2 * math.pi * radius**2, math.pi * radius**2
    k_dome = int(round(n * dome_area / (dome_area + base_area)))
    d = torch.randn(k_dome, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    d[:, 1] = d[:, 1].abs()
    dome = Surface(d * radius, d, _rgb(color, k_dome))
    base = disk(n - k_dome, radius, color if base_color is None else base_color, g)
    base = Surface(base.points, -base.normals, base.colors)
    return Surface.cat([dome, base])


def triangles(n: int, tris, color, g: torch.Generator, tri_colors=None) -> Surface:
    """Area-uniform sample of a triangle soup ``tris [T,3,3]``; each triangle's normal is
    ``(v1 - v0) x (v2 - v0)`` normalised (list vertices counter-clockwise seen from outside).
    ``tri_colors [T,3]`` optionally colours each triangle."""
    tris = torch.as_tensor(tris, dtype=torch.float32)
    e1, e2 = tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]
    cr = torch.linalg.cross(e1, e2, dim=-1)
    area = cr.norm(dim=-1)
    which = torch.multinomial(area / area.sum(), n, replacement=True, generator=g)
    u, v = torch.rand(n, 1, generator=g), torch.rand(n, 1, generator=g)
    flip = (u + v) > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    p = tris[which, 0] + u * e1[which] + v * e2[which]
    nrm = (cr / area[:, None])[which]
    col = _rgb(color, n) if tri_colors is None else torch.as_tensor(tri_colors, dtype=torch.float32)[which]
    return Surface(p, nrm, col)


def pyramid(n: int, half: float, height: float, color, g: torch.Generator) -> Surface:
    """Square pyramid: base ``[-half, half]^2`` at y=0 (normal -y), apex at ``(0, height, 0)``."""
    a, h = half, height
    apex = [0.0, h, 0.0]
    c = [[-a, 0, a], [a, 0, a], [a, 0, -a], [-a, 0, -a]]  # base corners, counter-clockwise seen from +y
    sides = [[c[i], c[(i + 1) % 4], apex] for i in range(4)]
    base = [[c[0], c[2], c[1]], [c[0], c[3], c[2]]]
    return triangles(n, sides + base, color, g)


def surfels_to_gaussians(surface: Surface, *, thickness: float = 0.15, opacity: float = 0.95,
                         spacing: float | None = None) -> dict[str, Tensor]:
    """Flat Gaussians on a sampled surface: tangent scale ~ point spacing, normal scale = thickness x.

    Returns activated parameters ``means [P,3]``, ``quats [P,4]`` (w-x-y-z, local z = normal),
    ``scales [P,3]``, ``opacities [P]``, ``colors [P,3]`` ready for ``rasterize_gaussians``.
    """
    P = len(surface)
    if spacing is None:
        # Mean nearest-neighbour distance for an area-uniform sample: ~ sqrt(area / P); estimate the area
        # from the bounding extent of the points (good enough for a visual density).
        ext = (surface.points.max(0).values - surface.points.min(0).values).clamp_min(1e-3)
        area = 2 * (ext[0] * ext[1] + ext[1] * ext[2] + ext[0] * ext[2])
        spacing = float(torch.sqrt(area / max(P, 1)))
    nrm = surface.normals
    # Rotation taking local z to the normal: build an orthonormal frame and convert to a quaternion.
    helper = torch.where((nrm[:, 1:2].abs() < 0.9), torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    t1 = torch.linalg.cross(helper, nrm, dim=-1)
    t1 = t1 / t1.norm(dim=-1, keepdim=True)
    t2 = torch.linalg.cross(nrm, t1, dim=-1)
    R = torch.stack([t1, t2, nrm], dim=-1)  # columns = local axes
    quats = rotmat_to_quat(R)
    scales = torch.tensor([spacing, spacing, spacing * thickness]).expand(P, 3).clone()
    return {
        "means": surface.points.clone(),
        "quats": quats,
        "scales": scales,
        "opacities": torch.full((P,), opacity),
        "colors": surface.colors.clone(),
    }


def rotmat_to_quat(R: Tensor) -> Tensor:
    """Rotation matrices ``[...,3,3]`` to unit w-x-y-z quaternions (numerically stable branch choice)."""
    m = R
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack([
        torch.stack([1 + tr, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                     m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                     1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                     1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
    ], dim=-2)  # [...,4,4]
    diag = torch.stack([tr, m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]], -1)
    best = diag.argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    q = q / q.norm(dim=-1, keepdim=True)
    return q * torch.where(q[..., :1] < 0, -1.0, 1.0)


def gaussian_normals(quats: Tensor, scales: Tensor | None = None) -> Tensor:
    """Unit normals ``[N,3]`` of flat Gaussians: the local z axis of ``quats`` (the axis
    ``surfels_to_gaussians`` aligns with the outward normal) or, given ``scales``, the axis of the
    smallest scale (sign then follows the rotation, not necessarily outward)."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    # Columns of the rotation matrix of a w-x-y-z quaternion.
    cols = torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 2 * (x * z - w * y)], -1),
        torch.stack([2 * (x * y - w * z), 1 - 2 * (x * x + z * z), 2 * (y * z + w * x)], -1),
        torch.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], -1),
    ], dim=1)  # [N, 3 (column), 3]
    idx = torch.full(q.shape[:-1], 2, dtype=torch.long, device=q.device) if scales is None else scales.argmin(-1)
    n = torch.gather(cols, 1, idx[:, None, None].expand(-1, 1, 3))[:, 0]
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mirror_gaussians_z(gaussians: dict[str, Tensor]) -> dict[str, Tensor]:
    """Reflect a Gaussian set across the plane z=0 (front <-> back): ``z -> -z`` for the means and
    ``R -> M R M`` (``M = diag(1,1,-1)``) for the rotations, i.e. quaternion ``(w,x,y,z) -> (w,-x,-y,z)``.
    Other entries are copied."""
    out = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in gaussians.items()}
    out["means"] = gaussians["means"] * torch.tensor([1.0, 1.0, -1.0], dtype=gaussians["means"].dtype,
                                                     device=gaussians["means"].device)
    out["quats"] = gaussians["quats"] * torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=gaussians["quats"].dtype,
                                                     device=gaussians["quats"].device)
    return out
