"""Mesh rasterizer speed: ``native`` (our C++/OpenMP kernel) vs the dense ``torch`` twin, same inputs.

Prints one JSON object. Scene: an icosphere (trimesh) seen by one camera at radius 3, 40 deg FoV;
``render_mesh`` with interpolated vertex colours, vertex normals and silhouette antialiasing, so every
stage runs; "fwd_bwd" adds the backward of ``rgb.sum() + alpha.sum() + normal.sum()`` to the vertices
and colours. ``raster_fwd`` times ``rasterize_mesh`` alone. Medians over repeats after one warm-up,
milliseconds per frame. The torch twin tests every pixel against every face (chunked), so it is
quadratic by design; it is the reference, not a renderer.

    python benchmarks/mesh_render.py            # icosphere subdivisions {3, 4} x {64, 128}^2
    python benchmarks/mesh_render.py --quick    # one case (subdivision 3, 64^2)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up (extension load, allocator)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(ts)


def run_case(backend: str, subdiv: int, size: int, repeats: int) -> dict:
    import torch
    import trimesh

    from studio.cameras import orbit_cameras
    from studio.render import (
        mesh_edge_topology,
        rasterize_mesh,
        render_mesh,
        resolve_mesh_backend,
    )

    m = trimesh.creation.icosphere(subdivisions=subdiv)
    verts = torch.tensor(m.vertices, dtype=torch.float32)
    faces = torch.tensor(m.faces, dtype=torch.long)
    colors = torch.rand(verts.shape[0], 3, generator=torch.Generator().manual_seed(0))
    cams = orbit_cameras(20.0, 30.0, 3.0, 40.0, size, size)
    topo = mesh_edge_topology(faces)

    def raster():
        with torch.no_grad():
            rasterize_mesh(verts, faces, cams.viewmats, cams.Ks, size, size, backend=backend)

    def fwd():
        with torch.no_grad():
            render_mesh(verts, faces, cams, vertex_colors=colors, backend=backend, topology=topo)

    def fwd_bwd():
        v = verts.clone().requires_grad_(True)
        c = colors.clone().requires_grad_(True)
        out = render_mesh(v, faces, cams, vertex_colors=c, backend=backend, topology=topo)
        (out["rgb"].sum() + out["alpha"].sum() + out["normal"].sum()).backward()

    return {
        "backend": resolve_mesh_backend(backend, torch.device("cpu")),
        "faces": int(faces.shape[0]),
        "size": size,
        "raster_fwd_ms": round(_timed(raster, repeats), 2),
        "render_fwd_ms": round(_timed(fwd, repeats), 2),
        "render_fwd_bwd_ms": round(_timed(fwd_bwd, repeats), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only subdivision 3 at 64x64")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    cases = [(3, 64)] if args.quick else [(3, 64), (3, 128), (4, 64), (4, 128)]
    rows = []
    for subdiv, size in cases:
        nat = run_case("native", subdiv, size, args.repeats)
        ref = run_case("torch", subdiv, size, args.repeats)
        rows.append({
            "faces": nat["faces"], "size": size, "native_backend": nat["backend"],
            **{f"native_{k}": v for k, v in nat.items() if k.endswith("_ms")},
            **{f"torch_{k}": v for k, v in ref.items() if k.endswith("_ms")},
            "raster_speedup": round(ref["raster_fwd_ms"] / max(nat["raster_fwd_ms"], 1e-6), 1),
        })
    print(json.dumps({
        "benchmark": "mesh_render",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.machine(),
        "cases": rows,
    }))


if __name__ == "__main__":
    main()
