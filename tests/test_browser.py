"""End to end in a real browser, in best mode (the default): the demo, four clicks, the patch preview and then
the pixel classifier's heatmap and mask, the threshold, prototypes, batch over the whole stack, the TIFF; a
reload that finds the work again; a PNG segmented; a prototype applied to a stack whose channels are in another
order, its channel found by name.

Each test starts its own ``streamlit run app.py`` on a free 127.0.0.1 port (own process group, killed
afterwards), so no test resumes another's work on the demo, and drives it with Playwright and Debian's chromium
(/usr/bin/chromium; never ``playwright install``). Everything the app writes goes to temporary folders (cache,
demo, uploads, outputs, scratch, workspaces: ui.testing.app_environment). Screenshots go to
$PROTOSCOPE_SCREENSHOT_DIR (default: test-artifacts/, git-ignored); docs/screenshots/ holds some of them.
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
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from core.demo import make_demo
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


@contextmanager
def running_app(base: Path, out: Path, data_root: Path | None = None):
    """(base URL, folders) of a running app: cache and demo shared under ``base`` (slices embedded by one test
    are cached for the next), outputs in ``out``, private scratch and workspace folders, the data root."""
    app_env = app_environment(base, data_root=data_root)
    app_env["PROTOSCOPE_OUTPUT_DIR"] = str(out)
    folders = {"demo": Path(app_env["PROTOSCOPE_DEMO_DIR"]), "out": out,
               "workspaces": Path(app_env["PROTOSCOPE_WORKSPACES"])}
    port = _free_port()
    env = {**os.environ, **app_env}
    log_path = out.parent / f"{out.name}-streamlit.log"
    log = open(log_path, "wb")
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
                raise RuntimeError(f"streamlit did not start; see {log_path}")
            time.sleep(0.2)  # polling the health endpoint, not waiting for the UI
        yield url, folders
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def app_server(tmp_path_factory, tmp_path):
    """An app of its own for one test (its workspaces are its own: opening the demo resumes no other test's work)."""
    with running_app(tmp_path_factory.getbasetemp(), tmp_path / "browser-out") as server:
        yield server


@contextmanager
def browser_page(viewport=(1400, 1000)):
    """A Playwright page in Debian's chromium (closed afterwards)."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True)
            page.set_default_timeout(120_000)
            yield page
        finally:
            browser.close()


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


def _click_points(page, positive, negative, scale: float = DISPLAY_SCALE) -> None:
    """Click two positive, then two negative (x, y) image points on the Segment page's canvas (drawn ``scale``
    display px per image px), each time waiting for the app to count it."""
    target = page.locator("canvas.upper-canvas")
    target.wait_for()
    clicks = 0
    for label, points in (("positive", positive), ("negative", negative)):
        if label == "negative":
            page.get_by_text("negative point (background)").click()
            # the radio remounts the canvas under a key ending in the label (-1): click that one
            target = page.locator('[class*="st-key-segment-canvas-"][class*="--1 "] canvas.upper-canvas')
            target.wait_for()
            _wait_idle(page)
        for x, y in points:
            target.click(position={"x": (x + 0.5) * scale, "y": (y + 0.5) * scale})
            clicks += 1
            n_pos, n_neg = min(clicks, len(positive)), max(0, clicks - len(positive))
            page.get_by_text(f"{n_pos} positive, {n_neg} negative").wait_for()
            # a click with negatives shows the live mask, then reruns for the forest's: let that run end first
            # (a click landing during the rerun can be lost: noted in the closing note of stop 10)
            _wait_idle(page)
            if clicks == 1:  # positives only: best mode shows the patch-level preview and asks for background
                page.get_by_text("needs negative points too").wait_for()
    # the last click's run draws the preview, trains the pixel classifier and reruns with its result
    _wait_idle(page)


def _no_unexpected_error(page) -> None:
    assert page.get_by_text("Unexpected error").count() == 0, page.get_by_text("Unexpected error").first.inner_text()


def _choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the selectbox labelled ``label``."""
    page.get_by_role("combobox", name=label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()
    _wait_idle(page)


def _expect_selected(page, label: str, option: str) -> None:
    """Wait until the selectbox labelled ``label`` shows ``option`` (its value is the text input's value)."""
    from playwright.sync_api import expect

    expect(page.get_by_role("combobox", name=label, exact=True)).to_have_value(option)


def _open_from_data_root(page, name: str) -> None:
    """Open the stack file ``name`` of the data root's top folder on the Open sample page."""
    page.get_by_text("File in the data root").click()
    _wait_idle(page)
    _choose(page, "Stack file", name)
    page.get_by_role("button", name="Open file").click()
    page.get_by_role("heading", name="Channels").wait_for()
    _wait_idle(page)


def _save_prototype(page) -> str:
    """Press Save prototypes (the first prototype of the session); the saved prototype's name, read from its
    download button (the 'Saved ...' message lasts only until the next run)."""
    page.get_by_role("button", name="Save prototypes").click()
    download = page.get_by_role("button", name=re.compile(r"^Download .+\.npz$"))
    download.first.wait_for()
    _wait_idle(page)
    return re.fullmatch(r"Download (.+)\.npz", download.first.inner_text().strip()).group(1)


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
            _click_points(page, positive, negative)
            page.get_by_text("Mask area (px)").wait_for()
            page.get_by_text(re.compile(r"Server time: (patch|live linear) preview \d+ ms, then pixel classifier \d+ ms")).wait_for()
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

            name = _save_prototype(page)
            page.get_by_role("button", name=f"Download {name}.npz").wait_for()

            page.get_by_role("link", name="Batch").first.click()
            page.get_by_role("button", name="Run batch").click()
            page.get_by_text("Batch finished").wait_for(timeout=240_000)
            montage = page.get_by_text("Montage").first
            montage.wait_for()
            page.locator("[data-testid=stPlotlyChart] .main-svg").first.wait_for()
            # under the result: the orthogonal views with the mask outline and the 3-D view of the masks
            page.get_by_text("In 3-D").wait_for()
            page.get_by_text(re.compile(r"connected piece")).first.wait_for()
            page.locator("[data-testid=stPlotlyChart]").nth(1).wait_for()  # the 3-D view beside the area plot
            page.locator("[data-testid=stPlotlyChart] .gl-container canvas").first.wait_for()
            _wait_idle(page)
            _no_unexpected_error(page)
            page.get_by_text("In 3-D").evaluate("e => e.scrollIntoView({block: 'start'})")
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


# ---- issue 11: a reload keeps the work, a PNG is segmented, a prototype finds its channel by name -----------------


def test_a_reload_finds_the_points_and_the_prototype_again(app_server):
    """Issue 11, point 4: a reload lost the sample, the points and the saved prototypes, silently. The tab's
    workspace id stays in its address (?ws=), so the reloaded tab's new session restores its work."""
    import tifffile

    url, folders = app_server
    with browser_page() as page:
        page.goto(url)
        page.get_by_role("button", name="Open the synthetic demo").click()
        page.get_by_text("synthetic demo, not a real sample").wait_for()
        page.get_by_role("link", name="Segment").first.click()
        page.get_by_text("Click positive points on the structure").wait_for()
        demo = next(folders["demo"].glob("*.ome.tif"))
        with tifffile.TiffFile(demo) as tif:
            truth = tif.series[0].asarray()[Z, 1] > 0
        positive, negative = seed_points(truth)
        _click_points(page, positive, negative)
        page.get_by_text("Mask area (px)").wait_for()
        name = _save_prototype(page)
        assert "ws=" in page.url

        page.reload()
        page.get_by_text("2 positive, 2 negative on 1 slice(s)").wait_for()  # the Points summary of Segment
        page.get_by_text("Mask area (px)").wait_for()  # the restored points segment the slice again
        _wait_idle(page)
        _no_unexpected_error(page)
        assert page.get_by_text("is open in another tab or session").count() == 0  # its own old session, not a conflict
        page.get_by_role("button", name=f"Download {name}.npz").wait_for()
        page.get_by_test_id("stSidebar").get_by_text("Workspace", exact=True).click()  # the sidebar's Workspace box
        page.get_by_text(re.compile(r"^Saved \d\d:\d\d:\d\d · workspace")).wait_for()
        page.screenshot(path=str(_screenshot_dir() / "restore.png"), full_page=True)

        page.get_by_role("link", name="Batch").first.click()
        page.get_by_text("saved in this session (1)").wait_for()  # the Batch page's list of saved prototypes
        _expect_selected(page, "Saved prototype", name)
        _no_unexpected_error(page)
    saved = list(folders["workspaces"].glob("*/workspace.json"))
    assert len(saved) == 1 and len(list(saved[0].parent.glob("prototypes/*.npz"))) == 1


def _demo_slice_uint8(seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(256, 256) uint8 image with bright winding vessels on a dark background, and its (256, 256) bool truth."""
    image, mask = make_demo(shape=(1, 256, 256), seed=seed)
    image = image[0].astype(np.float64)
    low, high = np.percentile(image, [1, 99.8])
    return (np.clip((image - low) / (high - low), 0, 1) * 255).round().astype(np.uint8), mask[0] > 0


def test_a_png_opens_and_is_segmented(tmp_path_factory, tmp_path):
    """Issue 11, point 1: a PNG opened, then Segment showed 'Unexpected error (AttributeError: 'bytes' object has
    no attribute 'nbytes')'. An 8-bit grey PNG from the data root: four clicks give a mask and its area."""
    from PIL import Image

    root = tmp_path / "root"
    root.mkdir()
    image, truth = _demo_slice_uint8()
    Image.fromarray(image, mode="L").save(root / "vessels.png")
    with running_app(tmp_path_factory.getbasetemp(), tmp_path / "out", data_root=root) as (url, _), \
            browser_page() as page:
        page.goto(url)
        _open_from_data_root(page, "vessels.png")
        page.get_by_text("vessels.png").first.wait_for()
        page.get_by_role("link", name="Segment").first.click()
        page.get_by_text("Click positive points on the structure").wait_for()
        positive, negative = seed_points(truth)
        _click_points(page, positive, negative)
        page.get_by_text("Mask area (px)").wait_for()
        _wait_idle(page)
        _no_unexpected_error(page)
        area = _metric(page, "Mask area (px)")
        assert 0 < area < truth.size
        page.screenshot(path=str(_screenshot_dir() / "png.png"), full_page=True)


def _named_stack(path: Path, channels: dict[str, np.ndarray]) -> None:
    """An OME-TIFF (Z, C, Y, X) with one named channel per entry of ``channels`` ((Z, Y, X) arrays), in order."""
    import tifffile

    data = np.stack([np.asarray(a, np.uint16) for a in channels.values()], axis=1)
    tifffile.imwrite(path, data, metadata={"axes": "ZCYX", "Channel": {"Name": list(channels)}})


def test_a_prototype_applies_to_another_stack_by_its_channel_name(tmp_path_factory, tmp_path):
    """Issue 11, point 2: the other stack's channel was a bare number defaulting to 0 (or to the name rules'
    image channel), and a prototype built on 'Vessels' was applied to whatever that was, without a word. Stack B
    has its channels in another order (truth, autofluorescence, vessels): the picker starts at B's 'Vessels'."""
    import tifffile

    root = tmp_path / "root"
    root.mkdir()
    n_z = 6
    image_a, mask_a = make_demo(shape=(n_z, 256, 256), seed=11)
    image_b, mask_b = make_demo(shape=(n_z, 256, 256), seed=12)
    rng = np.random.default_rng(0)
    autofluorescence = rng.normal(float(image_b.mean()), float(image_b.std()), image_b.shape).clip(0, 60000)
    _named_stack(root / "a.ome.tif", {"Vessels": image_a, "Ground truth": mask_a.astype(np.uint16) * 255})
    _named_stack(root / "b.ome.tif", {"Ground truth": mask_b.astype(np.uint16) * 255,
                                      "Autofluorescence": autofluorescence, "Vessels": image_b})
    with running_app(tmp_path_factory.getbasetemp(), tmp_path / "out", data_root=root) as (url, folders), \
            browser_page() as page:
        page.goto(url)
        _open_from_data_root(page, "a.ome.tif")
        _expect_selected(page, "Image channel", "0 · Vessels")
        page.get_by_role("link", name="Segment").first.click()
        page.get_by_text("Click positive points on the structure").wait_for()
        positive, negative = seed_points(mask_a[n_z // 2] > 0)
        _click_points(page, positive, negative)
        page.get_by_text("Mask area (px)").wait_for()
        _save_prototype(page)

        page.get_by_role("link", name="Batch").first.click()
        page.get_by_text("another stack in the data root").click()
        _wait_idle(page)
        path_box = page.get_by_label(re.compile("Path of the other stack"))
        path_box.fill("b.ome.tif")
        path_box.press("Enter")
        _wait_idle(page)
        _expect_selected(page, "Its image channel", "2 · Vessels")  # by the prototype's channel name, not by place
        assert page.get_by_text("This prototype was made on the channel").count() == 0
        page.get_by_role("button", name="Run batch").click()
        page.get_by_text("Batch finished").wait_for(timeout=240_000)
        _wait_idle(page)
        _no_unexpected_error(page)
    written = next(p for p in folders["out"].glob("b_*.tif") if not p.name.endswith(".ome.tif"))
    with tifffile.TiffFile(written) as tif:
        masks = tif.series[0].asarray() > 0
    truth = mask_b > 0
    dice = 2 * (masks & truth).sum() / (masks.sum() + truth.sum())
    assert dice > 0.5  # B's vessels, not its autofluorescence (whose masks would not follow the truth)
