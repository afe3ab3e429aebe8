"""Helpers for the app's tests (AppTest and the browser test); not used by the app itself.

Test hooks the app honours:

- environment: PROTOSCOPE_DATA_ROOT, PROTOSCOPE_DEMO_DIR, PROTOSCOPE_UPLOAD_DIR, PROTOSCOPE_OUTPUT_DIR,
  PROTOSCOPE_CACHE, PROTOSCOPE_TMP (scratch files) and PROTOSCOPE_WORKSPACES (temporary folders, so tests never
  write into the repository or ~/.cache) and PROTOSCOPE_UMAP_WARMUP=0 (no background numba compilation
  competing for the CPU);
- session state ``home.backbone_overrides``: DINOv2 config overrides used with random weights, e.g.
  ``TINY_DINOV2`` for a 2-layer model that loads in a second;
- the canvas: AppTest cannot click it, so a test writes the value the browser would send into
  ``st.session_state[<canvas key>]`` (``click``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from core.io import open_stack
from ui import canvas, render

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_DINOV2 = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
DEMO_SHAPE = (256, 256)


def app_environment(base: Path, data_root: Path | None = None) -> dict[str, str]:
    """Environment variables that keep everything the app writes under ``base`` (demo and cache shared by
    all tests of a session, so slices embedded by one test are cached for the next). The workspace folder is
    new on every call: an app that opens the demo would otherwise resume another test's work on it."""
    base.mkdir(parents=True, exist_ok=True)
    env = {
        "PROTOSCOPE_CACHE": str(base / "protoscope-cache"),
        "PROTOSCOPE_DEMO_DIR": str(base / "protoscope-demo"),
        "PROTOSCOPE_UPLOAD_DIR": str(base / "protoscope-uploads"),
        "PROTOSCOPE_OUTPUT_DIR": str(base / "protoscope-out"),
        "PROTOSCOPE_TMP": str(base / "protoscope-tmp"),
        "PROTOSCOPE_WORKSPACES": tempfile.mkdtemp(prefix="protoscope-workspaces-", dir=base),
        "PROTOSCOPE_UMAP_WARMUP": "0",
        "HF_HUB_OFFLINE": "1",
    }
    if data_root is not None:
        env["PROTOSCOPE_DATA_ROOT"] = str(data_root)
    return env


def new_app(timeout: float = 180):
    """An AppTest of app.py, run once (the home page)."""
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=timeout).run()


def open_demo(at):
    at.button(key="home.open_demo").click().run()
    return at


def goto(at, page: str):
    """Switch to 'home', 'segment', 'features', 'batch', 'evaluate' or 'refine' and run."""
    files = {"home": "app.py", "segment": "pages/1_Segment.py", "features": "pages/2_Feature_space.py",
             "batch": "pages/3_Batch.py", "evaluate": "pages/4_Evaluate.py", "refine": "pages/5_Refine.py"}
    return at.switch_page(files[page]).run()


def set_mode(at, mode: str):
    """Switch the pipeline mode ('best' is the default, 'thesis') with the radio of the page shown (the Open
    sample page's, else the sidebar's), and run."""
    keys = {r.key for r in at.radio}
    at.radio(key="_w.home.mode" if "_w.home.mode" in keys else "_w.sidebar.mode").set_value(mode).run()
    return at


def demo_truth(z: int) -> np.ndarray:
    """(256, 256) bool ground truth of the demo's slice z (channel 1), read from the demo the app wrote."""
    folder = Path(os.environ.get("PROTOSCOPE_DEMO_DIR", PROJECT_ROOT / "assets" / "demo"))
    with open_stack(next(folder.glob("*.ome.tif"))) as stack:
        return np.asarray(stack.read_slice(z, 1)) > 0


def seed_points(truth: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Two positive (x, y) deep inside the two largest structure pieces; two negative far from any structure."""
    inside = ndimage.distance_transform_edt(np.pad(truth, 1))[1:-1, 1:-1]  # the image edge counts as outside
    labels, count = ndimage.label(truth)
    sizes = ndimage.sum(truth, labels, range(1, count + 1))
    positive = []
    for label in np.argsort(sizes)[::-1][:2] + 1:
        depth = np.where(labels == label, inside, 0)
        y, x = np.unravel_index(np.argmax(depth), depth.shape)
        positive.append((int(x), int(y)))
    outside = ndimage.distance_transform_edt(~truth)
    margin = 20
    outside[:margin], outside[-margin:], outside[:, :margin], outside[:, -margin:] = 0, 0, 0, 0
    y1, x1 = np.unravel_index(np.argmax(outside), outside.shape)
    outside[max(0, y1 - 60):y1 + 60, max(0, x1 - 60):x1 + 60] = 0
    y2, x2 = np.unravel_index(np.argmax(outside), outside.shape)
    return positive, [(int(x1), int(y1)), (int(x2), int(y2))]


def canvas_key(at) -> str:
    """The key of the canvas the Segment page drew last."""
    return at.session_state["segment.canvas_last"][0]


def click(at, points_xy: Sequence[tuple[int, int]], label: str = "positive", slice_shape: tuple[int, int] = DEMO_SHAPE):
    """Click ``points_xy`` (image pixels) on the Segment page's canvas as ``label`` and run.

    Sets the radio first when needed (a run), then sends the canvas value with the slice's existing points
    in front, as the browser does.
    """
    if at.session_state["segment.label"] != label:
        at.radio(key="_w.segment.label").set_value(label).run()
    key = canvas_key(at)
    sid, z = key.split(".")[2], int(key.split(".")[3])  # segment.canvas.<stack id>.<z>.<width>.<gen>.<label>
    existing = at.session_state["segment.points"].get(sid, {}).get(z, [])
    display = render.display_size(slice_shape)
    at.session_state[key] = canvas.click_value(points_xy, display, slice_shape, existing=existing)
    return at.run()


def demo_with_saved_prototype(base: Path, output_dir: Path, monkeypatch, z: int):
    """The app on the demo after two positive and two negative clicks on slice ``z`` and *Save prototype*.

    ``base`` holds the shared test environment (cache, HF home), ``output_dir`` the server-side results;
    ``monkeypatch`` sets the environment for this test only.
    """
    env = app_environment(base)
    env["PROTOSCOPE_OUTPUT_DIR"] = str(output_dir)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    at = goto(open_demo(new_app(timeout=300)), "segment")
    positive, negative = seed_points(demo_truth(z))
    click(at, positive, "positive")
    click(at, negative, "negative")
    at.button(key="segment.save").click().run()
    return at


def shown_value(element):
    """What a browser shows for a widget it mounts from the last run's message alone: the value the server
    sent when it asked the browser to take it (``set_value``), else the widget's own default (a toggle off,
    a slider at its minimum), which the browser then sends back with the next interaction."""
    proto = element.proto
    value = proto.value if proto.set_value else proto.default
    return value[0] if hasattr(value, "__len__") and not isinstance(value, str) and len(value) == 1 else value


def rerun_unmounted(at, widgets: Sequence):
    """Run again as a browser that has not mounted ``widgets`` (elements of the last run) yet: their values
    are left out of the widget states it sends, as happens when a second run follows at once (the canvas
    reports its first value right after a page is entered) and the browser drew only the second run's
    elements."""
    skipped = {w.id for w in widgets}
    states = at._tree.get_widget_states()
    kept = [w for w in states.widgets if w.id not in skipped]
    del states.widgets[:]
    states.widgets.extend(kept)
    return at._tree._runner._run(states, timeout=at.default_timeout)
