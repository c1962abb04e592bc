"""``DMTet``: a deformable tetrahedral grid with a per-vertex SDF, extracted to a triangle mesh by
differentiable marching tetrahedra (Shen et al. 2021, "Deep Marching Tetrahedra"), and the mesh
regularisers of the geometry stages (DreamPolish G3/G4, threestudio ``prolificdreamer-geometry``).

Conventions
    * **SDF sign**: negative inside, positive outside; the surface is the zero level. A vertex with
      ``sdf == 0`` counts as outside.
    * **Faces** are counter-clockwise seen from outside, so ``studio.render.face_normals`` points
      outward (towards increasing SDF).
    * World units and axes are those of ``studio.cameras`` (y-up); the default grid box is
      ``[-1, 1]^3`` like threestudio's ``isosurface_bbox``.

Grid (``tet_grid``)
    ``R^3`` cubic cells, each split into 6 tetrahedra along its main diagonal (the Freudenthal / Kuhn
    split): tetrahedron ``p`` of a cell walks from corner ``(0,0,0)`` to ``(1,1,1)`` adding the unit
    steps of the axis permutation ``p`` one at a time. Every cell uses the same diagonal direction, so
    neighbouring cells' triangulated faces match and the grid is conforming (shared vertices, no
    T-junctions). ``(R+1)^3`` vertices, ``6 R^3`` tetrahedra, each of volume ``cell_volume / 6``, all
    positively oriented (``det[v1-v0, v2-v0, v3-v0] > 0``). threestudio loads its grids from files
    (``{res}_tets.npz``, made with quartet); ours is procedural, so the counts differ from its "128"
    grid for the same nominal resolution.

Marching tetrahedra (``marching_tetrahedra``)
    A tetrahedron whose vertices' SDF signs differ is cut by the surface. On each edge ``(i, j)`` with
    ``s_i < 0 <= s_j`` (or the reverse) the mesh vertex is the zero of the linear interpolant::

        p = (v_i s_j - v_j s_i) / (s_j - s_i)

    which is differentiable w.r.t. both positions and SDF values (the gradient w.r.t. ``s`` is what lets
    silhouette / normal losses move the surface through the SDF). Mesh vertices are shared per grid
    edge, so the mesh is watertight wherever the surface stays inside the grid. The 16 inside/outside
    cases give 0, 1 (one vertex separated) or 2 (two-two split: a quad cut along one diagonal)
    triangles. The case table is *generated* once (``_triangle_table``) on the reference tetrahedron
    ``(0, e_x, e_y, e_z)`` with each triangle wound so its normal points from the inside vertices to
    the outside ones. That winding holds for every positively oriented tetrahedron and every cut
    position: for one inside vertex ``a`` and cut points ``a + t_k (v_k - a)``,
    ``det[p_1 - a, p_2 - a, p_3 - a] = t_1 t_2 t_3 det[v_1 - a, v_2 - a, v_3 - a]`` keeps its sign,
    and the same expansion covers the quad triangles. (A deformation that inverts a tetrahedron flips
    its triangles, as in every DMTet implementation; the half-cell bound below makes that rare.)

Student (``DMTet``)
    Trainable ``sdf [N]`` and ``deformation [N,3]``; the vertex positions are
    ``grid + (cell / 2) * tanh(deformation)`` (each vertex moves at most half a cell per axis, as in
    threestudio's ``tetrahedra_sdf_grid``). ``DMTet.from_sdf(fn)`` initialises the SDF from any callable
    ``fn(points [N,3]) -> [N]`` (a NeuS field's SDF, an analytic shape) or a tensor of per-vertex values.

Regularisers
    * ``laplacian_loss``: uniform ("umbrella") Laplacian ``L(v) = mean(neighbours) - v``, mean of
      ``|L(v)|^2``.
    * ``normal_consistency_loss``: mean over interior edges of ``1 - cos(n_f, n_g)`` for the two faces
      ``f, g`` on the edge (``mesh_edge_topology``).
    * ``sdf_sign_flip_loss``: on every grid edge whose endpoint SDF signs differ, binary cross-entropy of
      ``sigmoid(s_i)`` against the sign of ``s_j`` and vice versa (nvdiffrec / Fantasia3D's SDF
      regulariser, used by threestudio's DMTet geometry): it shrinks spurious sign changes (floaters and
      internal surfaces) that no view sees. Mean over the flipping edges; 0 when none flip.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..render.mesh import face_normals, mesh_edge_topology
from ..render.volume import normalize_bbox  # the one bbox parser (re-exported)

__all__ = [
    "DMTet",
    "laplacian_loss",
    "marching_tetrahedra",
    "mesh_edges",
    "normal_consistency_loss",
    "normalize_bbox",
    "sdf_sign_flip_loss",
    "sphere_sdf",
    "tet_edges",
    "tet_grid",
    "uniform_laplacian",
]

SdfFn = Callable[[Tensor], Tensor]

#: the 6 edges of a tetrahedron as pairs of local vertex indices
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


# ----------------------------------------------------------------------------------------------- grid

def tet_grid(resolution: int, bbox: float | Sequence | Tensor = 1.0, *, device=None) -> tuple[Tensor, Tensor]:
    """A conforming tetrahedral grid of the box: ``(verts [(R+1)^3, 3] float32, tets [6 R^3, 4] long)``.

    Vertex ``(i, j, k)`` (along x, y, z) has index ``(i (R+1) + j)(R+1) + k``. Each cube cell is split into
    6 positively oriented tetrahedra sharing its main diagonal (module doc)."""
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise UserError(f"resolution must be a positive int (cells per axis), got {resolution!r}")
    R = resolution
    box = normalize_bbox(bbox).to(device)
    lin = torch.arange(R + 1, device=device, dtype=torch.float32) / R
    gi, gj, gk = torch.meshgrid(lin, lin, lin, indexing="ij")
    unit = torch.stack([gi, gj, gk], dim=-1).reshape(-1, 3)
    verts = box[0] + unit * (box[1] - box[0])

    n1 = R + 1
    c = torch.arange(R, device=device)
    ci, cj, ck = torch.meshgrid(c, c, c, indexing="ij")
    base = ((ci * n1 + cj) * n1 + ck).reshape(-1)  # corner (0,0,0) of every cell
    step = (n1 * n1, n1, 1)  # index offset of a unit step along x, y, z
    tets = []
    for perm in itertools.permutations(range(3)):
        o1 = step[perm[0]]
        o2 = o1 + step[perm[1]]
        o3 = o2 + step[perm[2]]
        # det[e_p0, e_p0 + e_p1, e_p0 + e_p1 + e_p2] = sign(perm): swap the last two for odd permutations
        inversions = sum(1 for a, b in itertools.combinations(perm, 2) if a > b)
        offs = (0, o1, o3, o2) if inversions % 2 else (0, o1, o2, o3)
        tets.append(torch.stack([base + o for o in offs], dim=-1))
    return verts, torch.stack(tets, dim=1).reshape(-1, 4)


def tet_edges(tets: Tensor) -> Tensor:
    """Unique undirected edges ``[E,2]`` (sorted pairs) of a tetrahedral mesh."""
    return _unique_edges(tets.long()[:, list(TET_EDGES)].reshape(-1, 2))


def _unique_edges(e: Tensor) -> Tensor:
    """Unique undirected edges of ``e [E,2]`` as sorted pairs (1-D ``unique`` on ``lo * n + hi`` keys: much
    faster than ``unique(dim=0)`` on millions of rows)."""
    if e.shape[0] == 0:
        return e.new_zeros((0, 2))
    lo, hi = e.min(-1).values, e.max(-1).values
    n = int(hi.max()) + 1
    key = torch.unique(lo * n + hi)
    return torch.stack([key // n, key % n], dim=-1)


# ----------------------------------------------------------------------------------- marching tetrahedra

def _triangle_table() -> tuple[Tensor, Tensor]:
    """The 16-case table: ``tris [16, 2, 3]`` local edge indices (into ``TET_EDGES``; -1 = unused) and
    ``count [16]``. Case bit ``k`` set = local vertex ``k`` inside. Windings fixed on the reference
    tetrahedron so normals point from inside to outside (module doc for why that is general)."""
    ref = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    eid = {p: i for i, p in enumerate(TET_EDGES)}

    def edge(a: int, b: int) -> int:
        return eid[(min(a, b), max(a, b))]

    tris = torch.full((16, 2, 3), -1, dtype=torch.long)
    count = torch.zeros(16, dtype=torch.long)
    for case in range(16):
        inside = [k for k in range(4) if case >> k & 1]
        outside = [k for k in range(4) if not case >> k & 1]
        if len(inside) in (0, 4):
            continue
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            cand = [[edge(lone, o) for o in others]]
        else:
            a, b = inside
            c, d = outside
            # quad cycle ac -> ad -> bd -> bc (consecutive cut points share a tet face), split along ac-bd
            cand = [[edge(a, c), edge(a, d), edge(b, d)], [edge(a, c), edge(b, d), edge(b, c)]]
        direction = ref[outside].mean(0) - ref[inside].mean(0)
        for t, tri in enumerate(cand):
            pts = torch.stack([ref[list(TET_EDGES[e])].mean(0) for e in tri])
            n = torch.linalg.cross(pts[1] - pts[0], pts[2] - pts[0], dim=0)
            if float(n @ direction) < 0:
                tri = [tri[0], tri[2], tri[1]]
            tris[case, t] = torch.tensor(tri)
        count[case] = len(cand)
    return tris, count


_TRI_TABLE, _TRI_COUNT = _triangle_table()


def marching_tetrahedra(verts: Tensor, tets: Tensor, sdf: Tensor) -> tuple[Tensor, Tensor]:
    """Zero level set of a per-vertex ``sdf [N]`` on a tetrahedral mesh ``verts [N,3]``, ``tets [T,4]``.

    Returns ``(mesh_verts [M,3], faces [F,3] long)``: one mesh vertex per grid edge that changes sign
    (shared by every tetrahedron on that edge), faces wound outward (normals towards positive SDF).
    ``mesh_verts`` is differentiable w.r.t. ``verts`` and ``sdf`` (edge interpolation, module doc); the
    topology (which edges are cut) is piecewise constant. No cut gives empty tensors.
    """
    if not (isinstance(verts, Tensor) and verts.dim() == 2 and verts.shape[1] == 3 and verts.is_floating_point()):
        raise UserError(f"verts must be a float tensor [N,3], got {getattr(verts, 'shape', type(verts).__name__)}")
    if not (isinstance(tets, Tensor) and tets.dim() == 2 and tets.shape[1] == 4 and not tets.is_floating_point()):
        raise UserError(f"tets must be an integer tensor [T,4], got {getattr(tets, 'shape', type(tets).__name__)}")
    if not (isinstance(sdf, Tensor) and sdf.reshape(-1).shape[0] == verts.shape[0]):
        raise UserError(f"sdf must hold one value per vertex ({verts.shape[0]}), got "
                        f"{getattr(sdf, 'shape', type(sdf).__name__)}")
    sdf = sdf.reshape(-1).to(verts.dtype)
    dev = verts.device
    tets = tets.long()
    n = verts.shape[0]
    with torch.no_grad():
        inside = sdf < 0
        occ = inside[tets]  # [T,4]
        n_in = occ.sum(-1)
        cut = (n_in > 0) & (n_in < 4)
        tc = tets[cut]
    if tc.shape[0] == 0:
        # empty, but still in the graph (a loss on an empty mesh backpropagates zeros, not an error)
        return verts[:0] + sdf[:0, None] * 0, torch.zeros((0, 3), dtype=torch.long, device=dev)
    with torch.no_grad():
        e = tc[:, list(TET_EDGES)]  # [Tc,6,2]
        lo, hi = e.min(-1).values, e.max(-1).values
        crosses = inside[lo] != inside[hi]
        key = lo * n + hi
        ukey, inv = torch.unique(key[crosses], return_inverse=True)
        edge_vert = torch.full_like(key, -1)
        edge_vert[crosses] = inv
        weights = 2 ** torch.arange(4, device=dev)
        case = (occ[cut].long() * weights).sum(-1)
        table = _TRI_TABLE.to(dev)[case]  # [Tc,2,3]
        used = _TRI_COUNT.to(dev)[case]  # [Tc]
        faces = torch.cat([edge_vert.gather(1, table[:, t].clamp_min(0))[used > t] for t in range(2)])
        a, b = ukey // n, ukey % n
    sa, sb = sdf[a][:, None], sdf[b][:, None]
    mesh_verts = (verts[a] * sb - verts[b] * sa) / (sb - sa)
    return mesh_verts, faces


# ------------------------------------------------------------------------------------------ regularisers

def mesh_edges(faces: Tensor) -> Tensor:
    """Unique undirected edges ``[E,2]`` (sorted pairs) of a triangle mesh."""
    f = faces.long()
    return _unique_edges(torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]))


def uniform_laplacian(verts: Tensor, faces: Tensor) -> Tensor:
    """Uniform Laplacian vectors ``[V,3]``: ``L(v_i) = mean_{j in N(i)} v_j - v_i`` over mesh neighbours
    (0 for vertices without edges). Zero at every interior vertex of a flat, evenly triangulated grid."""
    e = mesh_edges(faces)
    V = verts.shape[0]
    src = torch.cat([e[:, 0], e[:, 1]])
    dst = torch.cat([e[:, 1], e[:, 0]])
    acc = torch.zeros_like(verts).index_add(0, src, verts[dst])
    deg = torch.zeros(V, dtype=verts.dtype, device=verts.device).index_add(
        0, src, torch.ones_like(src, dtype=verts.dtype))
    lap = acc / deg.clamp_min(1)[:, None] - verts
    return torch.where(deg[:, None] > 0, lap, torch.zeros_like(lap))


def laplacian_loss(verts: Tensor, faces: Tensor) -> Tensor:
    """Mean over vertices of ``|L(v)|^2`` with the uniform Laplacian (``uniform_laplacian``); 0 for an
    empty mesh. Scale: squared world units (threestudio weights it 1e4 at 128^3 in its geometry stage)."""
    if faces.shape[0] == 0:
        return verts.sum() * 0
    return uniform_laplacian(verts, faces).pow(2).sum(-1).mean()


def normal_consistency_loss(verts: Tensor, faces: Tensor, *, topology: Tensor | None = None) -> Tensor:
    """Mean over interior (two-face) edges of ``1 - cos(n_f, n_g)`` between the unit normals of the faces
    ``f, g`` sharing the edge (``mesh_edge_topology``; boundary and non-manifold edges are skipped).
    0 for a plane, about ``theta^2 / 2`` for a smooth surface whose adjacent normals differ by ``theta``,
    up to 2 for a folded-over face. ``topology`` (from ``mesh_edge_topology(faces)``) skips recomputing it."""
    if faces.shape[0] == 0:
        return verts.sum() * 0
    topo = mesh_edge_topology(faces) if topology is None else topology.long()
    F = faces.shape[0]
    own = torch.arange(F, device=faces.device)[:, None].expand(F, 3)
    keep = (topo >= 0) & (topo > own)  # each interior edge once
    if not bool(keep.any()):
        return verts.sum() * 0
    n = face_normals(verts, faces)
    cos = (n[own[keep]] * n[topo[keep]]).sum(-1)
    return (1 - cos).mean()


def sdf_sign_flip_loss(sdf: Tensor, edges: Tensor) -> Tensor:
    """SDF regulariser on grid ``edges [E,2]``: for every edge whose endpoint signs differ, the sum of
    ``BCE(sigmoid(s_i), [s_j >= 0])`` and ``BCE(sigmoid(s_j), [s_i >= 0])``, averaged over those edges
    (module doc). Each term pulls one endpoint's SDF towards the other's sign, which removes sign
    changes that no rendering loss constrains. 0 (with a gradient path) when no edge flips."""
    s = sdf.reshape(-1)[edges.long()]  # [E,2]
    outside = s >= 0  # the sign convention of marching_tetrahedra (0 counts as outside)
    flip = outside[:, 0] != outside[:, 1]
    if not bool(flip.any()):
        return sdf.sum() * 0
    s, out = s[flip], outside[flip].to(s.dtype)
    bce = nn.functional.binary_cross_entropy_with_logits
    return (bce(s[:, 0], out[:, 1], reduction="none") + bce(s[:, 1], out[:, 0], reduction="none")).mean()


def sphere_sdf(radius: float = 0.5, center: Sequence[float] = (0.0, 0.0, 0.0)) -> SdfFn:
    """An analytic sphere SDF ``|p - c| - r`` (threestudio's default DMTet/NeuS initial shape has r = 0.5)."""
    c = torch.as_tensor(center, dtype=torch.float32)

    def fn(points: Tensor) -> Tensor:
        return (points - c.to(points)).norm(dim=-1) - radius

    return fn


# ---------------------------------------------------------------------------------------------- student

class DMTet(nn.Module):
    """A deformable tetrahedral grid with a trainable SDF (module doc).

    >>> model = DMTet.from_sdf(sphere_sdf(0.5), resolution=64)        # doctest: +SKIP
    >>> opt = torch.optim.Adam(model.param_groups(lr=0.005))
    >>> verts, faces = model.mesh()                                    # differentiable
    >>> loss = render_loss(verts, faces) + 1e4 * normal_consistency_loss(verts, faces)
    """

    def __init__(self, resolution: int = 64, bbox: float | Sequence | Tensor = 1.0, *,
                 sdf: Tensor | None = None, deformation: Tensor | None = None, device=None) -> None:
        super().__init__()
        grid, tets = tet_grid(resolution, bbox, device=device)
        box = normalize_bbox(bbox).to(device)
        self.resolution = resolution
        self.register_buffer("grid_verts", grid, persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        self.register_buffer("bbox", box)
        self.register_buffer("cell", (box[1] - box[0]) / resolution)
        self._edges: Tensor | None = None
        N = grid.shape[0]
        if sdf is None:
            sdf = sphere_sdf(0.5)(grid)
        sdf = torch.as_tensor(sdf, dtype=torch.float32, device=grid.device).reshape(-1)
        if sdf.shape[0] != N:
            raise UserError(f"sdf must hold one value per grid vertex ({N} at resolution {resolution}), "
                            f"got {sdf.shape[0]}")
        if not bool(torch.isfinite(sdf).all()):
            raise UserError("sdf contains NaN or Inf values; check the SDF function or field you initialise from")
        self.sdf = nn.Parameter(sdf.clone())
        d = torch.zeros(N, 3, device=grid.device) if deformation is None else torch.as_tensor(
            deformation, dtype=torch.float32, device=grid.device)
        if tuple(d.shape) != (N, 3):
            raise UserError(f"deformation must have shape [{N}, 3], got {tuple(d.shape)}")
        self.deformation = nn.Parameter(d.clone())

    # -------------------------------------------------------------------------------------- builders
    @classmethod
    def from_sdf(cls, fn: SdfFn | Tensor, resolution: int = 64, bbox: float | Sequence | Tensor = 1.0, *,
                 chunk: int = 262144, device=None) -> DMTet:
        """Initialise the SDF from a callable ``fn(points [N,3]) -> [N]`` (a NeuS field's SDF, an analytic
        shape; evaluated under ``no_grad`` in chunks of ``chunk`` points on the grid's device) or from a
        tensor of per-vertex values ordered like ``tet_grid(resolution, bbox)``'s vertices."""
        grid, _ = tet_grid(resolution, bbox, device=device)
        if isinstance(fn, Tensor):
            values = fn
        elif callable(fn):
            with torch.no_grad():
                parts = []
                for s in range(0, grid.shape[0], chunk):
                    out = fn(grid[s:s + chunk])
                    if not isinstance(out, Tensor):
                        raise UserError(f"the SDF function must return a tensor [N], got {type(out).__name__}")
                    parts.append(out.reshape(-1).float().to(grid.device))
                values = torch.cat(parts)
        else:
            raise UserError(f"from_sdf needs a callable fn(points [N,3]) -> [N] or a tensor, got {type(fn).__name__}")
        return cls(resolution, bbox, sdf=values, device=device)

    # -------------------------------------------------------------------------------------- geometry
    @property
    def edges(self) -> Tensor:
        """Unique grid edges ``[E,2]`` (cached), for ``sdf_sign_flip_loss``."""
        if self._edges is None or self._edges.device != self.tets.device:
            self._edges = tet_edges(self.tets)
        return self._edges

    def vertices(self) -> Tensor:
        """Deformed grid vertices ``grid + (cell / 2) tanh(deformation)`` ``[N,3]``."""
        return self.grid_verts + 0.5 * self.cell * torch.tanh(self.deformation)

    def mesh(self) -> tuple[Tensor, Tensor]:
        """The current surface ``(verts [M,3], faces [F,3])`` by ``marching_tetrahedra``; differentiable
        w.r.t. ``sdf`` and ``deformation``."""
        return marching_tetrahedra(self.vertices(), self.tets, self.sdf)

    def sdf_loss(self) -> Tensor:
        """``sdf_sign_flip_loss`` on this grid's edges."""
        return sdf_sign_flip_loss(self.sdf, self.edges)

    # ------------------------------------------------------------------------------------- optimiser
    def param_groups(self, lr: float = 0.005, *, lr_sdf: float | None = None,
                     lr_deformation: float | None = None) -> list[dict]:
        """Optimizer parameter groups ``[{"name": "sdf", ...}, {"name": "deformation", ...}]`` (default lr
        0.005: DreamCraft3D's DMTet stage; both groups share it unless given)."""
        return [
            {"params": [self.sdf], "lr": lr if lr_sdf is None else lr_sdf, "name": "sdf"},
            {"params": [self.deformation], "lr": lr if lr_deformation is None else lr_deformation,
             "name": "deformation"},
        ]

    def make_optimizer(self, lr: float = 0.005, **kw) -> torch.optim.Adam:
        """Adam over ``param_groups(lr, **kw)``."""
        return torch.optim.Adam(self.param_groups(lr, **kw))

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, verts={self.grid_verts.shape[0]}, tets={self.tets.shape[0]}"
