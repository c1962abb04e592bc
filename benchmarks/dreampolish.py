"""DreamPolish on ShapeWorld with fixed seeds; prints one JSON object.

For each prompt: G1-G3 (NeRF -> NeuS -> DMTet) once, ground-truth geometry of the DMTet mesh ("before
polish"), then G4 polishing from that artefact ("after polish"), then the texture stage three times from the
same polished geometry with the DSD, SDS and VSD presets (texture PSNR / saturation gap against the
reference renders at held-out views). Also the wall time of every stage. ``"headline"`` averages over the
prompts: ``chamfer_before_polish``, ``chamfer_after_polish``, ``normal_error_before_polish``,
``normal_error_after_polish``, ``dsd_psnr``, ``sds_psnr``, ``vsd_psnr`` (+ saturation gaps).

    python benchmarks/dreampolish.py --quick          # one prompt, CPU defaults (a few minutes)
    python benchmarks/dreampolish.py --prompts "a red cube" "a blue ball" --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.dreampolish import DreamPolishConfig
from methods import run
from studio.world.metrics import evaluate_mesh
from studio.world.objects import find_object_for_prompt

GEOM_KEYS = ("chamfer", "normal_error_deg", "iou")


def _geometry(prompt: str, run: Path, stage: str) -> dict:
    from studio.train.mesh_stage import load_mesh_state

    dmtet, _ = load_mesh_state(run / "stages" / f"{stage}.safetensors")
    v, f = dmtet.mesh()
    gt = evaluate_mesh(find_object_for_prompt(prompt), v.detach(), f, None, size=64, n_views=8)
    return {k: gt[k] for k in GEOM_KEYS}


def run_prompt(prompt: str, seed: int, out: Path, kw: dict) -> dict:
    run = out / prompt.replace(" ", "-")
    res: dict = {"stage_seconds": {}}
    t0 = time.perf_counter()
    m = run(DreamPolishConfig(prompt=prompt, seed=seed, skip_polish=True, skip_texture=True, **kw), "dreampolish",
                 out, progress=False)
    res["stage_seconds"].update(m["stage_seconds"])
    res["geometry"] = {"dmtet_before_polish": _geometry(prompt, run, "dmtet")}
    m = run(DreamPolishConfig(prompt=prompt, seed=seed, from_stage="polish", skip_texture=True, **kw),
                 "dreampolish", out, progress=False)
    res["stage_seconds"].update(m["stage_seconds"])
    res["normal_estimator"] = m.get("normal_estimator_used")
    res["geometry"]["after_polish"] = _geometry(prompt, run, "polish")
    res["texture"] = {}
    for preset in ("dsd", "sds", "vsd"):
        m = run(DreamPolishConfig(prompt=prompt, seed=seed, from_stage="texture", texture_preset=preset, **kw),
                     "dreampolish", out, progress=False)
        gt = m["ground_truth"]
        res["texture"][preset] = {"psnr": gt["psnr"], "saturation_gap": gt["saturation_gap"],
                                  "seconds": m["stage_seconds"]["texture"]}
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one prompt (a red cube)")
    ap.add_argument("--prompts", nargs="*", default=["a red cube", "a blue ball"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    prompts = ["a red cube"] if args.quick else args.prompts
    kw: dict = {}
    out = Path(args.out or tempfile.mkdtemp(prefix="dreampolish-bench-"))
    per = {p: run_prompt(p, args.seed, out, kw) for p in prompts}

    def mean(get) -> float:
        vals = [get(r) for r in per.values()]
        vals = [v for v in vals if v is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    head = {
        "chamfer_before_polish": mean(lambda r: r["geometry"]["dmtet_before_polish"]["chamfer"]),
        "chamfer_after_polish": mean(lambda r: r["geometry"]["after_polish"]["chamfer"]),
        "normal_error_before_polish": mean(lambda r: r["geometry"]["dmtet_before_polish"]["normal_error_deg"]),
        "normal_error_after_polish": mean(lambda r: r["geometry"]["after_polish"]["normal_error_deg"]),
        **{f"{p}_psnr": mean(lambda r, p=p: r["texture"][p]["psnr"]) for p in ("dsd", "sds", "vsd")},
        **{f"{p}_saturation_gap": mean(lambda r, p=p: r["texture"][p]["saturation_gap"]) for p in ("dsd", "sds", "vsd")},
    }
    result = {"benchmark": "dreampolish", "seed": args.seed, "prompts": prompts, "threads": os.environ.get(
        "OMP_NUM_THREADS"), "config": "DreamPolishConfig defaults", "headline": head, "per_prompt": per}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
