"""The Gradio layout of the studio app, built from the method and teacher registries.

One tab per method *kind* that has registered methods (text to 3D, video generation, video distillation, and
any kind a plugin brings), each generated from the methods' config dataclasses with no code per kind; only the
result viewer differs by the run's artefacts (a GLB / PLY in the 3D viewer, an MP4 in the video player, PNG
previews as images). A Batch tab (every method whose input is a prompt); a Gallery of past runs. Runs execute in worker threads
(``studio.app.core.RunJob``) and stream progress, previews and the loss curve through generator
handlers; all training events share one concurrency group, and a process-wide slot limit also covers
background batches.
"""
from __future__ import annotations

import dataclasses
import html
import queue
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from ..errors import UserError
from . import core
from .core import AppSettings, JobManager
from .forms import FieldSpec, build_config, config_values, field_specs

TRAIN = "studio-train"  # the concurrency group of every event that trains
BATCH_HEADERS = ["prompt", "status", "progress", "seconds", "psnr", "iou", "message"]
UPDATE_EVERY_S = 0.5
MODEL3D_LABEL = "3D result (Gaussian splat / mesh)"
VIDEO_LABEL = "video"
MODEL_PICKERS = ("teacher", "model")  # fields offered as a model dropdown (registered teachers + models folder)

CSS = """
#studio-title h1 {margin-bottom: 0}
.studio-error {color: var(--error-text-color, #b91c1c)}
"""


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def progress_html(rec: dict | None = None, note: str = "") -> str:
    """The progress bar: step count, it/s and ETA (and the stage / loss)."""
    if rec is None:
        text, frac, step, steps = note or "idle", 0.0, 0, 0
    else:
        step, steps = int(rec["step"]), int(rec["steps"])
        frac = step / max(steps, 1)
        eta = rec.get("eta_s")
        eta_s = "-" if eta is None else (f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.1f} min")
        text = (f"{rec.get('stage', '')} · step {step}/{steps} · {rec.get('it_s', 0):.2f} it/s · ETA {eta_s}"
                f" · loss {rec.get('loss', float('nan')):.4g}" + (f" · {note}" if note else ""))
    return (f'<div class="studio-progress" data-step="{step}" data-steps="{steps}">'
            '<div style="height:14px;border-radius:7px;background:var(--neutral-200,#e5e7eb);overflow:hidden">'
            f'<div class="studio-progress-fill" style="height:100%;width:{100 * frac:.1f}%;'
            'background:var(--color-accent,#f97316);transition:width .3s"></div></div>'
            f'<div class="studio-progress-text" style="margin-top:4px;font-size:0.9em">{html.escape(text)}</div></div>')


def loss_frame(history: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"step": list(range(1, len(history) + 1)),
                         "loss": [float(r["loss"]) for r in history]})


def error_md(msg: str) -> str:
    return f"**Error:** {msg}"


def _widget(spec: FieldSpec, elem_id: str, value: Any = None, label: str | None = None, min_width: int = 160):
    value = spec.default if value is None else value
    from .forms import to_widget

    v = to_widget(spec, value)
    label = label or spec.label
    info = spec.doc or None
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(v), label=label, info=info, elem_id=elem_id, min_width=min_width)
    if spec.kind in ("int", "float") and not spec.optional:
        # No precision for ints: Gradio would round 2.5 to 2; the form's own check refuses it with a message.
        return gr.Number(value=v, label=label, info=info, elem_id=elem_id, min_width=min_width)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=v, label=label, info=info, elem_id=elem_id,
                           min_width=min_width)
    placeholder = {"tuple": "a, b", "yaml": "YAML"}.get(spec.kind)
    if spec.optional:
        placeholder = "empty = default"
    return gr.Textbox(value=v, label=label, info=info, placeholder=placeholder, elem_id=elem_id, max_lines=1,
                      min_width=min_width)


def _eid(*parts: str) -> str:
    return "-".join(p.replace(".", "-").replace("_", "-") for p in parts)


class KindTab:
    """The form, live view and results of one method kind, generated from the registry."""

    def __init__(self, kind: str, classes: list[type], settings: AppSettings, manager: JobManager):
        self.kind, self.settings, self.manager = kind, settings, manager
        self.classes = {c.name: c for c in classes}
        names = list(self.classes)
        marked = [n for n, c in self.classes.items() if c.default_for_verb]
        self.default_method = (marked or names)[0]
        self.input = self.classes[self.default_method].input
        self.specs = {n: {s.path: s for s in field_specs(c.Config)} for n, c in self.classes.items()}
        # Primary fields: present in any method's config; the widget uses the default method's spec first.
        primary: dict[str, FieldSpec] = {}
        for n in [self.default_method] + names:
            for s in self.specs[n].values():
                if s.is_primary and s.path not in primary:
                    primary[s.path] = s
        k = "run-" + kind
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=360):
                self.primary: dict[str, Any] = {}
                if self.input is not None and self.input in self.specs[self.default_method]:
                    self.primary[self.input] = gr.Textbox(label=self.input.replace("_", " "), lines=2,
                                                          placeholder=_PLACEHOLDERS.get(self.input),
                                                          elem_id=_eid(k, self.input))
                    examples = _examples(self.classes[self.default_method])
                    if examples:
                        gr.Examples([[p] for p in examples], inputs=[self.primary[self.input]],
                                    label=("ShapeWorld prompts" if self.input == "prompt" else "ShapeWorld scenes")
                                    + " (ground-truth metrics)", examples_per_page=14)
                if "stage.negative_prompt" in primary:
                    self.primary["stage.negative_prompt"] = gr.Textbox(
                        label="negative prompt", max_lines=1, value=primary["stage.negative_prompt"].default,
                        elem_id=_eid(k, "negative-prompt"))
                self.method = gr.Dropdown(choices=[(f"{n}: {c.description}", n) for n, c in self.classes.items()],
                                          value=self.default_method, label="method", elem_id=_eid(k, "method"))
                self.method_md = gr.Markdown(core.method_markdown(self.classes[self.default_method]),
                                             elem_id=_eid(k, "method-info"))
                self.picker = next((p for p in MODEL_PICKERS if p in primary), None)
                if self.picker is not None:
                    teacher_default = primary[self.picker].default
                    self.primary[self.picker] = gr.Dropdown(
                        choices=core.teacher_choices(settings), value=teacher_default, allow_custom_value=True,
                        label=self.picker, elem_id=_eid(k, self.picker),
                        info=f"a registered model, a Hugging Face id (owner/name) or a model folder in "
                             f"{settings.models_dir}" + (" (or a distilled student folder in the output folder)"
                                                         if self.picker == "model" else ""))
                    self.teacher_md = gr.Markdown(core.teacher_markdown(teacher_default))
                with gr.Row():
                    for path, label in (("steps", "steps"), ("resolution", "resolution"),
                                        ("guidance_scale", "guidance (empty = method default)"), ("seed", "seed")):
                        if path in primary:
                            self.primary[path] = _widget(primary[path], _eid(k, path), label=label)
                self.advanced: dict[str, dict[str, Any]] = {}
                self.adv_groups: dict[str, Any] = {}
                with gr.Accordion("Advanced settings (from the method's config)", open=False):
                    for n, specs in self.specs.items():
                        with gr.Row(visible=(n == self.default_method), equal_height=False) as grp:
                            # (the run's input has its own box above, also when it is not the prompt)
                            self.advanced[n] = {p: _widget(s, _eid(k, n, p), min_width=190)
                                                for p, s in specs.items() if not s.is_primary and p != self.input}
                        self.adv_groups[n] = grp
                with gr.Row():
                    self.run_btn = gr.Button("Run" if self.input is None else "Generate", variant="primary",
                                             elem_id=_eid(k, "generate"))
                    self.cancel_btn = gr.Button("Cancel", variant="stop", interactive=False, elem_id=_eid(k, "cancel"))
                self.status = gr.Markdown("", elem_id=_eid(k, "status"))
            with gr.Column(scale=6, min_width=420):
                self.progress = gr.HTML(progress_html(), elem_id=_eid(k, "progress"))
                with gr.Row():
                    self.preview = gr.Image(label="live preview", type="filepath",
                                            interactive=False, height=220, elem_id=_eid(k, "preview"))
                    self.loss = gr.LinePlot(loss_frame([]), x="step", y="loss", title="loss", height=220,
                                            elem_id=_eid(k, "loss"))
                with gr.Row():
                    # Shown by artefact type once a run has them (a 3D file, an MP4).
                    self.model3d = gr.Model3D(label=MODEL3D_LABEL, interactive=False, visible=False,
                                              height=320, elem_id=_eid(k, "model3d"), clear_color=(1, 1, 1, 1))
                    self.video = gr.Video(label=VIDEO_LABEL, interactive=False, height=320, loop=True, autoplay=True,
                                          visible=False, elem_id=_eid(k, "video"))
                with gr.Row():
                    # A run with a per-frame PLY sequence (ply/frame_*.ply, any 4D run): the time slider picks the
                    # frame the 3D viewer shows; a run with several MP4s: a choice of the one the player shows.
                    self.time = gr.Slider(minimum=0, maximum=1, step=1, value=0, label="time (frame)", visible=False,
                                          elem_id=_eid(k, "time"))
                    self.video_pick = gr.Radio(choices=[], label="video", visible=False,
                                               elem_id=_eid(k, "video-pick"))
                self.shown_run = gr.State(None)  # the run folder the viewers show (server side)
                self.metrics = gr.Markdown("", elem_id=_eid(k, "metrics"))
                self.files = gr.File(label="downloads", file_count="multiple", interactive=False,
                                     elem_id=_eid(k, "files"))
        self.form_components = ([self.method] + list(self.primary.values())
                                + [c for d in self.advanced.values() for c in d.values()])
        self.result_components = [self.status, self.progress, self.preview, self.loss, self.model3d, self.video,
                                  self.time, self.video_pick, self.shown_run,
                                  self.metrics, self.files, self.run_btn, self.cancel_btn]
        self.method.change(self._method_changed, inputs=[self.method],
                           outputs=[self.method_md] + list(self.adv_groups.values()), queue=False)
        if self.picker is not None:
            self.primary[self.picker].change(core.teacher_markdown, inputs=[self.primary[self.picker]],
                                             outputs=[self.teacher_md], queue=False)
        self.run_event = self.run_btn.click(self.run, inputs=set(self.form_components), outputs=self.result_components,
                                            concurrency_limit=settings.concurrency, concurrency_id=TRAIN)
        self.cancel_btn.click(self.cancel, inputs=None, outputs=None, concurrency_limit=None, queue=False)
        # on release, not on every change: each frame is one splat load in the viewer
        self.time.release(self.frame_changed, inputs=[self.time, self.shown_run], outputs=[self.model3d],
                          concurrency_limit=None)
        self.video_pick.input(self.video_changed, inputs=[self.video_pick, self.shown_run], outputs=[self.video],
                              concurrency_limit=None)

    # -- handlers --------------------------------------------------------------------------------------
    def _method_changed(self, method: str):
        cls = self.classes.get(method)
        md = core.method_markdown(cls) if cls else ""
        return [md] + [gr.update(visible=(n == method)) for n in self.adv_groups]

    def config_from(self, values: dict) -> tuple[str, Any]:
        """(method, config) from the form's widget values (by component); UserError for bad input."""
        method = values.get(self.method)
        cls = self.classes.get(method)
        if cls is None:
            raise UserError(f"unknown method {method!r}; choose one of: {', '.join(self.classes)}")
        specs = self.specs[method]
        raw = {p: values[c] for p, c in self.primary.items() if p in specs and c in values}
        raw.update({p: values[c] for p, c in self.advanced[method].items() if c in values})
        cfg = core.resolve_models(build_config(cls.Config, raw), self.settings)
        core.validate_config(method, cfg, self.settings)
        return method, cfg

    def cancel(self, request: gr.Request):
        if self.manager.cancel_run(_session(request)):
            gr.Info("Cancelling: the run stops after the current step and keeps a checkpoint.")

    def run(self, values: dict, request: gr.Request):
        yield from self.stream(values, _session(request))

    def stream(self, values: dict, session: str):
        """Start a run and stream its progress; every outcome (done / error / cancel) ends in a usable form."""
        idle = {self.run_btn: gr.update(interactive=True), self.cancel_btn: gr.update(interactive=False)}
        try:
            method, cfg = self.config_from(values)
            job = self.manager.start_run(session, method, cfg)
        except Exception as e:  # noqa: BLE001 - bad input (UserError) or a bug: show it, stay usable
            yield {self.status: error_md(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"), **idle}
            return
        what = getattr(cfg, self.input, "") if self.input else ""
        yield {self.status: f"Running **{method}**" + (f" on *{html.escape(str(what)[:200])}*" if what else "")
               + " ...",
               self.progress: progress_html(note="starting (loading the models)"), self.preview: None,
               # The 3D viewer keeps the previous model until the new one is ready: clearing a splat
               # viewer and loading another one freezes software-WebGL browsers for minutes.
               self.model3d: gr.update(label=MODEL3D_LABEL + " (previous run)"),
               self.loss: loss_frame([]), self.video: None, self.metrics: "", self.files: None,
               self.run_btn: gr.update(interactive=False), self.cancel_btn: gr.update(interactive=True)}
        history: list[dict] = []
        last, dirty, preview = 0.0, False, None
        try:
            while True:
                try:
                    ev, data = job.events.get(timeout=0.25)
                except queue.Empty:
                    if dirty and time.monotonic() - last > UPDATE_EVERY_S:
                        yield self._live(history, preview)
                        last, dirty = time.monotonic(), False
                    continue
                if ev == "waiting":
                    yield {self.progress: progress_html(
                        note=f"waiting for a free slot: {self.settings.concurrency} job(s) at a time")}
                elif ev == "step":
                    history.append(data)
                    dirty = True
                    if data.get("preview"):
                        preview = data["preview"]
                    if data.get("preview") or time.monotonic() - last > UPDATE_EVERY_S:
                        yield self._live(history, preview)
                        last, dirty = time.monotonic(), False
                elif ev == "done":
                    yield {**self.result_updates(job.run_dir or job.out_root, data, history), **idle}
                    return
                elif ev == "cancelled":
                    rec = history[-1] if history else None
                    yield {self.status: f"Cancelled: {html.escape(str(data))}. Ready for the next run.",
                           self.progress: progress_html(rec, note="cancelled"), **idle}
                    return
                else:
                    yield {self.status: error_md(str(data)), self.progress: progress_html(
                        history[-1] if history else None, note="failed"), **idle}
                    return
        finally:
            if job.running:  # the page went away: stop the job instead of burning the CPU
                job.cancel()

    def _live(self, history: list[dict], preview: str | None) -> dict:
        out = {self.progress: progress_html(history[-1] if history else None), self.loss: loss_frame(history)}
        if preview:
            out[self.preview] = preview
        return out

    def result_updates(self, run_dir: Path, metrics: dict | None, history: list[dict] | None = None,
                       status: str | None = None) -> dict:
        run_dir = Path(run_dir)
        if history is None:
            hist_file = run_dir / "history.json"
            try:
                import json

                history = json.loads(hist_file.read_text()) if hist_file.exists() else []
            except (OSError, ValueError):
                history = []
        prev = run_dir / "preview.png"
        viewer = core.viewer_file(run_dir)
        video = core.video_file(run_dir)
        frames, videos = core.frame_plys(run_dir), core.video_files(run_dir)
        secs = (metrics or {}).get("train_seconds", (metrics or {}).get("seconds"))
        done = status or (f"Done in {secs:.0f} s: `{run_dir}`" if secs is not None else f"Run `{run_dir}`")
        return {self.status: done,
                self.progress: progress_html(history[-1] if history else None, note="done" if metrics else ""),
                self.preview: str(prev) if prev.exists() else None,
                self.loss: loss_frame(history),
                # The 3D viewer keeps its last model when a run has none (clearing a splat viewer freezes
                # software-WebGL browsers); it is hidden then.
                self.model3d: (gr.update(value=viewer, label=MODEL3D_LABEL, visible=True) if viewer else
                               gr.update(visible=False)),
                self.video: gr.update(value=video, visible=video is not None),
                self.time: gr.update(minimum=0, maximum=max(len(frames) - 1, 1), step=1, value=0,
                                     visible=len(frames) > 1, label=f"time (frame, {len(frames)} in all)"),
                self.video_pick: gr.update(choices=[(Path(v).name, v) for v in videos], value=video,
                                           visible=len(videos) > 1),
                self.shown_run: str(run_dir),
                self.metrics: core.metrics_markdown(metrics), self.files: core.artefacts(run_dir) or None}

    def frame_changed(self, index, run_dir: str | None):
        """The 3D viewer at time slider position ``index``: that frame's PLY of the shown run."""
        path = core.frame_viewer_file(Path(run_dir), index) if run_dir else None
        if path is None:
            return gr.update()
        n = len(core.frame_plys(Path(run_dir)))
        return gr.update(value=path, label=f"{MODEL3D_LABEL} · frame {int(index or 0)} of {n}", visible=True)

    def video_changed(self, video: str | None, run_dir: str | None):
        """The player shows the chosen MP4, accepted only among the shown run's own videos."""
        if not run_dir or video not in core.video_files(Path(run_dir)):
            return gr.update()
        return gr.update(value=video, visible=True)

    def fill_updates(self, config: dict) -> dict:
        """Form updates that restore a run's config (from its ``config.yaml``)."""
        method = config.get("method")
        if method not in self.classes:
            raise UserError(f"this run used method {method!r}, which is not registered in this app")
        values = config_values(self.classes[method].Config, config)
        out: dict = {self.method: method}
        for p, c in self.primary.items():
            if p in values:
                out[c] = values[p]
        for p, c in self.advanced[method].items():
            if p in values:
                out[c] = values[p]
        out[self.method_md] = core.method_markdown(self.classes[method])
        for n, grp in self.adv_groups.items():
            out[grp] = gr.update(visible=(n == method))
        return out


_PLACEHOLDERS = {"prompt": 'e.g. "a red cube"',
                 "video": "a video path (MP4 or frame folder) or a ShapeWorld scene name, e.g. two_cross"}


def _examples(cls: type) -> list[str]:
    try:
        return list(cls.examples())
    except Exception:  # noqa: BLE001 - examples are a convenience
        return []


class BatchTab:
    """Paste or upload prompts; the batch runs in the background and a table shows each prompt's status."""

    def __init__(self, tabs: dict[str, KindTab], settings: AppSettings, manager: JobManager):
        self.tabs, self.settings, self.manager = tabs, settings, manager
        self.classes = {n: c for t in tabs.values() for n, c in t.classes.items() if c.input == "prompt"}
        if not self.classes:
            gr.Markdown("No method with a prompt is registered.")
            return
        first = next(iter(tabs.values()))
        default = first.default_method if first.default_method in self.classes else next(iter(self.classes))
        primary = {s.path: s for s in field_specs(self.classes[default].Config) if s.is_primary}
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=340):
                self.prompts = gr.Textbox(label="prompts (one per line, # comments)", lines=8,
                                          placeholder="a red cube\na blue ball\na snowman", elem_id="batch-prompts")
                self.upload = gr.File(label="or upload a prompt list (.txt, at most 1 MB)", file_types=[".txt"],
                                      type="filepath", elem_id="batch-upload")
                self.method = gr.Dropdown(choices=[(f"{n}: {c.description}", n) for n, c in self.classes.items()],
                                          value=default, label="method", elem_id="batch-method")
                self.primary: dict[str, Any] = {}
                for picker in (p for p in MODEL_PICKERS if p in primary):
                    self.primary[picker] = gr.Dropdown(choices=core.teacher_choices(settings),
                                                       value=primary[picker].default, allow_custom_value=True,
                                                       label=picker, elem_id=f"batch-{picker}")
                with gr.Row():
                    for p in ("steps", "resolution", "guidance_scale", "seed"):
                        if p in primary:
                            self.primary[p] = _widget(primary[p], _eid("batch", p),
                                                      label="guidance (empty = default)" if p == "guidance_scale" else p)
                gr.Markdown("Other settings: the method's defaults (the Text tab's advanced settings are per run).")
                with gr.Row():
                    self.start_btn = gr.Button("Run batch", variant="primary", elem_id="batch-start")
                    self.cancel_btn = gr.Button("Cancel batch", variant="stop", elem_id="batch-cancel")
                self.status = gr.Markdown("", elem_id="batch-status")
            with gr.Column(scale=6, min_width=420):
                self.table = gr.Dataframe(headers=BATCH_HEADERS, value=[], interactive=False, wrap=True,
                                          label="per-prompt status", elem_id="batch-table")
                self.files = gr.File(label="results (zip of the batch, models, turntables)", file_count="multiple",
                                     interactive=False, elem_id="batch-files")
        self.timer = gr.Timer(1.0, active=False)
        inputs = [self.prompts, self.method] + list(self.primary.values())
        self.upload.upload(self.read_upload, inputs=[self.upload, self.prompts], outputs=[self.prompts, self.status],
                           concurrency_limit=None)
        self.start_btn.click(self.start, inputs=inputs, outputs=[self.status, self.table, self.files, self.timer],
                             concurrency_limit=None)
        self.cancel_btn.click(self.cancel, outputs=[self.status], concurrency_limit=None, queue=False)
        self.timer.tick(self.poll, outputs=[self.status, self.table, self.files, self.timer], concurrency_limit=None,
                        show_progress="hidden")

    def read_upload(self, path: str | None, current: str):
        if not path:
            return gr.update(), ""
        try:
            text = core.read_prompt_upload(path)
        except UserError as e:
            return gr.update(), error_md(str(e))
        n = len(core.parse_prompt_text(text))
        merged = (current.rstrip() + "\n" if current and current.strip() else "") + text.strip()
        return merged, f"Read {n} prompt(s) from the upload."

    def start(self, prompts_text: str, method: str, *values):
        keep = (gr.update(), gr.update(), gr.update())
        try:
            prompts = core.parse_prompt_text(prompts_text)
            if not prompts:
                raise UserError("no prompts: paste one prompt per line (or upload a .txt prompt list)")
            if len(prompts) > self.settings.max_batch_prompts:
                raise UserError(f"{len(prompts)} prompts; the app runs at most {self.settings.max_batch_prompts} "
                                "per batch (use `studio batch` for more)")
            cls = self.classes.get(method)
            if cls is None:
                raise UserError(f"unknown method {method!r}; choose one of: {', '.join(self.classes)}")
            specs = {s.path for s in field_specs(cls.Config)}
            raw = {p: v for p, v in zip(self.primary, values) if p in specs}
            cfg = core.resolve_models(build_config(cls.Config, raw), self.settings)
            core.validate_config(method, dataclasses.replace(cfg, prompt=prompts[0]), self.settings)
            job = self.manager.start_batch(method, cfg, prompts)
        except UserError as e:
            return (error_md(str(e)), *keep, gr.Timer(active=False))
        return job.summary(), job.table(), None, gr.Timer(active=True)

    def cancel(self):
        job = self.manager.latest_batch()
        if job is None or not job.running:
            return "No batch is running."
        job.cancel()
        return "Cancelling the batch: the current prompt stops after its current step."

    def poll(self):
        job = self.manager.latest_batch()
        if job is None:
            return gr.update(), gr.update(), gr.update(), gr.Timer(active=False)
        if job.running:
            return job.summary(), job.table(), gr.update(), gr.Timer(active=True)
        return job.summary(), job.table(), job.result_files() or None, gr.Timer(active=False)

    def on_load(self):
        job = self.manager.latest_batch()
        if job is None:
            return gr.update(), gr.update(), gr.update(), gr.Timer(active=False)
        return self.poll()


class GalleryTab:
    """Past runs from the output folder: preview, config, metrics, viewer; reopen or re-run with one click."""

    def __init__(self, tabs: dict[str, KindTab], settings: AppSettings):
        self.tabs, self.settings = tabs, settings
        with gr.Row():
            self.refresh_btn = gr.Button("Refresh", size="sm", elem_id="gallery-refresh")
            self.count = gr.Markdown("", elem_id="gallery-count")
        self.gallery = gr.Gallery(label="past runs (newest first)", columns=5, height=300, allow_preview=False,
                                  object_fit="contain", elem_id="gallery-grid", interactive=False)
        self.runs = gr.State([])
        self.selected = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                self.info = gr.Markdown("Select a run.", elem_id="gallery-info")
                with gr.Row():
                    self.open_btn = gr.Button("Open", elem_id="gallery-open")
                    self.rerun_btn = gr.Button("Re-run", variant="primary", elem_id="gallery-rerun")
                self.config = gr.Code(label="config.yaml", language="yaml", interactive=False, elem_id="gallery-config")
                self.metrics = gr.Markdown("", elem_id="gallery-metrics")
            with gr.Column(scale=6):
                with gr.Row():
                    # A preview image, not a second 3D viewer: "Open" shows the splat in the run tab (one
                    # WebGL viewer per page keeps software-rendered browsers responsive).
                    self.preview = gr.Image(label="preview", type="filepath", interactive=False, height=300,
                                            elem_id="gallery-preview")
                    self.video = gr.Video(label=VIDEO_LABEL, interactive=False, height=300, loop=True,
                                          elem_id="gallery-video")
                self.files = gr.File(label="downloads", file_count="multiple", interactive=False,
                                     elem_id="gallery-files")
        self.refresh_outputs = [self.gallery, self.runs, self.count]
        self.refresh_btn.click(self.refresh, outputs=self.refresh_outputs, concurrency_limit=None)
        self.gallery.select(self.select, inputs=[self.runs],
                            outputs=[self.selected, self.info, self.config, self.metrics, self.preview, self.video,
                                     self.files], concurrency_limit=None)

    def refresh(self):
        runs = core.scan_runs(self.settings.out)
        items = [(r.preview, r.caption()) for r in runs if r.preview]
        listed = [str(r.run_dir) for r in runs if r.preview]
        return items, listed, f"{len(runs)} run(s) in `{self.settings.out}`"

    def select(self, runs: list[str], evt: gr.SelectData):
        try:
            idx = evt.index if isinstance(evt.index, int) else evt.index[0]
            run_dir = core.run_dir_in_out(runs[idx], self.settings)
        except (UserError, IndexError, TypeError) as e:
            return None, error_md(str(e)), "", "", None, None, None
        r = core.load_run(run_dir)
        text = (run_dir / "config.yaml").read_text(encoding="utf-8")
        reason = (r.metrics or {}).get("reason")
        note = f"\n\n{error_md(str(reason).splitlines()[0])}" if reason and r.status != "done" else ""
        info = f"**{html.escape(r.prompt)}** · {r.method} · {r.status} · `{run_dir}`{note}"
        return (str(run_dir), info, text, core.metrics_markdown(r.metrics), r.preview,
                core.video_file(run_dir), core.artefacts(run_dir) or None)


def _tab_for(tabs: dict[str, KindTab], method: str | None) -> KindTab:
    for t in tabs.values():
        if method in t.classes:
            return t
    raise UserError(f"this run used method {method!r}, which is not registered in this app")


def build_app(settings: AppSettings | None = None) -> gr.Blocks:
    """The whole app (not launched). Tabs come from the method registry by ``kind``."""
    settings = settings or AppSettings()
    manager = JobManager(settings)
    groups = core.methods_by_kind()
    with gr.Blocks(title="Distillation studio", analytics_enabled=False) as demo:
        gr.Markdown("# Distillation studio\nScore distillation into 3D students and fast video generators: text to "
                    "3D, video generation and video distillation (and every kind a plugin adds). ShapeWorld prompts "
                    "run offline "
                    "with ground-truth metrics; real teachers load from a Hugging Face id or the models folder.",
                    elem_id="studio-title")
        tabs: dict[str, KindTab] = {}
        with gr.Tabs() as tab_set:
            for kind, classes in groups.items():
                with gr.Tab(core.kind_title(classes), id=f"tab-{kind}", elem_id=f"tab-{kind}"):
                    tabs[kind] = KindTab(kind, classes, settings, manager)
            with gr.Tab("Batch", id="tab-batch", elem_id="tab-batch"):
                batch = BatchTab(tabs, settings, manager)
            with gr.Tab("Gallery", id="tab-gallery", elem_id="tab-gallery") as gallery_tab:
                gallery = GalleryTab(tabs, settings)
        rerun_kind = gr.State(None)

        # Refresh the gallery on load, on opening its tab and after every run.
        demo.load(gallery.refresh, outputs=gallery.refresh_outputs, queue=False)
        gallery_tab.select(gallery.refresh, outputs=gallery.refresh_outputs, concurrency_limit=None)
        for t in tabs.values():
            t.run_event.then(gallery.refresh, outputs=gallery.refresh_outputs, concurrency_limit=None)
        if hasattr(batch, "timer"):
            demo.load(batch.on_load, outputs=[batch.status, batch.table, batch.files, batch.timer], queue=False)

        all_form = [c for t in tabs.values() for c in t.form_components + [t.method_md, *t.adv_groups.values()]]
        all_results = [c for t in tabs.values() for c in t.result_components]

        def open_run(selected: str | None, rerun: bool):
            try:
                run_dir = core.run_dir_in_out(selected, settings)
                r = core.load_run(run_dir)
                t = _tab_for(tabs, r.config.get("method"))
                upd = t.fill_updates(r.config)
                if not rerun:
                    upd.update(t.result_updates(run_dir, r.metrics, status=f"Opened run `{run_dir}`"))
                return {**upd, tab_set: gr.Tabs(selected=f"tab-{t.kind}"), rerun_kind: t.kind if rerun else None,
                        gallery.info: gr.update()}
            except UserError as e:
                return {gallery.info: error_md(str(e)), rerun_kind: None}

        outs = all_form + all_results + [tab_set, rerun_kind, gallery.info]
        gallery.open_btn.click(lambda s: open_run(s, False), inputs=[gallery.selected], outputs=outs,
                               concurrency_limit=None)
        ev = gallery.rerun_btn.click(lambda s: open_run(s, True), inputs=[gallery.selected], outputs=outs,
                                     concurrency_limit=None)
        for kind, t in tabs.items():
            def rerun(values: dict, request: gr.Request, t=t, kind=kind):
                if values.get(rerun_kind) != kind:
                    yield {}
                    return
                yield from t.stream(values, _session(request))

            ev = ev.then(rerun, inputs=set(t.form_components) | {rerun_kind}, outputs=t.result_components,
                         concurrency_limit=settings.concurrency, concurrency_id=TRAIN)
        ev.then(gallery.refresh, outputs=gallery.refresh_outputs, concurrency_limit=None)
    demo.studio_manager, demo.studio_tabs = manager, tabs  # for tests and embedding
    return demo


def launch(settings: AppSettings, host: str = "127.0.0.1", port: int = 7860, open_browser: bool = False) -> None:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    settings.out.mkdir(parents=True, exist_ok=True)
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=64)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {host} makes the app reachable from other machines; it has no login. "
              "Use 127.0.0.1 (the default) unless the network is trusted.", flush=True)
    print(f"studio app on http://{host}:{port} (outputs: {settings.out}, models: {settings.models_dir}, "
          f"{settings.concurrency} job(s) at a time)", flush=True)
    demo.launch(server_name=host, server_port=port, allowed_paths=[str(settings.out)], max_file_size="1mb",
                show_error=False, share=False, inbrowser=open_browser, ssr_mode=False, css=CSS,
                footer_links=["gradio"], quiet=True)
