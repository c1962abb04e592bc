"""The app's logic without any UI: settings, the methods grouped into tabs by kind, jobs (every kind through the
one run skeleton) in worker threads with a shared concurrency limit and clean cancel, model resolution (models
folder only; student folders also from the output folder), upload checks, the gallery of past runs and result
formatting by artefact type. ``studio/app/ui.py`` wires it to Gradio widgets.
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import UserError

#: config fields that name a model (a registered name, a Hugging Face id or a local folder): resolved by the app
MODEL_FIELDS = ("teacher", "model", "texture_teacher", "lora_base")
#: files a run folder may hold that the app offers for download (in this order), besides other top-level files
ARTEFACT_ORDER = ("model.ply", "model.splat", "model.glb", "model.obj", "turntable.mp4", "preview.png",
                  "config.yaml", "metrics.json", "history.json", "error.txt")
VIEWER_ORDER = ("model.glb", "model.ply", "model.splat", "model.obj", "model.gltf", "model.stl")
VIDEO_ORDER = ("turntable.mp4", "video.mp4")
MAX_UPLOAD_BYTES = 1_000_000
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class AppSettings:
    out: Path = Path("outputs/app")
    models_dir: Path = Path("models")
    concurrency: int = 1
    max_steps: int = 20000
    max_batch_prompts: int = 200

    def __post_init__(self):
        self.out = Path(self.out).expanduser().resolve()
        self.models_dir = Path(self.models_dir).expanduser().resolve()
        if self.concurrency < 1:
            raise UserError(f"--concurrency must be >= 1, got {self.concurrency}")


# -- methods ---------------------------------------------------------------------------------------
def methods_by_kind() -> dict[str, list[type]]:
    """Registered methods grouped by ``kind`` (each group sorted by name), kinds in order of their first method's
    name; a plugin that fails to load is reported, not fatal."""
    from methods.registry import method_classes

    groups: dict[str, list[type]] = {}
    for cls in method_classes():
        groups.setdefault(cls.kind, []).append(cls)
    return groups


def kind_title(classes: list[type]) -> str:
    return next((c.kind_title for c in classes if c.kind_title), classes[0].kind)


def method_markdown(cls: type) -> str:
    paper = getattr(cls, "paper", "")
    link = f" · [paper]({paper})" if paper else ""
    return f"**{cls.name}**: {getattr(cls, 'description', '') or ''}{link}"


def run_method(method: str, cfg, out: Path, *, callbacks) -> dict:
    """Run one job of ``method`` through the run skeleton (callbacks returning False cancel it)."""
    from methods.registry import get_method

    from ..runs.skeleton import execute

    return execute(get_method(method)(), cfg, out, callbacks=callbacks, progress=False)


def validate_config(method: str, cfg, settings: AppSettings) -> None:
    """The library's own checks (same messages as the CLI), plus the app's step limit."""
    from methods.registry import get_method

    from ..runs.skeleton import prepare

    prepare(get_method(method)(), cfg)
    steps = getattr(cfg, "steps", None)
    if isinstance(steps, int) and steps > settings.max_steps:
        raise UserError(f"steps must be at most {settings.max_steps} in the app (got {steps}); "
                        "start the app with a larger --max-steps or use the CLI")


def resolve_models(cfg, settings: AppSettings):
    """``cfg`` with every model field (:data:`MODEL_FIELDS`) resolved by :func:`resolve_teacher`; a ``model``
    field may also name a distilled student folder inside the output folder."""
    from ..runs.video_generate import is_student_folder

    for name in MODEL_FIELDS:
        value = getattr(cfg, name, None)
        if not isinstance(value, str) or not value.strip():
            continue
        if name == "model" and is_student_folder(value) and _inside(Path(value), settings.out):
            continue
        setattr(cfg, name, resolve_teacher(value, settings))
    _check_paths(cfg, settings)
    return cfg


def _looks_like_path(value: str) -> bool:
    expanded = Path(os.path.expanduser(value))
    return (expanded.is_absolute() or value.startswith((".", "~")) or "\\" in value
            or ".." in Path(value).parts or expanded.exists())


def _check_paths(cfg, settings: AppSettings, prefix: str = "") -> None:
    """Every other text field of ``cfg`` (and of its nested configs) that names a file or folder -- a kind's input
    (an image to edit, a video to lift to 4D), a reward / process-reward / inpainting / depth model, a concept
    folder -- must lie inside the models folder or the output folder: the browser cannot make the app read any
    other file on the server. Names (registered teachers, ShapeWorld scenes and concepts, hub ids) pass."""
    import dataclasses

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name, None)
        if dataclasses.is_dataclass(value):
            _check_paths(value, settings, f"{prefix}{f.name}.")
            continue
        if f.name in MODEL_FIELDS or not isinstance(value, str) or not value.strip():
            continue
        value = value.strip()
        if not _looks_like_path(value):
            continue
        full = Path(os.path.expanduser(value))
        full = full if full.is_absolute() else Path.cwd() / full
        if not (_inside(full, settings.models_dir) or _inside(full, settings.out)):
            raise UserError(f"{prefix}{f.name} '{value}' is outside the models folder {settings.models_dir} and the "
                            f"output folder {settings.out}; the app reads local files only from there (copy the "
                            f"file into the models folder, or start the app with --models-dir), or use the CLI")


# -- teachers ----------------------------------------------------------------------------------------
def teacher_choices(settings: AppSettings) -> list[str]:
    """Registered teachers, then model folders found in the models folder."""
    from ..teachers.registry import list_teachers

    names = list(list_teachers())
    if settings.models_dir.is_dir():
        for d in sorted(settings.models_dir.iterdir()):
            if d.is_dir() and (d / "model_index.json").exists():
                names.append(str(d))
    return names


def teacher_markdown(name: str) -> str:
    from ..teachers.registry import list_teachers

    desc = list_teachers().get((name or "").strip().lower())
    if desc:
        return f"*{desc}*"
    return "*a Hugging Face id (owner/name) or a model folder inside the models folder*"


def _inside(path: Path, root: Path) -> bool:
    """``path`` lies in ``root`` by its name (``..`` collapsed, symlinks not followed: an administrator may link
    a model into the models folder, as its message suggests)."""
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
        return True
    except ValueError:
        return False


def resolve_teacher(name: str, settings: AppSettings) -> str:
    """A teacher name the app accepts: a registered name, a Hugging Face id ``owner/name``, or a folder
    inside ``settings.models_dir`` (given relative to it or as a path resolving inside it)."""
    from ..teachers.registry import list_teachers, load_teacher

    name = (name or "").strip()
    if not name:
        load_teacher(name)  # the registry's own message for an empty teacher
    if name.lower() in list_teachers():
        return name
    models = settings.models_dir
    expanded = Path(os.path.expanduser(name))
    looks_like_path = (expanded.is_absolute() or name.startswith((".", "~")) or "\\" in name
                       or ".." in Path(name).parts or expanded.exists())
    if not expanded.is_absolute() and (models / name).exists() and not looks_like_path:
        candidate = models / name
    elif looks_like_path:
        candidate = expanded if expanded.is_absolute() else (Path.cwd() / expanded)
    elif HUB_ID.match(name):
        return name
    else:
        load_teacher(name)  # raises the registry's "unknown teacher ... registered teachers are ..." message
        return name
    if not _inside(candidate, models):
        raise UserError(f"teacher path '{name}' is outside the models folder {models}; the app loads local "
                        f"models only from there (copy or link the model into it, or start the app with "
                        f"--models-dir), or give a registered name or a Hugging Face id such as "
                        f"stabilityai/stable-diffusion-2-1-base")
    return os.path.abspath(candidate)


# -- uploads -----------------------------------------------------------------------------------------
def parse_prompt_text(text: str) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments skipped; exact duplicates dropped (prompts that differ
    only in case or punctuation are distinct runs with distinct folders)."""
    seen, out = set(), []
    for ln in (text or "").splitlines():
        q = ln.strip()
        if q and not q.startswith("#") and q not in seen:
            seen.add(q)
            out.append(q)
    return out


def read_prompt_upload(path: str | Path) -> str:
    """Text of an uploaded prompt list: a .txt file of at most 1 MB of UTF-8 text."""
    p = Path(path)
    if p.suffix.lower() != ".txt":
        raise UserError(f"upload '{p.name}' is not a .txt file; upload a plain text file with one prompt per line")
    size = p.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise UserError(f"upload '{p.name}' is {size / 1e6:.1f} MB; prompt files may be at most 1 MB")
    data = p.read_bytes()
    if b"\x00" in data:
        raise UserError(f"upload '{p.name}' is not text (it holds binary data); upload a plain text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"upload '{p.name}' is not UTF-8 text; save it as UTF-8 and upload it again") from None


# -- jobs --------------------------------------------------------------------------------------------
class Slots:
    """The app-wide limit on concurrent training jobs (single runs and batch prompts alike)."""

    def __init__(self, n: int):
        self.n = n
        self._sem = threading.Semaphore(n)
        self._lock = threading.Lock()
        self.busy = 0

    def acquire(self, cancelled: threading.Event, on_wait: Callable[[], None] | None = None) -> bool:
        waited = False
        while not self._sem.acquire(timeout=0.2):
            if cancelled.is_set():
                return False
            if not waited and on_wait is not None:
                on_wait()
                waited = True
        with self._lock:
            self.busy += 1
        return True

    def release(self) -> None:
        with self._lock:
            self.busy -= 1
        self._sem.release()


def _stamp(method: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{method}-{uuid.uuid4().hex[:4]}"


class RunJob:
    """One run in a worker thread. Events on ``events``: ("waiting", None), ("step", record),
    ("done", metrics), ("cancelled", message), ("error", message). ``run_dir``: the run's folder, known once
    it is done (``metrics["run_dir"]``)."""

    def __init__(self, method: str, cfg, out_root: Path, slots: Slots, *,
                 runner: Callable[..., dict] | None = None, on_step: Callable[[dict], None] | None = None):
        self.method, self.cfg, self.slots, self.runner = method, cfg, slots, runner
        self.out_root = Path(out_root)
        self.run_dir: Path | None = None
        self.events: queue.Queue = queue.Queue()
        self.cancel_event = threading.Event()
        self.on_step = on_step
        self.result: tuple[str, Any] | None = None
        self.thread = threading.Thread(target=self._target, name=f"studio-run-{method}", daemon=True)

    def start(self) -> "RunJob":
        self.thread.start()
        return self

    def cancel(self) -> None:
        """Stop after the current training step (the run keeps a checkpoint and an ``interrupted`` record)."""
        self.cancel_event.set()

    @property
    def running(self) -> bool:
        """Started and without an outcome yet (the outcome is set before the final event is posted)."""
        return self.thread.ident is not None and self.result is None

    def _callback(self, rec: dict):
        rec = {k: v for k, v in rec.items() if k != "stage_obj"}
        self.events.put(("step", rec))
        if self.on_step is not None:
            self.on_step(rec)
        return not self.cancel_event.is_set()

    def _finish(self, outcome: str, data: Any) -> None:
        if outcome == "done" and isinstance(data, dict) and data.get("run_dir"):
            self.run_dir = Path(data["run_dir"])
        self.result = (outcome, data)
        self.events.put((outcome, data))

    def _target(self) -> None:
        if not self.slots.acquire(self.cancel_event, on_wait=lambda: self.events.put(("waiting", None))):
            self._finish("cancelled", "cancelled before it started")
            return
        try:
            outcome = self._run()
        finally:
            self.slots.release()  # before the final event, so the next job can start right away
        self._finish(*outcome)

    def _run(self) -> tuple[str, Any]:
        from ..train.loop import TrainingCancelled

        if self.cancel_event.is_set():
            return "cancelled", "cancelled before it started"
        try:
            runner = self.runner or run_method  # looked up at run time (tests swap it)
            return "done", runner(self.method, self.cfg, self.out_root, callbacks=[self._callback])
        except TrainingCancelled as e:
            return "cancelled", str(e)
        except (UserError, ValueError, FileNotFoundError) as e:
            return "error", str(e)
        except Exception as e:  # noqa: BLE001 - the app must stay usable; the traceback goes to the log
            traceback.print_exc()
            return "error", f"{type(e).__name__}: {e}"


class JobManager:
    """Jobs of the app: one running single run per browser session (for Cancel) and background batches."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.slots = Slots(settings.concurrency)
        self.runs: dict[str, RunJob] = {}
        self.batches: list[BatchJob] = []
        self._lock = threading.Lock()

    def start_run(self, session: str, method: str, cfg, **kw) -> RunJob:
        out_root = self.settings.out / _stamp(method)
        job = RunJob(method, cfg, out_root, self.slots, **kw)
        with self._lock:
            old = self.runs.get(session)
            if old is not None and old.running:
                raise UserError("a run of this page is still going; cancel it or wait for it to finish")
            self.runs[session] = job
        return job.start()

    def cancel_run(self, session: str) -> bool:
        job = self.runs.get(session)
        if job is None or not job.running:
            return False
        job.cancel()
        return True

    def start_batch(self, method: str, base_cfg, prompts: list[str]) -> "BatchJob":
        with self._lock:
            if any(b.running for b in self.batches):
                raise UserError("a batch is already running; cancel it or wait for it to finish")
            job = BatchJob(method, base_cfg, prompts, self.settings.out / ("batch-" + _stamp(method)), self.slots)
            self.batches.append(job)
        return job.start()

    def latest_batch(self) -> "BatchJob | None":
        return self.batches[-1] if self.batches else None


class BatchJob:
    """Prompts one after another in a background thread; one failing prompt never stops the others."""

    def __init__(self, method: str, base_cfg, prompts: list[str], out_root: Path, slots: Slots):
        self.method, self.base_cfg, self.prompts = method, base_cfg, list(prompts)
        self.out_root, self.slots = Path(out_root), slots
        self.rows = [{"prompt": p, "status": "queued", "progress": "", "seconds": None, "psnr": None, "iou": None,
                      "message": "", "folder": ""} for p in self.prompts]
        self.cancel_event = threading.Event()
        self.current: RunJob | None = None
        self.zip_path: Path | None = None
        self.thread = threading.Thread(target=self._target, name="studio-batch", daemon=True)

    def start(self) -> "BatchJob":
        self.thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def cancel(self) -> None:
        self.cancel_event.set()
        if self.current is not None:
            self.current.cancel()

    def _target(self) -> None:
        from methods.registry import get_method

        self.out_root.mkdir(parents=True, exist_ok=True)
        m = get_method(self.method)()
        errors: dict[str, str] = {}
        for row in self.rows:
            if self.cancel_event.is_set():
                row.update(status="cancelled", message="batch cancelled")
                continue
            cfg = dataclasses.replace(self.base_cfg, **{m.input: row["prompt"]})
            row["status"] = "waiting"

            def on_step(rec, row=row):
                row.update(status="running", progress=f"{rec['step']}/{rec['steps']} ({rec['it_s']:.2f} it/s)")

            job = RunJob(self.method, cfg, self.out_root, self.slots, on_step=on_step)
            self.current = job
            if self.cancel_event.is_set():
                job.cancel()
            t0 = time.perf_counter()
            job.start()
            job.thread.join()
            outcome, data = job.result or ("error", "no result")
            row["seconds"] = round(time.perf_counter() - t0, 1)
            if outcome == "done":
                gt = (data or {}).get("ground_truth") or {}
                row.update(status="done", psnr=_round(gt.get("psnr")), iou=_round(gt.get("iou"), 3), message="",
                           folder=str(job.run_dir or ""))
            else:
                row.update(status="cancelled" if outcome == "cancelled" else "failed", message=str(data))
                errors[row["prompt"]] = str(data)
        self.current = None
        try:
            from ..io import atomic_write_text
            from ..runs.batch import summarize

            atomic_write_text(self.out_root / "batch_summary.json",
                              json.dumps(summarize(self.prompts, self.out_root, m, self.base_cfg, errors), indent=2))
            self.zip_path = make_results_zip(self.out_root)
        except OSError as e:
            print(f"warning: batch summary / zip failed: {e}", file=sys.stderr)

    def table(self) -> list[list]:
        return [[r["prompt"], r["status"], r["progress"], r["seconds"], r["psnr"], r["iou"], r["message"]]
                for r in self.rows]

    def result_files(self) -> list[str]:
        files = [str(self.zip_path)] if self.zip_path and self.zip_path.exists() else []
        for r in self.rows:
            if r["status"] == "done" and r["folder"]:
                files += [f for f in artefacts(Path(r["folder"])) if f.endswith((".ply", ".glb", ".mp4"))]
        return files

    def summary(self) -> str:
        n = len(self.rows)
        counts = {s: sum(r["status"] == s for r in self.rows) for s in ("done", "failed", "cancelled")}
        state = "running" if self.running else "finished"
        return (f"Batch {state}: {counts['done']}/{n} done, {counts['failed']} failed"
                + (f", {counts['cancelled']} cancelled" if counts["cancelled"] else "") + f" · `{self.out_root}`")


def _round(v, nd=2):
    return None if v is None else round(float(v), nd)


def make_results_zip(folder: Path) -> Path:
    """``<folder>/results.zip`` of every run's artefacts (no checkpoints or previews)."""
    import zipfile

    folder = Path(folder)
    target = folder / "results.zip"
    tmp = folder / ".results.zip.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            rel = f.relative_to(folder)
            if (f.is_file() and f != tmp and f.name != "results.zip"
                    and not any(part in ("checkpoints", "previews", "viewer") or part.startswith(".")
                                for part in rel.parts)):
                z.write(f, rel.as_posix())
    os.replace(tmp, target)
    return target


# -- results and the gallery -------------------------------------------------------------------------
def artefacts(run_dir: Path) -> list[str]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    files = [p for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    rank = {n: i for i, n in enumerate(ARTEFACT_ORDER)}
    files.sort(key=lambda p: (rank.get(p.name, len(rank)), p.name))
    return [str(p) for p in files]


def viewer_file(run_dir: Path) -> str | None:
    """What the 3D viewer shows: a mesh as is; a Gaussian PLY as its y-down copy (see :func:`viewer_ply`); for a
    run with only a per-frame PLY sequence (4D), its first frame (the time slider picks the others)."""
    for n in VIEWER_ORDER:
        p = Path(run_dir) / n
        if p.exists():
            if p.suffix == ".ply":
                try:
                    return str(viewer_ply(p))
                except (OSError, ValueError) as e:
                    print(f"warning: viewer copy of {p} failed ({e}); showing the file as is", file=sys.stderr)
            return str(p)
    return frame_viewer_file(run_dir, 0)


def viewer_ply(ply: Path) -> Path:
    """``<run>/viewer/model.ply``: the splat turned 180 degrees about x for Gradio's splat viewer.

    The studio's world is y-up (OpenGL-like orbit cameras); gsplat.js, which ``gr.Model3D`` uses for
    PLY/.splat, follows the COLMAP/OpenCV y-down convention of captured 3DGS scenes and would show the
    object upside down and from the back. Positions become (x, -y, -z), rotations q -> (1,0,0,0)_xyz * q;
    higher SH bands (view-dependent colour) are dropped in this display copy. The download stays the
    original ``model.ply``.
    """
    import torch

    from ..io.ply import read_ply, write_ply

    ply = Path(ply)
    target = ply.parent / "viewer" / ply.name
    if target.exists() and target.stat().st_mtime >= ply.stat().st_mtime:
        return target
    d = read_ply(ply)
    means = d["means"] * d["means"].new_tensor([1.0, -1.0, -1.0])
    w, x, y, z = d["quats"].unbind(-1)
    quats = torch.stack([-x, w, -z, y], dim=-1)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_ply(target, means, d["scales"], quats, d["opacities"], d["sh0"])
    return target


def frame_plys(run_dir: Path) -> list[str]:
    """A run's per-frame Gaussian PLY sequence (``ply/frame_*.ply``, any 4D run), in frame order; [] if none."""
    d = Path(run_dir) / "ply"
    return [str(p) for p in sorted(d.glob("frame_*.ply"))] if d.is_dir() else []


def frame_viewer_file(run_dir: Path, index: int) -> str | None:
    """What the 3D viewer shows at time slider position ``index`` (clamped): that frame's PLY as its y-down
    display copy (``ply/viewer/frame_*.ply``, see :func:`viewer_ply`); None without a frame sequence."""
    frames = frame_plys(run_dir)
    if not frames:
        return None
    p = Path(frames[min(max(int(index or 0), 0), len(frames) - 1)])
    try:
        return str(viewer_ply(p))
    except (OSError, ValueError) as e:
        print(f"warning: viewer copy of {p} failed ({e}); showing the file as is", file=sys.stderr)
        return str(p)


def video_files(run_dir: Path) -> list[str]:
    """Every MP4 of a run (its top level), the one :func:`video_file` shows first."""
    first = video_file(run_dir)
    vids = [str(p) for p in sorted(Path(run_dir).glob("*.mp4")) if str(p) != first]
    return ([first] if first else []) + vids


def video_file(run_dir: Path) -> str | None:
    """What the video player shows: a turntable or a sampled video, else the first MP4 of the run."""
    for n in VIDEO_ORDER:
        p = Path(run_dir) / n
        if p.exists():
            return str(p)
    vids = sorted(Path(run_dir).glob("*.mp4"))
    return str(vids[0]) if vids else None


_GT_LABELS = {"psnr": ("PSNR (dB)", 2), "ssim": ("SSIM", 3), "iou": ("mask IoU", 3), "chamfer": ("Chamfer", 4),
              "saturation_gap": ("saturation gap", 3), "janus": ("Janus score", 3),
              "motion_accuracy": ("motion accuracy", 3), "frame_error": ("frame error", 4)}


#: ground-truth entries that describe the evaluation rather than score it (counts, sizes)
_GT_FACTS = ("n_views", "size", "n_gaussians", "n_frames", "prompts", "clips")


def metrics_markdown(metrics: dict | None) -> str:
    """The metrics table of any run: its ground-truth numbers (labelled where known), then the run's facts."""
    if not metrics:
        return ""
    lines = ["| metric | value |", "|---|---|"]
    gt = metrics.get("ground_truth") or {}
    keys = [k for k in _GT_LABELS if k in gt] + sorted(k for k in gt if k not in _GT_LABELS and k not in _GT_FACTS)
    for key in keys:
        label, nd = _GT_LABELS.get(key, (key.replace("_", " "), 4))
        v = gt.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lines.append(f"| {label} | {float(v):.{nd}f} |")
    for key, label in (("status", "status"), ("reason", "reason"), ("n_gaussians", "Gaussians"),
                       ("train_seconds", "train seconds"), ("seconds", "seconds"), ("it_s", "it/s"),
                       ("final_loss", "final loss"), ("method", "method"), ("teacher", "teacher"), ("model", "model"),
                       ("steps", "steps")):
        v = metrics.get(key)
        if v is not None:
            lines.append(f"| {label} | {v:.4g} |" if isinstance(v, float) else f"| {label} | {v} |")
    head = ("Ground-truth metrics against ShapeWorld:" if gt else
            "No ground truth for this prompt (not a ShapeWorld prompt).")
    return head + "\n\n" + "\n".join(lines)


@dataclass
class RunInfo:
    run_dir: Path
    config: dict = field(default_factory=dict)
    metrics: dict | None = None
    mtime: float = 0.0

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def prompt(self) -> str:
        return str(self.config.get("prompt", self.run_dir.name))

    @property
    def status(self) -> str:
        if self.metrics is not None:
            return str(self.metrics.get("status", "done"))
        return "unfinished"

    @property
    def preview(self) -> str | None:
        p = self.run_dir / "preview.png"
        if p.exists():
            return str(p)
        prev = sorted((self.run_dir / "previews").glob("*.png")) if (self.run_dir / "previews").is_dir() else []
        return str(prev[-1]) if prev else None

    def caption(self) -> str:
        gt = (self.metrics or {}).get("ground_truth") or {}
        extra = f" · PSNR {gt['psnr']:.1f}" if gt.get("psnr") is not None else ""
        return f"{self.prompt} · {self.method}{extra} · {self.status}"


def _read_yaml(p: Path) -> dict:
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}


def load_run(run_dir: Path) -> RunInfo:
    run_dir = Path(run_dir)
    metrics = None
    if (run_dir / "metrics.json").exists():
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metrics = None
    cfg_file = run_dir / "config.yaml"
    return RunInfo(run_dir, _read_yaml(cfg_file), metrics, cfg_file.stat().st_mtime if cfg_file.exists() else 0.0)


def scan_runs(out: Path, max_depth: int = 3, limit: int = 200) -> list[RunInfo]:
    """Run folders (holding ``config.yaml``) under ``out``, newest first."""
    out = Path(out)
    found: list[RunInfo] = []
    if not out.is_dir():
        return found
    base_depth = len(out.parts)
    for root, dirs, files in os.walk(out):
        depth = len(Path(root).parts) - base_depth
        dirs[:] = [d for d in dirs if d not in ("checkpoints", "previews", "viewer") and not d.startswith(".")]
        if depth >= max_depth:
            dirs[:] = []
        if "config.yaml" in files:
            found.append(load_run(Path(root)))
            dirs[:] = []
    found.sort(key=lambda r: r.mtime, reverse=True)
    return found[:limit]


def run_dir_in_out(path: str, settings: AppSettings) -> Path:
    """A run folder chosen in the browser, accepted only inside the output folder."""
    p = Path(path or "")
    if not path or not _inside(p, settings.out) or not (p / "config.yaml").exists():
        raise UserError("that run is not in the app's output folder any more; refresh the gallery")
    return p.resolve()
