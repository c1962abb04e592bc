"""The app's logic without a browser: widgets from config dataclasses, validation messages, teacher
paths confined to the models folder, upload checks, jobs (concurrency limit, cancel, failures), batch
isolation, the gallery, and the Gradio handlers driven directly."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest

from methods.registry import get_method
from methods.sds import SDSConfig
from studio.app import core
from studio.app.core import AppSettings, BatchJob, JobManager, RunJob, Slots
from studio.app.forms import build_config, config_values, field_specs, from_widget, to_widget
from studio.errors import UserError
from studio.runs.protocol import Method
from studio.runs.text_to_3d import TextTo3DConfig, TextTo3DMethod

validate = TextTo3DMethod().validate


@pytest.fixture()
def settings(tmp_path):
    (tmp_path / "models").mkdir()
    return AppSettings(out=tmp_path / "out", models_dir=tmp_path / "models")


# -- forms ---------------------------------------------------------------------------------------------
def test_field_specs_cover_config_and_nested_stage_by_type():
    specs = {s.path: s for s in field_specs(SDSConfig)}
    assert specs["steps"].kind == "int" and specs["seed"].kind == "int"
    assert specs["guidance_scale"].kind == "float" and specs["guidance_scale"].optional
    assert specs["prompt"].kind == "str" and specs["teacher"].kind == "str"
    assert specs["weighting"].kind == "choice" and specs["weighting"].choices == ("sds", "uniform", "fantasia3d")
    assert specs["stage.camera_conditioning"].kind == "bool"
    assert specs["stage.background"].kind == "choice"
    assert specs["stage.elevation_range"].kind == "tuple" and specs["stage.elevation_range"].elem_types == (float, float)
    assert specs["stage.batch_size"].kind == "int"
    assert "views per step" in specs["stage.batch_size"].doc  # attribute docstrings become widget help
    assert specs["teacher"].is_primary and not specs["stage.lr_means"].is_primary
    # every 3D method's config is covered without a per-method widget list
    from methods.registry import method_names

    for name in method_names("3d"):
        paths = {s.path for s in field_specs(get_method(name).Config)}
        assert {"prompt", "steps", "stage.batch_size"} <= paths


def test_widget_values_round_trip_and_readable_errors():
    specs = {s.path: s for s in field_specs(SDSConfig)}
    cfg = SDSConfig(prompt="a red cube", steps=33, guidance_scale=2.5)
    cfg.stage.elevation_range = (-5.0, 30.0)
    values = config_values(SDSConfig, dataclasses.asdict(cfg))
    assert values["stage.elevation_range"] == "-5.0, 30.0" and values["guidance_scale"] == "2.5"
    back = build_config(SDSConfig, values)
    assert back == cfg
    assert from_widget(specs["guidance_scale"], "") is None  # empty optional number = method default
    assert from_widget(specs["grad_clip"], " ") is None
    assert from_widget(specs["steps"], 12.0) == 12
    assert to_widget(specs["guidance_scale"], None) == ""
    with pytest.raises(UserError, match="'stage.elevation_range' needs 2 comma-separated values such as '-10.0, 45.0'"):
        from_widget(specs["stage.elevation_range"], "10")
    with pytest.raises(UserError, match="'steps' must be a whole number"):
        from_widget(specs["steps"], 2.5)
    with pytest.raises(UserError, match="'steps' is empty"):
        from_widget(specs["steps"], None)
    with pytest.raises(UserError, match="'weighting' must be one of sds, uniform, fantasia3d"):
        from_widget(specs["weighting"], "nope")
    with pytest.raises(UserError, match="'guidance_scale' must be a number"):
        from_widget(specs["guidance_scale"], "lots")


# -- validation reuses the library's messages ------------------------------------------------------------
def _message(fn, *a):
    with pytest.raises(UserError) as e:
        fn(*a)
    return str(e.value)


def test_validation_messages_are_the_librarys(settings):
    for bad in (SDSConfig(prompt="  "), SDSConfig(prompt="a red cube", steps=0),
                SDSConfig(prompt="a red cube", resolution=8)):
        assert _message(core.validate_config, "sds", bad, settings) == _message(validate, bad)
    msg = _message(core.validate_config, "sds", SDSConfig(prompt="a red cube", steps=10**6), settings)
    assert "at most 20000" in msg and "--max-steps" in msg


# -- teachers: registered names, hub ids, and folders inside the models folder only -----------------------
def test_teacher_resolution_confines_paths_to_the_models_folder(settings, tmp_path):
    assert core.resolve_teacher("shapeworld-exact", settings) == "shapeworld-exact"
    assert core.resolve_teacher("stabilityai/stable-diffusion-2-1-base", settings) == "stabilityai/stable-diffusion-2-1-base"
    model = settings.models_dir / "tiny-sd"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    assert core.resolve_teacher("tiny-sd", settings) == str(model)
    assert core.resolve_teacher(str(model), settings) == str(model)
    assert str(model) in core.teacher_choices(settings)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for bad in (str(outside), "/etc", "../out", str(settings.models_dir / ".." / "out"), "~/"):
        assert "outside the models folder" in _message(core.resolve_teacher, bad, settings)
    # A model linked into the models folder is accepted (the message says "copy or link the model into it")
    link = settings.models_dir / "linked"
    link.symlink_to(outside)
    assert core.resolve_teacher("linked", settings) == str(link)
    assert "outside the models folder" in _message(core.resolve_teacher, str(settings.models_dir / "linked" / ".." / ".."),
                                                   settings)
    from studio.teachers.registry import load_teacher

    assert _message(core.resolve_teacher, "no-such-teacher", settings) == _message(load_teacher, "no-such-teacher")
    assert _message(core.resolve_teacher, "", settings) == _message(load_teacher, "")


def test_every_path_field_of_every_method_is_confined_to_the_app_folders(settings, tmp_path):
    """A kind's input (the image to edit, the video to lift) and any other model / file field (reward, PRM,
    inpainting or depth model, concept folder, novel-view teacher) may name only files inside the models or the
    output folder; names pass."""
    from methods.registry import get_method

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    inside = settings.models_dir / "me.png"
    inside.write_bytes(b"x")
    checked = 0
    for name, field in (("dreamsteerer", "source"), ("dreamsteerer", "concept"), ("dreamscene4d", "video"),
                        ("dreamscene4d", "inpaint_teacher"), ("euphonium", "prm"), ("placiddreamer", "novel_view_teacher")):
        cls = get_method(name)
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        assert field in fields, (name, field)
        for bad in (str(secret), "/etc/passwd", "../../x", "~/"):
            cfg = cls.Config()
            setattr(cfg, field, bad)
            assert "outside the models folder" in _message(core.resolve_models, cfg, settings), (name, field, bad)
        cfg = cls.Config()
        setattr(cfg, field, str(inside))
        core.resolve_models(cfg, settings)  # inside the models folder: accepted
        checked += 1
    assert checked == 6
    cfg = get_method("dreamscene4d").Config()
    cfg.video = "two_cross"  # a ShapeWorld scene name is not a path
    core.resolve_models(cfg, settings)


# -- uploads -----------------------------------------------------------------------------------------------
def test_prompt_upload_checks_size_and_type(tmp_path):
    ok = tmp_path / "p.txt"
    ok.write_text("a red cube\n# comment\n\na blue ball\na red cube\n", encoding="utf-8")
    assert core.parse_prompt_text(core.read_prompt_upload(ok)) == ["a red cube", "a blue ball"]
    big = tmp_path / "big.txt"
    big.write_text("a red cube\n" * 100_000)
    assert "at most 1 MB" in _message(core.read_prompt_upload, big)
    exe = tmp_path / "p.exe"
    exe.write_text("a red cube")
    assert "not a .txt file" in _message(core.read_prompt_upload, exe)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\x89PNG\x00\x00")
    assert "not text" in _message(core.read_prompt_upload, binary)
    latin = tmp_path / "l.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    assert "not UTF-8" in _message(core.read_prompt_upload, latin)


# -- jobs ----------------------------------------------------------------------------------------------------
class FakeTrainer:
    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()


def fake_runner(steps=5, delay=0.0, fail_on=None):
    """A runner with run_method's contract: callbacks per step (False cancels), TrainingCancelled, artefacts,
    ``run_dir`` in the metrics."""
    from studio.train.loop import TrainingCancelled

    def run(method, cfg, out, *, callbacks):
        if fail_on and fail_on in cfg.prompt:
            raise UserError(f"prompt {cfg.prompt!r} is not a ShapeWorld object")
        trainer = FakeTrainer()
        run_dir = Path(out) / cfg.prompt.replace(" ", "-")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(f"method: {method}\nprompt: {cfg.prompt}\nsteps: {steps}\n")
        for i in range(1, steps + 1):
            if trainer.cancelled.is_set():
                raise TrainingCancelled(f"cancelled at fake step {i - 1}; checkpoint saved")
            time.sleep(delay)
            for cb in callbacks:
                if cb({"stage": "fake", "step": i, "steps": steps, "loss": 1.0 / i, "it_s": 10.0,
                       "eta_s": (steps - i) / 10, "stage_obj": object()}) is False:
                    trainer.cancel()
        metrics = {"ground_truth": {"psnr": 20.0, "iou": 0.9}, "train_seconds": 0.1, "method": method,
                   "run_dir": str(run_dir)}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        (run_dir / "model.ply").write_text("ply")
        (run_dir / "turntable.mp4").write_bytes(b"\x00")
        (run_dir / "preview.png").write_bytes(b"\x00")
        return metrics

    return run


def _drain(job, timeout=20):
    events = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        ev = job.events.get(timeout=timeout)
        events.append(ev)
        if ev[0] in ("done", "error", "cancelled"):
            return events
    raise AssertionError("job did not finish")


def test_run_job_streams_steps_and_respects_the_concurrency_limit(tmp_path):
    slots = Slots(1)
    cfg = SDSConfig(prompt="a red cube", steps=5)
    a = RunJob("sds", cfg, tmp_path / "a", slots, runner=fake_runner(steps=5, delay=0.05)).start()
    b = RunJob("sds", cfg, tmp_path / "b", slots, runner=fake_runner(steps=3)).start()
    ev_a, ev_b = _drain(a), _drain(b)
    assert [e[0] for e in ev_a] == ["step"] * 5 + ["done"]
    assert all("stage_obj" not in e[1] for e in ev_a[:-1])
    assert ev_b[0] == ("waiting", None) and ev_b[-1][0] == "done"  # b waited for a's slot
    assert slots.busy == 0


def test_run_job_cancel_and_errors_leave_the_slot_free(tmp_path):
    slots = Slots(1)
    job = RunJob("sds", SDSConfig(prompt="a red cube"), tmp_path, slots,
                 runner=fake_runner(steps=10_000, delay=0.01)).start()
    assert job.events.get(timeout=10)[0] == "step"
    job.cancel()
    ev = _drain(job)
    assert ev[-1][0] == "cancelled" and "checkpoint saved" in ev[-1][1]
    bad = RunJob("sds", SDSConfig(prompt="a purple elephant"), tmp_path, slots,
                 runner=fake_runner(fail_on="elephant")).start()
    assert _drain(bad)[-1] == ("error", "prompt 'a purple elephant' is not a ShapeWorld object")

    def crash(*a, **k):
        raise RuntimeError("boom")

    assert _drain(RunJob("sds", SDSConfig(prompt="x"), tmp_path, slots, runner=crash).start())[-1] == \
        ("error", "RuntimeError: boom")
    assert slots.busy == 0


def test_job_manager_one_run_per_session(settings, monkeypatch):
    monkeypatch.setattr(core, "run_method", fake_runner(steps=10_000, delay=0.01))
    m = JobManager(settings)
    job = m.start_run("s1", "sds", SDSConfig(prompt="a red cube"))
    with pytest.raises(UserError, match="still going"):
        m.start_run("s1", "sds", SDSConfig(prompt="a red cube"))
    assert not m.cancel_run("other-session")
    assert m.cancel_run("s1")
    assert _drain(job)[-1][0] == "cancelled"


def test_batch_isolates_failures_and_zips_results(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "run_method", fake_runner(steps=3, fail_on="elephant"))
    job = BatchJob("sds", SDSConfig(steps=3), ["a red cube", "a purple elephant", "a blue ball"],
                   tmp_path / "batch", Slots(1)).start()
    job.thread.join(30)
    status = {r["prompt"]: r["status"] for r in job.rows}
    assert status == {"a red cube": "done", "a purple elephant": "failed", "a blue ball": "done"}
    assert "not a ShapeWorld object" in job.rows[1]["message"]
    assert job.rows[0]["psnr"] == 20.0 and job.rows[0]["progress"].startswith("3/3")
    assert "2/3 done, 1 failed" in job.summary()
    files = job.result_files()
    assert files[0].endswith("results.zip") and any(f.endswith("model.ply") for f in files)
    import zipfile

    names = zipfile.ZipFile(files[0]).namelist()
    assert "a-red-cube/model.ply" in names and not any("checkpoints" in n for n in names)
    assert (tmp_path / "batch" / "batch_summary.json").exists()


def test_gallery_scans_runs_and_rejects_paths_outside_the_output_folder(settings, tmp_path):
    run = fake_runner(steps=2)
    run("sds", SDSConfig(prompt="a red cube"), settings.out / "r1", callbacks=[])
    time.sleep(0.02)
    run("sds", SDSConfig(prompt="a blue ball"), settings.out / "batch-x", callbacks=[])
    (settings.out / "junk").mkdir()
    runs = core.scan_runs(settings.out)
    assert [r.prompt for r in runs] == ["a blue ball", "a red cube"]
    assert runs[0].status == "done" and "PSNR 20.0" in runs[0].caption()
    assert core.run_dir_in_out(str(runs[0].run_dir), settings) == runs[0].run_dir.resolve()
    for bad in ("/etc", str(tmp_path), "", str(settings.out / ".." / "models")):
        with pytest.raises(UserError, match="not in the app's output folder"):
            core.run_dir_in_out(bad, settings)
    assert core.viewer_file(runs[0].run_dir) == str(runs[0].run_dir / "model.ply")  # unreadable PLY: shown as is
    assert [Path(f).name for f in core.artefacts(runs[0].run_dir)][:2] == ["model.ply", "turntable.mp4"]
    md = core.metrics_markdown({"ground_truth": {"psnr": 20.0, "iou": 0.9}, "n_gaussians": 10})
    assert "PSNR (dB) | 20.00" in md and "mask IoU | 0.900" in md


def test_viewer_copy_turns_the_splat_for_gsplat_js(tmp_path):
    import torch

    from studio.io.ply import read_ply, write_ply

    def rot(q):
        w, x, y, z = (q / q.norm()).tolist()
        return torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                             [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                             [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])

    g = torch.Generator().manual_seed(0)
    means, quats = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
    write_ply(tmp_path / "model.ply", means, torch.randn(5, 3, generator=g), quats, torch.randn(5, generator=g),
              torch.randn(5, 4, 3, generator=g))
    shown = core.viewer_file(tmp_path)
    assert shown == str(tmp_path / "viewer" / "model.ply")
    d = read_ply(shown)
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(d["means"], means @ flip)
    for q_old, q_new in zip(quats, d["quats"]):
        assert torch.allclose(rot(q_new), flip @ rot(q_old), atol=1e-5)
    assert d["sh_degree"] == 0
    assert [Path(f).name for f in core.artefacts(tmp_path)] == ["model.ply"]  # the download is the original


# -- the Gradio app, handlers called directly ---------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from studio.app import build_app

    tmp = tmp_path_factory.mktemp("app")
    (tmp / "models").mkdir()
    return build_app(AppSettings(out=tmp / "out", models_dir=tmp / "models"))


def _kind_tab(app):
    return app.studio_tabs["3d"]


def _form_values(tab, **overrides):
    values = {c: c.value for c in tab.form_components}
    by_path = {**tab.primary, **tab.advanced[tab.default_method]}
    for path, v in overrides.items():
        values[by_path[path]] = v
    return values


def test_app_tabs_come_from_the_registry(app):
    tab = _kind_tab(app)
    assert tab.kind == "3d"
    from methods.registry import method_names

    assert set(tab.classes) == set(method_names("3d"))
    assert {"prompt", "stage.negative_prompt", "teacher", "steps", "resolution", "guidance_scale", "seed"} <= \
        set(tab.primary)
    assert "stage.batch_size" in tab.advanced["sds"] and "lora_rank" in tab.advanced.get("vsd", {"lora_rank": 0})
    cfg = app.get_config_file()
    labels = {c.get("props", {}).get("label") for c in cfg["components"]}
    assert {"Text to 3D", "Batch", "Gallery"} <= labels


def test_stream_handler_runs_reports_errors_and_stays_usable(app):
    tab = _kind_tab(app)
    out = list(tab.stream(_form_values(tab), "unit"))  # empty prompt
    assert len(out) == 1 and "the prompt is empty" in out[0][tab.status]
    assert out[0][tab.run_btn]["interactive"] is True
    out = list(tab.stream(_form_values(tab, prompt="a red cube", teacher="/etc"), "unit"))
    assert "outside the models folder" in out[-1][tab.status]
    out = list(tab.stream(_form_values(tab, prompt="a purple elephant", steps=3, resolution=32), "unit"))
    assert "Error" in out[-1][tab.status] and "a purple elephant" in out[-1][tab.status]
    small = {"prompt": "a red cube", "steps": 4, "resolution": 32, "stage.batch_size": 1, "stage.init_points": 300,
             "turntable_frames": 4, "turntable_size": 32}
    out = list(tab.stream(_form_values(tab, **small), "unit"))
    final = out[-1]
    assert final[tab.status].startswith("Done"), final[tab.status]
    assert final[tab.model3d]["value"].endswith("model.ply")
    assert final[tab.video]["value"].endswith("turntable.mp4") and "PSNR" in final[tab.metrics]
    assert final[tab.model3d]["visible"] is True and final[tab.video]["visible"] is True
    assert {Path(f).name for f in final[tab.files]} >= {"model.ply", "model.splat", "turntable.mp4", "metrics.json"}
    assert 'data-step="4"' in final[tab.progress]
    assert any(tab.loss in o and len(o[tab.loss]) > 0 for o in out)
    # the run is in the gallery and its config refills the form
    runs = core.scan_runs(tab.settings.out)
    r = [r for r in runs if r.prompt == "a red cube"][0]
    fill = tab.fill_updates(r.config)
    assert fill[tab.method] == "sds" and fill[tab.primary["steps"]] == 4
    assert fill[tab.advanced["sds"]["stage.init_points"]] == 300


def test_a_new_kind_gets_its_own_tab(tmp_path, monkeypatch):
    import methods.registry as reg
    from studio.app import build_app

    @dataclasses.dataclass
    class Fake4DConfig(TextTo3DConfig):
        frames: int = 8

    class Fake4D(Method):
        name, kind, kind_title, description, paper = "fake4d", "4d", "Text to 4D", "a fake 4D method", "https://example.org"
        Config = Fake4DConfig

    monkeypatch.setitem(reg._REGISTRY, "fake4d", Fake4D)
    monkeypatch.setattr(reg, "_discover", lambda: {**reg._BUILTIN, "fake4d": "unused:Fake4D"})
    groups = core.methods_by_kind()
    assert groups["4d"] == [Fake4D] and "fake4d" not in [c.name for c in groups["3d"]]
    app = build_app(AppSettings(out=tmp_path / "out", models_dir=tmp_path))
    labels = {c.get("props", {}).get("label") for c in app.get_config_file()["components"]}
    assert "Text to 4D" in labels


def _fake_4d_run(run_dir: Path, frames: int = 3) -> Path:
    import torch

    from studio.io.ply import write_ply

    (run_dir / "ply").mkdir(parents=True)
    for t in range(frames):  # each frame's splat moves along x: the viewer copies differ by frame
        n = 4
        means = torch.zeros(n, 3) + torch.tensor([0.1 * t, 0.0, 0.0])
        write_ply(run_dir / "ply" / f"frame_{t:05d}.ply", means, torch.full((n, 3), -3.0),
                  torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1), torch.zeros(n), torch.zeros(n, 1, 3))
    for v in ("orbit.mp4", "time_sweep.mp4", "reconstruction.mp4"):
        (run_dir / v).write_bytes(b"not decoded here")
    (run_dir / "metrics.json").write_text('{"seconds": 1.0}')
    (run_dir / "config.yaml").write_text("method: dreamscene4d\nvideo: two_cross\n")
    return run_dir


def test_video_to_4d_tab_has_a_time_slider_over_the_frame_plys(app):
    from studio.io.ply import read_ply

    tab = app.studio_tabs["video-to-4d"]
    assert "dreamscene4d" in tab.classes and tab.input == "video"
    assert "video" in tab.primary  # a text box: a path or a scene name
    cfg = build_config(tab.classes["dreamscene4d"].Config, {"video": "two_cross"})
    assert cfg.video == "two_cross"
    run_dir = _fake_4d_run(tab.settings.out / "fake4d")
    assert [Path(f).name for f in core.frame_plys(run_dir)] == [f"frame_{t:05d}.ply" for t in range(3)]
    upd = tab.result_updates(run_dir, {"seconds": 1.0})
    slider = upd[tab.time]
    assert slider["visible"] is True and (slider["minimum"], slider["maximum"], slider["step"]) == (0, 2, 1)
    assert upd[tab.model3d]["value"].endswith("frame_00000.ply")  # no model.ply: the first frame
    assert upd[tab.shown_run] == str(run_dir)
    shown = [tab.frame_changed(i, upd[tab.shown_run])["value"] for i in range(3)]
    assert [Path(p).name for p in shown] == [f"frame_{t:05d}.ply" for t in range(3)]
    assert len(set(shown)) == 3 and all(Path(p).parent.name == "viewer" for p in shown)
    xs = [float(read_ply(p)["means"][0, 0]) for p in shown]
    assert xs == pytest.approx([0.0, 0.1, 0.2], abs=1e-6)  # each slider position shows its own frame
    assert tab.frame_changed(99, str(run_dir))["value"] == shown[-1]  # clamped
    # the videos: all of the run's MP4s offered, the player accepts only those
    pick = upd[tab.video_pick]
    assert pick["visible"] is True and {n for n, _ in pick["choices"]} == {"orbit.mp4", "time_sweep.mp4",
                                                                           "reconstruction.mp4"}
    assert upd[tab.video]["value"] == pick["value"]
    sweep = str(run_dir / "time_sweep.mp4")
    assert tab.video_changed(sweep, str(run_dir))["value"] == sweep
    assert "value" not in tab.video_changed("/etc/passwd", str(run_dir))
    # a 3D run (no frame sequence) hides the slider
    plain = tab.settings.out / "plain"
    plain.mkdir()
    assert tab.result_updates(plain, None)[tab.time]["visible"] is False
