"""Batch: one method over many prompts, resumable; one failing prompt never stops the others.

Every method whose ``input`` is ``"prompt"`` runs in batch (text to 3D, video generation, plugins alike): each
line of the prompt file becomes one run of the run skeleton (:func:`studio.runs.skeleton.execute`) in its own
folder (distinct prompts get distinct folders, even when their slugs coincide). A prompt whose folder holds a
finished run *of the same resolved config* is skipped, so re-running a batch resumes it; a finished run made with
other options is reported as failed with the differences named (``--overwrite`` replaces it). Under
``accelerate launch -m studio batch ...`` the prompts are sharded across processes (CPU with gloo, or one GPU
each); every process writes into the shared output folder, and the main process prints the summary of all
prompts once every process is done (also written to ``batch_summary.json``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_text
from .protocol import Method, echo
from .skeleton import FINISHED, claim, config_record, prepare, read_metrics, run_folder, run_status, execute


def read_prompts(path: str | Path) -> tuple[list[str], list[dict]]:
    """``(prompts, skipped)`` of a prompt file: one prompt per line, blank lines and ``# comments`` dropped,
    exact duplicates once; a line that is not UTF-8 is skipped as a failed row (``skipped``), not fatal."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file '{p}' not found; give a text file with one prompt per line")
    prompts, skipped, seen = [], [], set()
    for i, raw in enumerate(p.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            skipped.append({"prompt": f"<line {i}>", "folder": "", "status": "failed",
                            "error": f"line {i} of {p} is not UTF-8 text; save the file as UTF-8"})
            continue
        if line and not line.startswith("#") and line not in seen:
            seen.add(line)
            prompts.append(line)
    if not prompts and not skipped:
        raise UserError(f"prompt file '{p}' holds no prompts; write one prompt per line (# starts a comment)")
    return prompts, skipped


def _distributed():
    """(rank, world_size, PartialState or None) under accelerate / torchrun, else (0, 1, None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from ..train.loop import partial_state

    state = partial_state()  # CPU-only machines join the processes with gloo
    if state.device.type == "cpu":
        # Several processes on one machine: split the cores, or OpenMP threads thrash each other.
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
    return state.process_index, state.num_processes, state


def run_batch(prompts: list[str], base_cfg, method: Method, out: str | Path, *, resume: bool = True,
              overwrite: bool = False, progress: bool = True, skipped: list[dict] | None = None) -> list[dict]:
    """Run ``method`` for every prompt (module doc); returns the summary rows."""
    if method.input != "prompt":
        raise UserError(f"method {method.name!r} does not take a prompt; studio batch runs methods whose input is "
                        "a prompt")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world, state = _distributed()
    errors: dict[str, str] = {}
    for prompt in prompts[rank::world]:
        t0 = time.perf_counter()
        try:
            cfg = dataclasses.replace(base_cfg, **{method.input: prompt})
            resolved = prepare(method, cfg)
            run_dir = run_folder(out, method, resolved)
            if resume and run_status(run_dir) == FINISHED:
                claim(run_dir, config_record(method, resolved), resume=True, overwrite=overwrite)
                if not overwrite:
                    print(f"[rank {rank}] skip (done): {prompt}", file=sys.stderr)
                    continue
            if world > 1:
                print(f"[rank {rank}/{world}] start: {prompt}", file=sys.stderr)
            execute(method, cfg, out, resume=resume, overwrite=overwrite, progress=progress)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one failing prompt never stops the others
            msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            errors[prompt] = msg
            if not isinstance(e, UserError):
                traceback.print_exc()
            print(f"[rank {rank}] FAILED after {time.perf_counter() - t0:.0f}s: {echo(prompt)}: {msg}",
                  file=sys.stderr)
    if state is not None:
        state.wait_for_everyone()
    rows = list(skipped or []) + summarize(prompts, out, method, base_cfg, errors)
    if rank == 0:
        print(format_summary(rows))
        atomic_write_text(out / "batch_summary.json", json.dumps(rows, indent=2))
    return rows


def summarize(prompts: list[str], out: Path, method: Method, base_cfg, errors: dict[str, str] | None = None) -> list[dict]:
    """One row per prompt: its folder, status (``done``, ``failed``, ``interrupted``, ``missing``...) and the
    headline numbers of its ``metrics.json``."""
    errors = errors or {}
    rows = []
    for prompt in prompts:
        row: dict = {"prompt": prompt}
        try:
            d = run_folder(Path(out), method, method.resolve(dataclasses.replace(base_cfg, **{method.input: prompt})))
        except Exception:  # noqa: BLE001 - a prompt the method rejects has no folder
            d = None
        row["folder"] = str(d) if d is not None and d.exists() else ""
        m = read_metrics(d) if d is not None else None
        status = run_status(d) if d is not None else "new"
        if prompt in errors:
            row.update(status="failed", error=errors[prompt].splitlines()[0] if errors[prompt] else "")
        elif m is not None:
            gt = m.get("ground_truth") or {}
            row.update(status=m.get("status", FINISHED), seconds=m.get("train_seconds", m.get("seconds")),
                       psnr=gt.get("psnr"), iou=gt.get("iou"))
            if m.get("reason"):
                row["error"] = str(m["reason"]).splitlines()[0]
        else:
            row.update(status="missing" if status == "new" else status)
        rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> str:
    def f(v, nd=2):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    shown = [echo(r["prompt"], 60).strip("'\"") for r in rows]
    w = max([len(s) for s in shown] + [6])
    lines = [f"{'prompt'.ljust(w)}  status  seconds   psnr    iou  note", "-" * (w + 40)]
    for s, r in zip(shown, rows):
        lines.append(f"{s.ljust(w)}  {r['status']:<6}  {f(r.get('seconds'), 1):>7}  {f(r.get('psnr')):>5}  "
                     f"{f(r.get('iou')):>5}  {r.get('error', '')}")
    n_done = sum(r["status"] == FINISHED for r in rows)
    lines.append(f"{n_done}/{len(rows)} done, {sum(r['status'] == 'failed' for r in rows)} failed")
    return "\n".join(lines)
