"""The run skeleton, written once for every method and kind: :func:`execute`.

Order of events (each step's guarantee in brackets):

1. ``cfg`` is checked against ``method.Config``, every number in it must be finite, then ``method.validate`` and
   ``method.resolve`` [bad input gets one message naming the option; nothing is written yet].
2. The run folder: ``out/<slug of the input>/`` (``--out`` itself for methods without an input). Two prompts
   with one slug ("a blue ball", "A Blue Ball!") get distinct folders: the second one's name gains the first 8
   hex digits of its prompt's SHA-1, and a later run finds its folder again by the prompt recorded in
   ``config.yaml`` [no prompt ever writes into another prompt's folder].
3. An existing run in that folder is never replaced silently: with ``resume`` its ``config.yaml`` must equal the
   resolved config (else the differences are named); without ``resume`` a finished or checkpointed run is
   refused, naming ``--resume`` and ``--overwrite`` [a finished run is not lost]. ``--overwrite`` (or a config
   that continues the run from its own saved parts, ``Method.continues``: DreamPolish's ``--from-stage``)
   clears the old run's records, never the folder.
4. ``config.yaml`` (the resolved config and the method), then ``method.run`` with SIGTERM treated as Ctrl-C
   [``timeout``, ``docker stop`` and Slurm leave a checkpoint]. A run rejected with a ``UserError`` before any
   training removes the folder it created [no folder behind a rejected run].
5. ``metrics.json`` always: ``status`` ``done`` with the method's metrics, or ``interrupted`` / ``cancelled`` /
   ``diverged`` / ``failed`` with the reason and the last step's record [every run folder says how it ended].
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..io import atomic_write_text
from .protocol import Method, echo

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
#: how a run ended; ``metrics.json`` without a ``status`` (written before statuses existed) means ``done``
FINISHED = "done"


# -- plain values ------------------------------------------------------------------------------------
def plain(value):
    """A config as plain YAML / JSON values (dicts, lists, strings for paths)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_record(method: Method, cfg) -> dict:
    """What ``config.yaml`` holds: the method's name, then every resolved field."""
    return {"method": method.name, **plain(cfg)}


def check_numbers(cfg, prefix: str = "") -> None:
    """Every float of a (nested) config dataclass is finite; else a ``UserError`` naming the option."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        opt = f"{prefix}{f.name.replace('_', '-')}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            check_numbers(v, f"{opt}.")
            continue
        values = v if isinstance(v, (list, tuple)) else [v]
        for x in values:
            if isinstance(x, float) and not math.isfinite(x):
                raise UserError(f"--{opt} must be a finite number, got {x}")


# -- run folders -------------------------------------------------------------------------------------
def read_config(run_dir: Path) -> dict | None:
    p = Path(run_dir) / CONFIG_FILE
    if not p.is_file():
        return None
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return d if isinstance(d, dict) else None


def read_metrics(run_dir: Path) -> dict | None:
    p = Path(run_dir) / METRICS_FILE
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def run_status(run_dir: Path) -> str:
    """``new`` (no run here), ``done``, ``interrupted``, ``cancelled``, ``diverged``, ``failed`` or ``unfinished``
    (a config but no metrics: killed hard)."""
    run_dir = Path(run_dir)
    if read_config(run_dir) is None:
        return "new"
    m = read_metrics(run_dir)
    if m is None:
        return "unfinished"
    return str(m.get("status", FINISHED))


def run_folder(out: Path, method: Method, cfg) -> Path:
    """The folder of this run under ``out`` (module doc, step 2)."""
    out = Path(out)
    name = method.run_name(cfg)
    if not name:
        return out
    key = str(getattr(cfg, method.input)) if method.input else ""
    candidates = [out / name, out / f"{name}-{hashlib.sha1(key.encode('utf-8', 'replace')).hexdigest()[:8]}"]
    for c in candidates:  # this input's own folder from an earlier run
        cfg_old = read_config(c)
        if cfg_old is not None and str(cfg_old.get(method.input)) == key:
            return c
    for c in candidates:  # else the first one that holds no other run
        if read_config(c) is None:
            return c
    return candidates[-1]


def config_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every differing (nested) entry."""
    diffs: list[str] = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in list(a) + [k for k in b if k not in a]:
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        elif (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            diffs.append(f"{path}: {echo(a, 40)} -> {echo(b, 40)}")

    walk(old, new, "")
    return diffs


def claim(run_dir: Path, record: dict, *, resume: bool, overwrite: bool, continues: bool = False) -> None:
    """Refuse to replace or mis-resume the run already in ``run_dir`` (module doc, step 3). ``continues``: the
    config asks to build on this run's own saved parts (``Method.continues``), which replaces its later results
    by request."""
    old = read_config(run_dir)
    if old is None or overwrite or (continues and not resume):
        return
    status = run_status(run_dir)
    has_ckpt = (Path(run_dir) / "checkpoints").is_dir()
    diffs = config_differences(old, record)
    if resume and diffs:
        raise UserError(f"--resume: the run in {run_dir} was made with other options ({'; '.join(diffs[:8])}); "
                        "resume with the options of that run, choose another --out, or pass --overwrite to start "
                        "fresh")
    if not resume and (status == FINISHED or has_ckpt):
        what = "a finished run" if status == FINISHED else f"an {status} run with a checkpoint"
        raise UserError(f"{run_dir} already holds {what}; pass --resume to continue it, --overwrite to replace it, "
                        "or choose another --out")


def clear_run_records(run_dir: Path) -> None:
    """Before a run replaces the one in ``run_dir``: remove the old run's records (config, metrics, history,
    checkpoints, previews). Only files the skeleton and the Trainer write are removed, never the folder (with
    ``--out DIR`` as the run folder it may hold the user's own files); artefacts are overwritten by the run."""
    for name in (CONFIG_FILE, METRICS_FILE, HISTORY_FILE):
        (Path(run_dir) / name).unlink(missing_ok=True)
    for name in ("checkpoints", "previews"):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder '{run_dir}': {e.strerror or e}; choose another --out") from e


# -- the skeleton ------------------------------------------------------------------------------------
def prepare(method: Method, cfg):
    """Steps 1 of :func:`execute`: the checked, resolved config (raises ``UserError``)."""
    if not isinstance(cfg, method.Config):
        raise UserError(f"method {method.name!r} needs a {method.Config.__name__} config, got {type(cfg).__name__}")
    check_numbers(cfg)
    method.validate(cfg)
    resolved = method.resolve(cfg)
    check_numbers(resolved)
    return resolved


def execute(method: Method, cfg, out: str | Path = "outputs", *, resume: bool = False, overwrite: bool = False,
            callbacks=None, progress: bool = True) -> dict:
    """Run ``method`` on ``cfg`` into ``out`` (module doc); returns the metrics (also ``metrics.json``)."""
    from ..train.loop import TrainingCancelled, TrainingDiverged, sigterm_as_interrupt

    resolved = prepare(method, cfg)
    run_dir = run_folder(Path(out), method, resolved)
    record = config_record(method, resolved)
    claim(run_dir, record, resume=resume, overwrite=overwrite, continues=method.continues(resolved))
    if (overwrite or method.continues(resolved)) and not resume and read_config(run_dir) is not None:
        clear_run_records(run_dir)
    created = not run_dir.exists()
    make_run_dir(run_dir)
    steps: list[dict] = []
    callbacks = [lambda rec: steps.append({k: v for k, v in rec.items() if k != "stage_obj"}) and None,
                 *(callbacks or [])]
    t0 = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
            metrics = method.run(resolved, run_dir, callbacks=callbacks, resume=resume, progress=progress)
    except (KeyboardInterrupt, TrainingCancelled, TrainingDiverged, Exception) as e:
        if isinstance(e, UserError) and created and not steps:  # rejected before any training: no folder
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        status = ("interrupted" if isinstance(e, KeyboardInterrupt) else "cancelled" if isinstance(e, TrainingCancelled)
                  else "diverged" if isinstance(e, TrainingDiverged) else "failed")
        _write_metrics(run_dir, {"status": status, "method": method.name, "reason": str(e) or type(e).__name__,
                                 "seconds": round(time.perf_counter() - t0, 2),
                                 "train_seconds": getattr(e, "train_seconds", None),
                                 "last_step": steps[-1] if steps else None})
        raise
    metrics = {"status": FINISHED, "method": method.name, **metrics, "run_dir": str(run_dir)}
    _write_metrics(run_dir, metrics)
    return metrics


def _write_metrics(run_dir: Path, metrics: dict) -> None:
    atomic_write_text(Path(run_dir) / METRICS_FILE, json.dumps(metrics, indent=2, default=str))


# -- training, for kinds that train stages -----------------------------------------------------------
def train_stages(stages: list, run_dir: Path, *, seed: int, callbacks=None, resume: bool = False,
                 progress: bool = True, **trainer_options: Any) -> tuple[list[dict], float]:
    """Run ``stages`` with the one :class:`~studio.train.loop.Trainer` into ``run_dir``; writes ``history.json``;
    returns ``(history, train_seconds)`` (seconds summed over every resumed segment)."""
    from ..train.loop import Trainer, TrainerConfig

    trainer = Trainer(TrainerConfig(out_dir=Path(run_dir), seed=seed, progress=progress, **trainer_options),
                      callbacks=callbacks)
    try:
        history = trainer.run(stages, resume=resume)
    except BaseException as e:
        e.train_seconds = float(trainer.train_seconds)  # the skeleton records it for an unfinished run
        raise
    finally:
        atomic_write_text(Path(run_dir) / HISTORY_FILE, json.dumps(trainer.history, default=str))
    return history, float(trainer.train_seconds)
