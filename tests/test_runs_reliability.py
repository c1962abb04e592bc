"""The run skeleton's guarantees (issue: no run lost or silently wrong): distinct folders per prompt, no silent
overwrite, no folder behind a rejected run, resume only with the same config, finite numbers everywhere,
SIGTERM as Ctrl-C, metrics.json for every ending, short messages, quiet closed pipes, batch robustness."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tiny_methods import CountConfig, CountMethod  # noqa: E402

from studio.errors import UserError  # noqa: E402
from studio.runs.batch import read_prompts, run_batch  # noqa: E402
from studio.runs.skeleton import execute, prepare  # noqa: E402
from studio.train.loop import TrainingCancelled  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _run(out, prompt="a blue ball", **kw):
    opts = {k: kw.pop(k) for k in ("resume", "overwrite", "callbacks") if k in kw}
    return execute(CountMethod(), CountConfig(prompt=prompt, **kw), out, progress=False, **opts)


def test_prompts_with_one_slug_get_distinct_folders_and_find_them_again(tmp_path):
    dirs = [Path(_run(tmp_path, p)["run_dir"]) for p in ("a blue ball", "A Blue Ball!", "A BLUE BALL???")]
    assert len(set(dirs)) == 3 and dirs[0].name == "a-blue-ball"
    assert all(d.name.startswith("a-blue-ball") for d in dirs)
    for d, p in zip(dirs, ("a blue ball", "A Blue Ball!", "A BLUE BALL???")):
        assert yaml.safe_load((d / "config.yaml").read_text())["prompt"] == p
    # a resumed run of the second prompt finds its own folder again
    assert Path(_run(tmp_path, "A Blue Ball!", resume=True)["run_dir"]) == dirs[1]


def test_a_finished_run_is_never_replaced_silently(tmp_path):
    first = _run(tmp_path, steps=6)
    d = Path(first["run_dir"])
    with pytest.raises(UserError, match="already holds a finished run.*--overwrite"):
        _run(tmp_path, steps=2)
    assert json.loads((d / "metrics.json").read_text())["final_loss"] == first["final_loss"]
    assert yaml.safe_load((d / "config.yaml").read_text())["steps"] == 6
    (d / "my-notes.txt").write_text("mine")  # --overwrite replaces the run's records, not the user's files
    again = _run(tmp_path, steps=2, overwrite=True)
    assert (d / "my-notes.txt").read_text() == "mine"
    assert again["run_dir"] == str(d) and yaml.safe_load((d / "config.yaml").read_text())["steps"] == 2


def test_a_rejected_run_leaves_no_folder_and_does_not_touch_an_existing_one(tmp_path):
    with pytest.raises(UserError, match="empty"):
        _run(tmp_path, "  ")
    with pytest.raises(UserError, match="finite"):
        _run(tmp_path, lr=float("nan"))
    assert list(tmp_path.iterdir()) == []
    d = Path(_run(tmp_path)["run_dir"])
    before = (d / "config.yaml").read_text()
    with pytest.raises(UserError, match="--lr must be a finite number"):
        _run(tmp_path, lr=float("inf"), resume=True)
    assert (d / "config.yaml").read_text() == before


def test_resume_with_another_config_is_refused_naming_the_differences(tmp_path):
    with pytest.raises(TrainingCancelled):
        _run(tmp_path, steps=8, callbacks=[lambda rec: rec["step"] < 3])
    with pytest.raises(UserError, match=r"other options \(steps: 8 -> 9; lr: 0.1 -> 0.2\)"):
        _run(tmp_path, steps=9, lr=0.2, resume=True)
    done = _run(tmp_path, steps=8, resume=True)
    full = _run(tmp_path / "ref", steps=8)
    assert done["p"] == pytest.approx(full["p"], rel=1e-6)


def test_every_ending_writes_metrics_json(tmp_path):
    with pytest.raises(TrainingCancelled):
        _run(tmp_path, "cancelled run", steps=8, callbacks=[lambda rec: rec["step"] < 2])
    m = json.loads((tmp_path / "cancelled-run" / "metrics.json").read_text())
    assert m["status"] == "cancelled" and m["last_step"]["step"] == 2 and "checkpoint" in m["reason"]

    def interrupt(rec):
        if rec["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "interrupted run", steps=8, callbacks=[interrupt])
    m = json.loads((tmp_path / "interrupted-run" / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["last_step"]["step"] == 3
    assert (tmp_path / "interrupted-run" / "checkpoints").is_dir()


def test_non_finite_numbers_are_refused_everywhere(tmp_path):
    from methods.sds import SDSConfig, SDSMethod
    from studio.runs.video_generate import VideoGenerateConfig, VideoGenerateMethod

    for cfg, m, opt in ((SDSConfig(prompt="a red cube", guidance_scale=float("nan")), SDSMethod(), "--guidance-scale"),
                        (VideoGenerateConfig(prompt="a red ball", guidance_scale=float("inf")), VideoGenerateMethod(),
                         "--guidance-scale")):
        with pytest.raises(UserError, match=f"{opt} must be a finite number"):
            prepare(m, cfg)
    import dataclasses

    cfg = SDSConfig(prompt="a red cube")
    cfg = dataclasses.replace(cfg, stage=dataclasses.replace(cfg.stage, lr_means=float("nan")))
    with pytest.raises(UserError, match="--stage.lr-means must be a finite number"):
        prepare(SDSMethod(), cfg)


def _sub(code: str, *args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(REPO)]))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


RUNNER = """
import sys
from tiny_methods import CountConfig, CountMethod
from studio.runs.skeleton import execute
try:
    m = execute(CountMethod(), CountConfig(prompt="slow", steps=int(sys.argv[2]), delay=float(sys.argv[3])), sys.argv[1],
                resume=sys.argv[4] == "1", progress=False)
    print("train_seconds", m["train_seconds"])
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_sigterm_saves_a_checkpoint_and_resume_sums_train_seconds(tmp_path):
    p = _sub(RUNNER, str(tmp_path), "40", "0.05", "0")
    d = tmp_path / "slow"
    deadline = time.time() + 120
    while time.time() < deadline and not (d / "history.json").exists() and not (d / "checkpoints").is_dir():
        time.sleep(0.05)
    time.sleep(0.5)  # a few steps in
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    m = json.loads((d / "metrics.json").read_text())
    assert m["status"] == "interrupted" and "SIGTERM" in m["reason"]
    stopped_at = m["last_step"]["step"]
    assert 0 < stopped_at < 40 and (d / "checkpoints").is_dir()
    r = _sub(RUNNER, str(tmp_path), "40", "0.05", "1")
    out, err = r.communicate(timeout=120)
    assert r.returncode == 0, err
    done = json.loads((d / "metrics.json").read_text())
    assert done["status"] == "done"
    # 40 steps of >= 50 ms: the time of both segments is counted, not only the second one's
    assert done["train_seconds"] >= 40 * 0.05 * 0.95


def _cli(*args, stdin=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "studio", *args], capture_output=True, text=True, env=env, timeout=300)


def test_a_huge_prompt_is_not_echoed_whole(tmp_path):
    r = _cli("generate", "x" * 100_000, "--out", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr) < 2000, len(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_help_into_a_closed_pipe_is_quiet():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(f"{sys.executable} -m studio generate --help | head -1", shell=True, capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.stdout.strip() and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_batch_skips_a_non_utf8_line_and_runs_the_rest(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes(b"first prompt\n\xff\xfe broken \xc3\n# comment\nsecond prompt\nfirst prompt\n")
    prompts, skipped = read_prompts(f)
    assert prompts == ["first prompt", "second prompt"]
    assert len(skipped) == 1 and "line 2" in skipped[0]["error"] and "UTF-8" in skipped[0]["error"]
    rows = run_batch(prompts, CountConfig(steps=2), CountMethod(), tmp_path / "out", progress=False, skipped=skipped)
    assert [r["status"] for r in rows] == ["failed", "done", "done"]


def test_batch_keeps_prompts_with_one_slug_and_refuses_a_result_made_otherwise(tmp_path):
    out = tmp_path / "out"
    rows = run_batch(["a blue ball", "A Blue Ball!"], CountConfig(steps=2), CountMethod(), out, progress=False)
    assert [r["status"] for r in rows] == ["done", "done"] and rows[0]["folder"] != rows[1]["folder"]
    rows = run_batch(["a blue ball"], CountConfig(steps=2), CountMethod(), out, progress=False)
    assert rows[0]["status"] == "done"  # skipped: same config
    rows = run_batch(["a blue ball"], CountConfig(steps=3), CountMethod(), out, progress=False)
    assert rows[0]["status"] == "failed" and "steps: 2 -> 3" in rows[0]["error"]


def test_app_refuses_fractional_steps(tmp_path):
    from studio.app import build_app
    from studio.app.core import AppSettings

    app = build_app(AppSettings(out=tmp_path / "out", models_dir=tmp_path))
    tab = app.studio_tabs["3d"]
    assert getattr(tab.primary["steps"], "precision", None) is None  # Gradio would round 2.5 to 2
    values = {c: c.value for c in tab.form_components}
    values[tab.primary["prompt"]] = "a red cube"
    values[tab.primary["steps"]] = 2.5
    out = list(tab.stream(values, "unit"))
    assert "whole number" in out[-1][tab.status] and "2.5" in out[-1][tab.status]


def test_a_diverging_run_says_so_and_records_it(tmp_path):
    r = _cli("generate", "a red cube", "--steps", "3", "--stage.lr-means", "1e30", "--stage.init-points", "200",
             "--turntable-frames", "2", "--out", str(tmp_path))
    assert r.returncode == 1 and "training diverged" in r.stderr and "Traceback" not in r.stderr, r.stderr
    m = json.loads((tmp_path / "a-red-cube" / "metrics.json").read_text())
    assert m["status"] == "diverged" and "learning rate" in m["reason"]
