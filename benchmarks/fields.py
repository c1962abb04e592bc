"""Implicit-field speed: is the pure-torch hash grid worth a native kernel?

Prints one JSON object. Cases, all with the default field configuration (16 levels x 2 features,
``2^log2_hashmap_size`` entries, base resolution 16, hidden width 64, one hidden layer):

* ``encode_{torch,native}_*``: ``HashGridEncoding`` with ``backend="torch"`` / ``"native"`` (the C++ kernel,
  ``cuda_ext/cpu/hashgrid.cpp``) side by side on 64k random points: forward, forward + backward (to the
  table), and ``eikonal``: forward, d features / d points with create_graph, then the eikonal loss's
  backward (the NeuS double-backward path). ``encode_speedup_*`` = torch / native.
* ``mlp_*``: the NeRF density + colour MLPs on the same 64k encodings (forward, forward + backward),
  i.e. the rest of a field evaluation; ``encode_share_{torch,native}`` = encode / (encode + mlp), forward
  + backward.
* ``render_*``: ``render_field`` of one 64x64 image, 64 samples per ray, NeRF (blob init) with and without
  an ``OccupancyGrid`` (32^3, one update), and NeuS (sphere init, autograd normals) forward and forward +
  backward. ``*_evaluated`` is the fraction of samples the field was evaluated on. Renders use the
  fields' default encoding backend (``"auto"``: native on CPU when the extension builds),
  ``render_backend`` says which one ran.

Medians over repeats after one warm-up, milliseconds. The torch-only run (``encode_share`` ~0.93 on
CPU) is why the native kernel exists; if the extension cannot be built the ``native`` entries are null.

    python benchmarks/fields.py                    # log2_hashmap_size 15 and 19
    python benchmarks/fields.py --quick            # 15 only, fewer repeats
    python benchmarks/fields.py --quick --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(ts)


def run_case(log2_hashmap_size: int, repeats: int, size: int = 64, n_points: int = 65536) -> dict:
    import torch

    from studio.cameras import orbit_cameras
    from studio.render import OccupancyGrid, render_field
    from studio.students import NeRFField, NeuSField

    g = torch.Generator().manual_seed(0)
    nerf = NeRFField(log2_hashmap_size=log2_hashmap_size)
    neus = NeuSField(log2_hashmap_size=log2_hashmap_size)
    enc = nerf.encoding
    x = torch.rand(n_points, 3, generator=g)
    feats = enc(x).detach()

    from studio.students import _hashgrid_ext

    def encode_fwd():
        with torch.no_grad():
            enc(x)

    def encode_fwd_bwd():
        enc.zero_grad(set_to_none=True)
        enc(x).sum().backward()

    w_eik = torch.randn(enc.n_output_dims, generator=g)

    def encode_eikonal():
        enc.zero_grad(set_to_none=True)
        xg = x.detach().requires_grad_(True)
        s = enc(xg) @ w_eik
        grad = torch.autograd.grad(s, xg, torch.ones_like(s), create_graph=True)[0]
        ((grad.norm(dim=-1) - 1.0) ** 2).mean().backward()

    backends = ["torch"] + (["native"] if _hashgrid_ext.available() else [])
    enc_times: dict[str, dict[str, float | None]] = {}
    for b in ("torch", "native"):
        enc.backend = b
        run = b in backends
        enc_times[b] = {
            "fwd": _timed(encode_fwd, repeats) if run else None,
            "fwd_bwd": _timed(encode_fwd_bwd, repeats) if run else None,
            "eikonal": _timed(encode_eikonal, repeats) if run else None,
        }
    enc.backend = "auto"

    def mlp_fwd():
        with torch.no_grad():
            nerf.density_net(feats)
            nerf.color_net(feats)

    def mlp_fwd_bwd():
        nerf.zero_grad(set_to_none=True)
        (nerf.density_net(feats).sum() + nerf.color_net(feats).sum()).backward()

    cams = orbit_cameras(15.0, 30.0, 3.0, 40.0, size, size)
    grid = OccupancyGrid(nerf.bbox, 32)
    grid.update_from_field(0, nerf, step_size=2.0 / 64, force=True)
    stats: dict[str, float] = {}

    def render(field, occ=None, backward=False, key=None):
        def fn():
            field.zero_grad(set_to_none=True)
            if backward:
                out = render_field(field, cams, n_samples=64, occupancy_grid=occ)
                (out["rgb"].sum() + out["opacity"].sum()).backward()
            else:
                with torch.no_grad():
                    out = render_field(field, cams, n_samples=64, occupancy_grid=occ)
            if key:
                stats[key] = out["n_samples_evaluated"] / out["n_samples_total"]
        return fn

    mlp_fb = _timed(mlp_fwd_bwd, repeats)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    row: dict = {
        "log2_hashmap_size": log2_hashmap_size,
        "table_rows": int(enc.embeddings.shape[0]),
        "dense_levels": int(enc.dense_levels.sum()),
        "points": n_points,
        "native_available": "native" in backends,
    }
    for key in ("fwd", "fwd_bwd", "eikonal"):
        t, n = enc_times["torch"][key], enc_times["native"][key]
        row[f"encode_torch_{key}_ms"] = ms(t)
        row[f"encode_native_{key}_ms"] = ms(n)
        row[f"encode_speedup_{key}"] = None if n is None else round(t / n, 1)
    for b in ("torch", "native"):
        e = enc_times[b]["fwd_bwd"]
        row[f"encode_share_{b}"] = None if e is None else round(e / (e + mlp_fb), 3)
    return {
        **row,
        "mlp_fwd_ms": round(_timed(mlp_fwd, repeats), 1),
        "mlp_fwd_bwd_ms": round(mlp_fb, 1),
        "render_backend": "native" if "native" in backends else "torch",
        "image": f"{size}x{size}x64",
        "render_nerf_fwd_ms": round(_timed(render(nerf, key="nerf"), repeats), 1),
        "render_nerf_fwd_bwd_ms": round(_timed(render(nerf, backward=True), repeats), 1),
        "render_nerf_grid_fwd_ms": round(_timed(render(nerf, grid, key="nerf_grid"), repeats), 1),
        "render_nerf_grid_fwd_bwd_ms": round(_timed(render(nerf, grid, backward=True), repeats), 1),
        "render_neus_fwd_ms": round(_timed(render(neus, key="neus"), repeats), 1),
        "render_neus_fwd_bwd_ms": round(_timed(render(neus, backward=True), repeats), 1),
        **{f"{k}_evaluated": round(v, 3) for k, v in stats.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="log2_hashmap_size 15 only, 2 repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's)")
    args = ap.parse_args()
    import torch

    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    sizes = [15] if args.quick else [15, 19]
    repeats = 2 if args.quick else args.repeats
    rows = [run_case(s, repeats) for s in sizes]
    print(json.dumps({
        "benchmark": "fields",
        "torch": torch.__version__,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.machine(),
        "cases": rows,
    }))


if __name__ == "__main__":
    main()
