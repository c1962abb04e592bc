"""The Gradio app in a real browser (Debian chromium driven by playwright).

The app runs in a subprocess on a free localhost port with a temporary output and models folder.
The tests type a ShapeWorld prompt, run a tiny generation and check the live progress, the 3D viewer
(a PLY), the turntable video (duration > 0 in the <video> element), the metrics and the downloads;
bad input shows its message; Cancel stops a run; the gallery reopens a run; a batch isolates a
failing prompt. Screenshots go to ``tests/artifacts/``.

Skipped (with the reason) when playwright or chromium is missing; ``.ci/run`` installs both.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _chromium() -> str | None:
    for c in (os.environ.get("STUDIO_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if c and os.path.exists(c):
            return c
    return None


try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium); "
                                                   "playwright's own browser download is not used"),
]

TINY = {"steps": "20", "resolution": "32"}
TINY_ADVANCED = {"stage-batch-size": "1", "stage-init-points": "500", "turntable-frames": "8", "turntable-size": "64"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    (tmp / "models").mkdir()
    port = _free_port()
    log = open(tmp / "app.log", "w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--out", str(tmp / "out"),
                             "--models-dir", str(tmp / "models")], cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the app did not start: {(tmp / 'app.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, app_url, request):
    ctx = browser.new_context(viewport={"width": 1440, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(app_url)
    pg.wait_for_selector("#run-3d-prompt textarea")
    yield pg
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    ctx.close()


def _fill_tiny(pg, prompt: str, steps: str = "20") -> None:
    pg.fill("#run-3d-prompt textarea", prompt)
    for k, v in dict(TINY, steps=steps).items():
        pg.fill(f"#run-3d-{k} input", v)
    pg.click("text=Advanced settings")
    for k, v in TINY_ADVANCED.items():
        pg.fill(f"#run-3d-sds-{k} input", v)


def _status(pg, tab: str = "3d") -> str:
    return pg.inner_text(f"#run-{tab}-status")


def _wait_status(pg, text: str, timeout_s: float, tab: str = "3d") -> str:
    pg.wait_for_function(f"(t) => (document.querySelector('#run-{tab}-status')?.innerText || '').includes(t)",
                         arg=text, timeout=timeout_s * 1000)
    return _status(pg, tab)


def _step(pg) -> int:
    return int(pg.get_attribute("#run-3d-progress .studio-progress", "data-step") or 0)


def _download_names(pg, sel: str) -> list[str]:
    return pg.eval_on_selector_all(f"{sel} a[href]", "els => els.map(e => decodeURIComponent(e.href).split('/').pop())")


def test_bad_input_shows_message_and_app_stays_usable(page):
    page.click("#run-3d-generate")
    assert "the prompt is empty" in _wait_status(page, "Error", 30)
    page.fill("#run-3d-prompt textarea", "a red cube")
    page.fill("#run-3d-steps input", "0")
    page.click("#run-3d-generate")
    assert "--steps must be a positive number" in _wait_status(page, "steps", 30)
    page.fill("#run-3d-steps input", "20")
    teacher = page.locator("#run-3d-teacher input")
    teacher.fill("/etc")
    teacher.press("Enter")
    page.click("#run-3d-generate")
    assert "outside the models folder" in _wait_status(page, "outside", 30)
    teacher.fill("no-such-teacher")
    teacher.press("Enter")
    page.click("#run-3d-generate")
    assert "unknown teacher 'no-such-teacher'" in _wait_status(page, "unknown teacher", 30)
    assert page.is_enabled("#run-3d-generate")


def test_generate_shows_progress_viewer_video_metrics_and_downloads(page):
    _fill_tiny(page, "a red cube")
    t0 = time.time()
    page.click("#run-3d-generate")
    # live progress: the bar advances with step count, it/s and ETA; a preview PNG appears
    page.wait_for_function("Number(document.querySelector('#run-3d-progress .studio-progress')?.dataset.step) > 0",
                           timeout=120_000)
    text = page.inner_text("#run-3d-progress")
    assert "/20" in text and "it/s" in text and "ETA" in text
    assert not page.is_enabled("#run-3d-generate") or "Done" in _status(page)
    # the live preview shows the loop's preview PNGs (previews/sds_<step>.png) while it runs
    page.wait_for_function("(document.querySelector('#run-3d-preview img')?.src || '').includes('sds_0')",
                           timeout=120_000)
    status = _wait_status(page, "Done", 180)
    print(f"run finished in {time.time() - t0:.1f}s: {status}")
    # the 3D viewer holds the PLY (Gaussian splat)
    href = page.get_attribute("#run-3d-model3d [data-testid=model3d-download-link]", "href")
    assert href and href.endswith("model.ply")
    page.wait_for_selector("#run-3d-model3d canvas", state="attached", timeout=30_000)
    # the turntable plays: its <video> has a duration
    page.wait_for_function("(document.querySelector('#run-3d-video video')?.duration || 0) > 0", timeout=30_000)
    # metrics and downloads
    metrics = page.inner_text("#run-3d-metrics")
    assert "PSNR" in metrics and "IoU" in metrics
    files = _download_names(page, "#run-3d-files")
    for name in ("model.ply", "model.splat", "turntable.mp4", "config.yaml", "metrics.json"):
        assert name in files
    assert page.locator("#run-3d-loss").count() == 1
    assert page.is_enabled("#run-3d-generate") and not page.is_enabled("#run-3d-cancel")
    page.evaluate("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_result.png"), full_page=True)


def test_gallery_lists_the_run_and_reopens_it(page):
    page.click("#tab-gallery-button")
    page.wait_for_selector("#gallery-grid button img, #gallery-grid img", timeout=30_000)
    page.locator("#gallery-grid img").first.click()
    page.wait_for_function("(document.querySelector('#gallery-config')?.innerText || '').includes('a red cube')")
    assert "PSNR" in page.inner_text("#gallery-metrics")
    page.click("#gallery-open")
    page.wait_for_function("document.querySelector('#run-3d-prompt textarea')?.value === 'a red cube'")
    assert page.input_value("#run-3d-steps input") == "20"
    assert "Opened run" in _wait_status(page, "Opened", 30)
    href = page.get_attribute("#run-3d-model3d [data-testid=model3d-download-link]", "href")
    assert href and href.endswith("model.ply")
    first_status = _status(page)
    # one click re-runs it with its config (into a new run folder)
    page.click("#tab-gallery-button")
    page.click("#gallery-rerun")
    page.wait_for_function("(t) => { const s = document.querySelector('#run-3d-status')?.innerText || '';"
                           " return s.includes('Done') && !s.includes(t); }", arg=first_status.split("`")[-1][-30:],
                           timeout=180_000)
    page.click("#tab-gallery-button")
    page.wait_for_function("document.querySelectorAll('#gallery-grid img').length >= 2", timeout=30_000)


def test_cancel_stops_a_run_cleanly(page):
    _fill_tiny(page, "a blue ball", steps="5000")
    page.click("#run-3d-generate")
    page.wait_for_function("Number(document.querySelector('#run-3d-progress .studio-progress')?.dataset.step) >= 2",
                           timeout=120_000)
    page.click("#run-3d-cancel")
    status = _wait_status(page, "Cancelled", 60)
    assert "checkpoint saved" in status
    assert _step(page) < 5000
    assert page.is_enabled("#run-3d-generate") and not page.is_enabled("#run-3d-cancel")


def test_batch_runs_in_background_and_isolates_failures(page):
    page.click("#tab-batch-button")
    page.fill("#batch-prompts textarea", "a purple elephant\na green torus")
    page.fill("#batch-steps input", "5")
    page.fill("#batch-resolution input", "32")
    page.click("#batch-start")
    page.wait_for_function("(document.querySelector('#batch-status')?.innerText || '').includes('finished')",
                           timeout=180_000)
    table = page.inner_text("#batch-table")
    assert "failed" in table and "not a ShapeWorld object" in table and "done" in table
    page.wait_for_function("document.querySelectorAll('#batch-files a[href]').length > 0", timeout=30_000)
    assert "results.zip" in _download_names(page, "#batch-files")


def test_video_generation_tab_samples_a_video_with_the_video_viewer(page):
    """Every run kind of the CLI is usable from the app: sampling a video shows it in the video player, with
    its metrics; no 3D viewer is offered for a video."""
    assert "video" in page.inner_text("#studio-title").lower()
    page.click("#tab-video-generate-button")
    page.fill("#run-video-generate-prompt textarea", "a red ball moving left")
    page.fill("#run-video-generate-steps input", "4")
    page.click("#run-video-generate-generate")
    status = _wait_status(page, "Done", 180, tab="video-generate")
    assert "a-red-ball-moving-left" in status
    page.wait_for_function("(document.querySelector('#run-video-generate-video video')?.duration || 0) > 0",
                           timeout=30_000)
    assert not page.locator("#run-video-generate-model3d").is_visible()
    assert "motion accuracy" in page.inner_text("#run-video-generate-metrics")
    assert "video.mp4" in _download_names(page, "#run-video-generate-files")
    # the video distillation tab offers its methods and no viewer before a run
    page.click("#tab-video-distill-button")
    assert not page.locator("#run-video-distill-model3d").is_visible()
    assert not page.locator("#run-video-distill-video").is_visible()
