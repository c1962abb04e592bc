"""Batch text-to-3D: many prompts, resumable, one failure never stops the others.

Finished prompts (``out/<slug>/metrics.json`` exists) are skipped, so re-running a batch resumes it.
Under ``accelerate launch -m studio batch ...`` the prompts are sharded across processes (CPU with
gloo, or one GPU each); every process writes its results into the shared output folder, and the
main process prints the summary of all prompts once every process is done.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

from .errors import UserError
from .io import atomic_write_text
from .text_to_3d import TextTo3DConfig, generate, slugify


def read_prompts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file '{p}' not found; give a text file with one prompt per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file '{p}' is not UTF-8 text: {e}") from e
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"prompt file '{p}' holds no prompts; write one prompt per line (# starts a comment)")
    seen, unique = set(), []
    for q in prompts:
        if slugify(q) not in seen:
            seen.add(slugify(q))
            unique.append(q)
    return unique


def _distributed():
    """(rank, world_size, PartialState or None) under accelerate / torchrun, else (0, 1, None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import PartialState

    from .train.loop import _cpu_processes

    state = PartialState(cpu=_cpu_processes())  # CPU-only machines join the processes with gloo
    if state.device.type == "cpu":
        # Several processes on one machine: split the cores, or OpenMP threads thrash each other.
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
    return state.process_index, state.num_processes, state


def run_batch(prompts: list[str], base_cfg: TextTo3DConfig, method: str, out: str | Path, *, resume: bool = True,
              progress: bool = True) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world, state = _distributed()
    mine = prompts[rank::world]
    for prompt in mine:
        run_dir = out / slugify(prompt)
        done = run_dir / "metrics.json"
        if resume and done.exists():
            print(f"[rank {rank}] skip (done): {prompt}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        if world > 1:
            print(f"[rank {rank}/{world}] start: {prompt}", file=sys.stderr)
        try:
            cfg = dataclasses.replace(base_cfg, prompt=prompt)
            generate(cfg, method, out, resume=resume, progress=progress)
            (run_dir / "error.txt").unlink(missing_ok=True)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one failing prompt never stops the others
            run_dir.mkdir(parents=True, exist_ok=True)
            msg = f"{type(e).__name__}: {e}"
            atomic_write_text(run_dir / "error.txt", msg + "\n\n" + traceback.format_exc())
            print(f"[rank {rank}] FAILED after {time.perf_counter() - t0:.0f}s: {prompt}: {msg}", file=sys.stderr)
    if state is not None:
        state.wait_for_everyone()
    rows = summarize(prompts, out)
    if rank == 0:
        print(format_summary(rows))
        atomic_write_text(out / "batch_summary.json", json.dumps(rows, indent=2))
    return rows


def summarize(prompts: list[str], out: Path) -> list[dict]:
    rows = []
    for prompt in prompts:
        d = Path(out) / slugify(prompt)
        row: dict = {"prompt": prompt, "folder": str(d)}
        if (d / "metrics.json").exists():
            m = json.loads((d / "metrics.json").read_text())
            gt = m.get("ground_truth") or {}
            row.update(status="done", seconds=m.get("train_seconds"), psnr=gt.get("psnr"), iou=gt.get("iou"))
        elif (d / "error.txt").exists():
            row.update(status="failed", error=(d / "error.txt").read_text().splitlines()[0])
        else:
            row.update(status="missing")
        rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> str:
    def f(v, nd=2):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    w = max([len(r["prompt"]) for r in rows] + [6])
    lines = [f"{'prompt'.ljust(w)}  status  seconds   psnr    iou  note", "-" * (w + 40)]
    for r in rows:
        lines.append(f"{r['prompt'].ljust(w)}  {r['status']:<6}  {f(r.get('seconds'), 1):>7}  {f(r.get('psnr')):>5}  "
                     f"{f(r.get('iou')):>5}  {r.get('error', '')}")
    n_done = sum(r["status"] == "done" for r in rows)
    lines.append(f"{n_done}/{len(rows)} done, {sum(r['status'] == 'failed' for r in rows)} failed")
    return "\n".join(lines)
