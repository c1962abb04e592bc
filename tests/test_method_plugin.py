"""A method of a brand-new kind, installed as a third-party package through the ``studio.methods`` entry point,
runs everywhere with no edit to core code: ``studio --help``, ``studio run``, ``studio batch`` and an app tab."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A throwaway plugin: "echo art", a kind the studio does not know, that writes a PNG of its prompt's length."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from studio.io import write_png
from studio.runs.protocol import Method


@dataclass
class EchoConfig:
    prompt: str = ""
    size: int = 8
    brightness: float = 0.5


class EchoArt(Method):
    name = "echo-art"
    kind = "echo"
    kind_title = "Echo art"
    description = "paints a square whose brightness is set by an option"
    paper = "https://example.org/echo"
    Config = EchoConfig
    input = "prompt"

    def run(self, cfg, run_dir: Path, *, callbacks=None, resume=False, progress=True) -> dict:
        for cb in callbacks or []:
            cb({"stage": "echo", "step": 1, "steps": 1, "loss": 0.0, "it_s": 1.0, "eta_s": 0.0})
        write_png(Path(run_dir) / "preview.png", torch.full((cfg.size, cfg.size, 3), cfg.brightness))
        return {"letters": len(cfg.prompt), "seconds": 0.0}
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The plugin as an installed distribution: a module plus a ``.dist-info`` with its entry point."""
    root = tmp_path_factory.mktemp("site")
    (root / "echo_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "echo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[studio.methods]\necho-art = echo_plugin:EchoArt\n")
    return root


def studio(plugin: Path, *args: str, cwd: Path | None = None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), str(REPO)]))
    return subprocess.run([sys.executable, "-m", "studio", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def test_plugin_in_help_cli_and_batch(plugin, tmp_path):
    r = studio(plugin, "--help")
    assert r.returncode == 0, r.stderr
    assert "echo-art" in r.stdout and "Echo art" in r.stdout and "studio run echo-art" in r.stdout
    r = studio(plugin, "run", "echo-art", "--help")
    assert r.returncode == 0 and "--brightness" in r.stdout
    r = studio(plugin, "run", "echo-art", "hello there", "--brightness", "0.25", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "o" / "hello-there"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "done" and m["letters"] == 11 and m["method"] == "echo-art"
    assert "brightness: 0.25" in (run_dir / "config.yaml").read_text()
    import imageio.v3 as iio

    assert abs(float(iio.imread(run_dir / "preview.png").mean()) / 255 - 0.25) < 0.01
    r = studio(plugin, "run", "echo-art", "hello", "--brightness", "nan", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--brightness must be a finite number" in r.stderr and "Traceback" not in r.stderr
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo words\n")
    r = studio(plugin, "batch", str(prompts), "--method", "echo-art", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert "2/2 done" in r.stdout
    assert json.loads((tmp_path / "b" / "two-words" / "metrics.json").read_text())["letters"] == 9


def test_plugin_gets_an_app_tab_that_runs_it(plugin, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin))
    import importlib

    importlib.invalidate_caches()
    from studio.app import build_app
    from studio.app.core import AppSettings

    app = build_app(AppSettings(out=tmp_path / "out", models_dir=tmp_path))
    assert "echo" in app.studio_tabs
    tab = app.studio_tabs["echo"]
    labels = {c.get("props", {}).get("label") for c in app.get_config_file()["components"]}
    assert "Echo art" in labels
    values = {c: c.value for c in tab.form_components}
    values[tab.primary["prompt"]] = "from the app"
    values[tab.advanced["echo-art"]["brightness"]] = 0.75
    final = list(tab.stream(values, "unit"))[-1]
    assert final[tab.status].startswith("Done"), final[tab.status]
    assert final[tab.preview].endswith("preview.png")
    assert final[tab.model3d]["visible"] is False and final[tab.video]["visible"] is False
    run_dir = Path(final[tab.preview]).parent
    assert json.loads((run_dir / "metrics.json").read_text())["letters"] == 12
