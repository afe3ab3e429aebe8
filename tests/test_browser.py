"""End to end in a real browser, in best mode (the default): the demo, four clicks, the patch preview and then
the pixel classifier's heatmap and mask, the threshold, prototypes, batch over the whole stack, the TIFF.

Starts ``streamlit run app.py`` on a free 127.0.0.1 port (own process group, killed afterwards) and drives
it with Playwright and Debian's chromium (/usr/bin/chromium; never ``playwright install``). Everything the
app writes goes to temporary folders (cache, demo, uploads, outputs). Screenshots go to
$PROTOSCOPE_SCREENSHOT_DIR (default: test-artifacts/, git-ignored); docs/screenshots/ holds two of them.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ui.testing import app_environment, seed_points

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
Z = 12  # the slice the Segment page opens on: the demo's 24 slices // 2
DISPLAY_SCALE = 2.0  # the demo's 256 px slices are drawn 512 px wide

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium "
                       "(scripts/run_tests.sh installs it with apt-get when it may)"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """(base URL, folders) of a running app with temporary cache, demo, upload and output folders."""
    base = tmp_path_factory.getbasetemp()
    # demo and cache are shared with the AppTest files (same folders): slices they embedded are reused
    app_env = app_environment(base)
    app_env["PROTOSCOPE_OUTPUT_DIR"] = str(base / "browser-out")
    folders = {"demo": Path(app_env["PROTOSCOPE_DEMO_DIR"]), "out": Path(app_env["PROTOSCOPE_OUTPUT_DIR"])}
    port = _free_port()
    env = {**os.environ, **app_env}
    log = open(base / "browser-streamlit.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start; see {base / 'browser-streamlit.log'}")
            time.sleep(0.2)  # polling the health endpoint, not waiting for the UI
        yield url, folders
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def _canvas_pixels(page) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.locator("canvas.dc-background-canvas").screenshot())).convert("RGB"))


def _cyan_pixels(rgb: np.ndarray) -> int:
    return int(((rgb[..., 0] < 90) & (rgb[..., 1] > 190) & (rgb[..., 2] > 190)).sum())


def _canvas_with_outline(page, timeout: float = 30.0) -> np.ndarray:
    """The canvas picture once the mask outline is drawn in it (the new background image loads after the run
    that sent it, and the DOM has no signal for that)."""
    deadline = time.monotonic() + timeout
    while True:
        pixels = _canvas_pixels(page)
        if _cyan_pixels(pixels) > 50 or time.monotonic() > deadline:
            return pixels


def _wait_idle(page) -> None:
    """Until the app's script run (started by the last widget change) has finished."""
    page.locator("[data-testid=stApp][data-test-script-state=notRunning]").wait_for()


def _metric(page, label: str) -> int:
    """The integer value of the metric labelled ``label``."""
    metric = page.get_by_test_id("stMetric").filter(has=page.get_by_text(label, exact=True))
    return int(metric.get_by_test_id("stMetricValue").inner_text().replace(",", ""))


def _screenshot_dir() -> Path:
    folder = Path(os.environ.get("PROTOSCOPE_SCREENSHOT_DIR", PROJECT_ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_demo_click_threshold_save_batch_download(app_server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    import tifffile

    url, folders = app_server
    shots = _screenshot_dir()
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page.set_default_timeout(60_000)
            page.goto(url)
            page.get_by_role("button", name="Open the synthetic demo").click()
            page.get_by_text("synthetic demo, not a real sample").wait_for()

            page.get_by_role("link", name="Segment").first.click()
            page.get_by_text("Click positive points on the structure").wait_for(timeout=120_000)
            target = page.locator("canvas.upper-canvas")
            target.wait_for()
            before = _canvas_pixels(page)

            demo = next(folders["demo"].glob("*.ome.tif"))
            with tifffile.TiffFile(demo) as tif:
                truth = tif.series[0].asarray()[Z, 1] > 0
            positive, negative = seed_points(truth)
            clicks = 0
            for label, points in (("positive", positive), ("negative", negative)):
                if label == "negative":
                    page.get_by_text("negative point (background)").click()
                    # the radio remounts the canvas under a key ending in the label (-1): click that one
                    target = page.locator('[class*="st-key-segment-canvas-"][class*="--1 "] canvas.upper-canvas')
                    target.wait_for()
                    _wait_idle(page)
                for x, y in points:
                    target.click(position={"x": (x + 0.5) * DISPLAY_SCALE, "y": (y + 0.5) * DISPLAY_SCALE})
                    clicks += 1
                    n_pos, n_neg = min(clicks, 2), max(0, clicks - 2)
                    page.get_by_text(f"{n_pos} positive, {n_neg} negative").wait_for()
                    if clicks == 1:  # positives only: best mode shows the patch-level preview and asks for background
                        page.get_by_text("needs negative points too").wait_for()
            # the last click's run draws the preview, trains the pixel classifier and reruns with its result
            _wait_idle(page)
            page.get_by_text("Mask area (px)").wait_for()
            page.get_by_text(re.compile(r"Server time: patch preview \d+ ms, then pixel classifier \d+ ms")).wait_for()
            after = _canvas_with_outline(page)
            # the heatmap is blended in (the picture changed) and the mask outline is drawn in cyan
            assert np.abs(after.astype(int) - before.astype(int)).mean() > 10
            assert _cyan_pixels(after) > 50
            page.screenshot(path=str(shots / "segment.png"), full_page=True)

            # best mode's threshold is calibrated on the points; the absolute-score slider starts at it and
            # takes over when moved: ten steps of 0.01 up make the mask smaller
            area = _metric(page, "Mask area (px)")
            slider = page.get_by_role("slider", name="Absolute score")
            start_value = float(slider.input_value())
            slider.focus()
            for _ in range(10):
                page.keyboard.press("ArrowRight")
            page.wait_for_function("([e, v]) => Math.abs(parseFloat(e.value) - v) < 1e-6",
                                   arg=[slider.element_handle(), round(start_value + 0.1, 2)])
            _wait_idle(page)
            page.get_by_test_id("stMetricValue").first.filter(has_not_text=f"{area:,}").wait_for()
            _wait_idle(page)
            new_area = _metric(page, "Mask area (px)")
            assert new_area < area

            page.get_by_role("button", name="Save prototypes").click()
            page.get_by_text("Saved 'prototype-1'").wait_for()
            page.get_by_role("button", name="Download prototype-1.npz").wait_for()

            page.get_by_role("link", name="Batch").first.click()
            page.get_by_role("button", name="Run batch").click()
            page.get_by_text("Batch finished").wait_for(timeout=240_000)
            montage = page.get_by_text("Montage").first
            montage.wait_for()
            page.locator("[data-testid=stPlotlyChart] .main-svg").first.wait_for()
            page.get_by_role("heading", name=re.compile("Result")).evaluate("e => e.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(shots / "batch.png"))

            with page.expect_download() as download_info:
                page.get_by_role("button", name=re.compile(r"Download Multi-page TIFF")).click()
            saved = tmp_path / download_info.value.suggested_filename
            download_info.value.save_as(saved)
        finally:
            browser.close()

    with tifffile.TiffFile(saved) as tif:
        masks = tif.series[0].asarray()
    assert masks.shape == (24, 256, 256)
    assert masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 255}
    # slice 12 is exactly the mask the Segment page showed after the threshold move (the saved threshold)
    assert int((masks[Z] == 255).sum()) == new_area
    # pixel-accurate masks that follow the vessels: mean Dice with the demo's ground truth well above chance
    with tifffile.TiffFile(demo) as tif:
        truths = tif.series[0].asarray()[:, 1] > 0
    dices = [2 * ((masks[z] == 255) & truths[z]).sum() / ((masks[z] == 255).sum() + truths[z].sum()) for z in range(24)]
    assert np.mean(dices) > 0.5
    hit = (masks[Z] == 255)
    assert hit[truth].mean() > 2 * hit[~truth].mean()


def test_heatmap_switches_keep_their_values_over_page_round_trips(app_server):
    """Issue 11, point 3: back on Segment from another page, the Heatmap and Mask outline switches showed off
    (and the opacity 0) in about 6 of 10 round trips. Some round trips go back before the other page has
    finished its run, some after."""
    playwright = pytest.importorskip("playwright.sync_api")
    url, _ = app_server
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(url)
            page.get_by_role("button", name="Open the synthetic demo").click()
            page.get_by_text("synthetic demo, not a real sample").wait_for()
            page.get_by_role("link", name="Segment").first.click()
            page.get_by_text("Click positive points on the structure").wait_for()
            _wait_idle(page)

            def switches():
                return (page.get_by_role("switch", name="Heatmap").is_checked(),
                        page.get_by_role("switch", name="Mask outline").is_checked(),
                        page.get_by_role("slider", name="Heatmap opacity").input_value())

            assert switches() == (True, True, "0.5")
            for trip in range(10):
                page.get_by_role("link", name="Feature space").first.click()
                if trip % 2:  # leave before the Feature space run has finished
                    page.get_by_role("heading", name="Feature space").wait_for()
                else:
                    page.get_by_role("heading", name="Feature space").wait_for()
                    _wait_idle(page)
                page.get_by_role("link", name="Segment").first.click()
                page.get_by_role("switch", name="Heatmap").wait_for()
                _wait_idle(page)
                assert switches() == (True, True, "0.5"), f"round trip {trip + 1}"
        finally:
            browser.close()
