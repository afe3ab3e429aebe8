"""Eight app sessions at once on two small synthetic stacks (four sessions each): each opens its stack, clicks its
own points, moves the threshold, saves its prototype and batch-applies it to the whole stack. Every session's
masks equal what core computes from that session's points alone (and session 0's equal a run of session 0 on its
own); no session sees another's points or prototypes; the extra memory stays within a stated bound.

Sessions are interleaved step by step in one thread (all eight open, then all eight click, ...), not run from
eight threads: AppTest is not thread-safe. Each ``AppTest.run`` installs its own mock as the process-wide
``Runtime._instance`` and sets it back to None when it ends (streamlit/testing/v1/app_test.py, ``_run``), and it
sets the class attribute ``PagesManager.uses_pages_directory`` and patches the global config, so a run ending in
one thread pulls the runtime from under a run in another. Checked with two threads: a script that sleeps while
another thread's run ends finds ``Runtime._instance`` gone, and its ``st.cache_data`` then falls back to a fresh
MemoryCacheStorageManager ("No runtime found"), which a server never does. The interleaving still shares everything sessions
share in a server: the process, ``st.cache_resource`` (stacks, backbones, embedders), the embedding cache on disk
and the output folder.

Memory: the resident set size is sampled every 20 ms from /proc/self/statm while the sessions run; the test
bounds the growth over the start (``MAX_EXTRA_MB``; measured values there). Thesis mode (exact, hand-checkable
patch scores) with the filter bank: the whole test takes ~20-30 s on the 2-core VM.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from core.batch import apply_prototype
from core.config import PipelineConfig
from core.demo import make_demo
from core.features.backbones import load_backbone
from core.features.embedding import SliceEmbedder
from core.features.embedding_cache import EmbeddingCache
from core.io import open_stack
from core.pipeline import build_prototype
from core.prototypes import PointSet
from core.thresholds import ThresholdSpec
from ui import testing

SHAPE = (8, 128, 128)  # (Z, Y, X) of each stack
Z = SHAPE[0] // 2  # the slice the Segment page opens on
STACKS = {"alpha.tif": 11, "beta.tif": 12}  # name -> demo seed
N_SESSIONS = 8
#: Bound on the growth of the resident set over the test's start while the lone reference session and the 8
#: sessions run. Measured on the 2-core VM (three runs): +238 to +243 MB (peak ~705 MB from ~464 MB), most of it
#: the pages' first imports (plotly, scikit-learn, the app's modules) in the first session; about twice that is
#: the bound.
MAX_EXTRA_MB = 500

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Two synthetic stacks (channel 0 image, channel 1 truth) in a data root."""
    root = tmp_path_factory.mktemp("load-root")
    for name, seed in STACKS.items():
        image, mask = make_demo(shape=SHAPE, seed=seed)
        tifffile.imwrite(root / name, np.stack([image, mask.astype(np.uint16)], axis=1), imagej=True,
                         resolution=(1 / 0.8, 1 / 0.8), metadata={"axes": "ZCYX", "spacing": 2.0, "unit": "um"})
    return root


def truth_slice(path: Path) -> np.ndarray:
    with open_stack(path) as stack:
        return np.asarray(stack.read_slice(Z, 1)) > 0


def session_points(truth: np.ndarray, k: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Two positive (x, y) inside the structure and two negative far from it, different for every ``k``."""
    rng = np.random.default_rng(100 + k)
    inside = ndimage.distance_transform_edt(np.pad(truth, 1))[1:-1, 1:-1]
    outside = ndimage.distance_transform_edt(~truth)
    outside[:8], outside[-8:], outside[:, :8], outside[:, -8:] = 0, 0, 0, 0
    rows, cols = np.nonzero(inside >= 2)
    positive = rng.choice(len(rows), 2, replace=False)
    rows_bg, cols_bg = np.nonzero(outside >= 8)
    negative = rng.choice(len(rows_bg), 2, replace=False)
    return ([(int(cols[i]), int(rows[i])) for i in positive],
            [(int(cols_bg[i]), int(rows_bg[i])) for i in negative])


class Session:
    """One simulated user: an AppTest and what it should do."""

    def __init__(self, index: int, stack: str, root: Path) -> None:
        self.index = index
        self.stack = stack
        self.positive, self.negative = session_points(truth_slice(root / stack), index)
        self.top = 6.0 + index  # the threshold this user moves to: top 6 % ... 13 %
        self.name = f"user{index}"
        self.at = None

    # the steps, each one or a few script runs
    def open(self) -> None:
        self.at = testing.new_app(timeout=300)
        self.at.radio(key="_w.home.source").set_value("File in the data root").run()
        self.at.selectbox(key="home.file_pick").set_value(self.stack).run()
        self.at.button(key="home.open_file").click().run()
        testing.set_mode(self.at, "thesis")
        testing.goto(self.at, "segment")

    def click(self) -> None:
        testing.click(self.at, self.positive, "positive", slice_shape=SHAPE[1:])
        testing.click(self.at, self.negative, "negative", slice_shape=SHAPE[1:])

    def threshold(self) -> None:
        self.at.slider(key="_w.segment.th_top").set_value(self.top).run()

    def save(self) -> None:
        self.at.text_input(key="segment.proto_name").input(self.name).run()
        self.at.button(key="segment.save").click().run()

    def batch(self) -> None:
        testing.goto(self.at, "batch")
        self.at.button(key="batch.run").click().run(timeout=300)

    STEPS = ("open", "click", "threshold", "save", "batch")

    def masks(self) -> np.ndarray:
        result = self.at.session_state["batch.result"]
        with tifffile.TiffFile(result.files["tif"]) as handle:
            return handle.series[0].asarray() == 255

    def point_set(self) -> PointSet:
        return PointSet(np.array([[x, y, Z] for x, y in self.positive]), np.array([[x, y, Z] for x, y in self.negative]))


def reference_masks(path: Path, session: Session, cache: EmbeddingCache) -> tuple[np.ndarray, object]:
    """(Z, Y, X) bool masks and the prototype core makes from the session's points alone (thesis mode)."""
    config = PipelineConfig.thesis()
    with open_stack(path) as stack:
        embedder = SliceEmbedder(stack, 0, load_backbone("filterbank"), config.preprocess, cache=cache)
        prototype = build_prototype(embedder, session.point_set(), config)
        masks = np.zeros(SHAPE, bool)
        apply_prototype(embedder, prototype, list(range(SHAPE[0])), masks.__setitem__,
                        threshold=ThresholdSpec("top", session.top))
    return masks, prototype


class RssSampler:
    """Peak resident set size (bytes) of this process, sampled every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.02) -> None:
        self.period = period
        self.start = self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="samples memory from /proc (Linux)")
def test_eight_sessions_on_two_stacks(data_root, tmp_path, tmp_path_factory, monkeypatch):
    env = testing.app_environment(tmp_path_factory.getbasetemp(), data_root=data_root)
    env["PROTOSCOPE_OUTPUT_DIR"] = str(tmp_path / "out")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    names = list(STACKS)
    sessions = [Session(i, names[i % 2], data_root) for i in range(N_SESSIONS)]
    assert len({(tuple(s.positive), tuple(s.negative)) for s in sessions}) == N_SESSIONS  # distinct points

    started = time.perf_counter()
    with RssSampler() as memory:
        # session 0's work with no other session in the process: the single-session run
        alone = Session(0, sessions[0].stack, data_root)
        for step in Session.STEPS:
            getattr(alone, step)()
        assert not alone.at.exception and not alone.at.error, [e.value for e in alone.at.error]
        alone_masks = alone.masks()
        alone.at = None
        # the eight, interleaved step by step
        for step in Session.STEPS:
            for session in sessions:
                getattr(session, step)()
                assert not session.at.exception, (session.index, step, session.at.exception)
                assert not session.at.error, (session.index, step, [e.value for e in session.at.error])
    seconds = time.perf_counter() - started
    extra_mb = (memory.peak - memory.start) / 1e6
    print(f"\n8 sessions + 1 alone: {seconds:.0f} s; RSS {memory.start / 1e6:.0f} MB at the start, peak "
          f"{memory.peak / 1e6:.0f} MB (+{extra_mb:.0f} MB)")

    cache = EmbeddingCache(env["PROTOSCOPE_CACHE"])
    np.testing.assert_array_equal(sessions[0].masks(), alone_masks)
    for session in sessions:
        state = session.at.session_state
        # only its own points and its own prototype
        points = state["segment.points"]
        assert len(points) == 1
        (per_slice,) = points.values()
        assert list(per_slice) == [Z]
        clicked = sorted((x, y, label) for x, y, label in per_slice[Z])
        expected = sorted([(x, y, 1) for x, y in session.positive] + [(x, y, -1) for x, y in session.negative])
        assert clicked == expected, session.index
        saved = state["segment.prototypes"]
        assert [p.name for p in saved] == [session.name]
        assert str(saved[0].prototype.config.threshold) == f"top:{session.top:g}"
        assert Path(state["home.sample"].path).name == session.stack
        # the masks core makes from this session's points alone
        masks, prototype = reference_masks(data_root / session.stack, session, cache)
        mine = saved[0].prototype
        np.testing.assert_array_equal(np.sort(mine.points.positive, axis=0), np.sort(session.point_set().positive, axis=0))
        np.testing.assert_array_equal(np.sort(mine.points.negative, axis=0), np.sort(session.point_set().negative, axis=0))
        np.testing.assert_allclose(mine.positive_references, prototype.positive_references, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(mine.negative_references, prototype.negative_references, rtol=1e-6, atol=1e-7)
        result = state["batch.result"].result
        assert result.z_values == list(range(SHAPE[0]))
        np.testing.assert_array_equal(session.masks(), masks, err_msg=f"session {session.index}")
        assert result.area_px == masks.sum(axis=(1, 2)).tolist()
    # different points and thresholds give different masks: the comparison above can tell sessions apart
    assert len({session.masks().tobytes() for session in sessions}) == N_SESSIONS
    assert extra_mb < MAX_EXTRA_MB, f"peak RSS grew by {extra_mb:.0f} MB (bound {MAX_EXTRA_MB} MB)"
