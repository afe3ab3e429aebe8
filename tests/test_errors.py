"""One error family: every problem a user can fix reaches the command line as exactly one ``error: ...`` line on
stderr and exit status 2, never a traceback (issue #10, point 6).

Each case runs ``python -m core ...`` in its own interpreter; the cases run two at a time in one fixture (most
import torch before they fail, ~3 s each), and each test reads its case's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.cli.main import error_line, main
from core.config import PipelineConfig
from core.errors import OptionError, PrototypeFileError, ThresholdError, ZSpecError
from core.features.registry import get_spec
from core.preprocess import PreprocessConfig
from core.prototypes import PointSet, Prototype, load_prototype, save_prototype

PROJECT = Path(__file__).resolve().parents[1]
DIM = get_spec("filterbank").embed_dim


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_prototype(path: Path) -> Path:
    """A valid filter-bank prototype file made without embedding anything: 2 positive, 1 negative patch."""
    positive, negative = unit_rows(2, 0), unit_rows(1, 1)
    prototype = Prototype(
        positive_references=positive.mean(axis=0, keepdims=True), negative_references=negative,
        positive_examples=positive, negative_examples=negative, config=PipelineConfig.thesis(),
        backbone="filterbank", weights_id="none", embed_dim=DIM,
        points=PointSet(np.array([[5, 5, 1], [20, 20, 1]]), np.array([[10, 20, 1]])),
    )
    return save_prototype(prototype, path)


def edited(source: Path, out: Path, *, metadata=None, arrays: dict | None = None) -> Path:
    """A copy of the prototype file ``source`` with its metadata changed by ``metadata(dict)`` and some arrays replaced."""
    with np.load(source, allow_pickle=False) as archive:
        contents = {key: archive[key] for key in archive.files}
    meta = json.loads(str(contents["metadata_json"]))
    if metadata is not None:
        metadata(meta)
    contents["metadata_json"] = np.array(json.dumps(meta))
    contents.update(arrays or {})
    np.savez(out, **contents)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("errors")
    stack = folder / "stack.tif"
    tifffile.imwrite(stack, np.arange(3 * 28 * 28, dtype=np.uint16).reshape(3, 28, 28), imagej=True,
                     metadata={"axes": "ZYX"})
    good = write_prototype(folder / "good.npz")
    (folder / "exists.tif").write_bytes(b"keep me")
    (folder / "junk.safetensors").write_bytes(b"this is not a model")
    return {
        "stack": stack, "good": good, "exists": folder / "exists.tif", "model": folder / "junk.safetensors",
        "out": folder / "masks.tif",
        "no_embed_dim": edited(good, folder / "no_embed_dim.npz", metadata=lambda m: m.pop("embed_dim")),
        "no_backbone": edited(good, folder / "no_backbone.npz", metadata=lambda m: m.pop("backbone")),
        "config_list": edited(good, folder / "config_list.npz", metadata=lambda m: m.update(config=["thesis"])),
        "banana": edited(good, folder / "banana.npz", metadata=lambda m: m["config"].update(negative_weight="banana")),
        "nan": edited(good, folder / "nan.npz", arrays={"positive_references": np.full((1, DIM), np.nan, np.float32)}),
        "int8": edited(good, folder / "int8.npz", arrays={"positive_examples": np.ones((2, DIM), np.int8)}),
        "short": edited(good, folder / "short.npz", arrays={"negative_examples": np.ones((1, DIM - 1), np.float32)}),
    }


def case_arguments(f: dict[str, Path]) -> dict[str, list]:
    apply = ["apply", f["stack"], "--out", f["out"], "--no-cache"]
    return {
        "clip_low": [*apply, "--prototype", f["good"], "--option", "clip_low=99"],
        "image_size": [*apply, "--prototype", f["good"], "--option", "image_size=0"],
        "unknown_option": [*apply, "--prototype", f["good"], "--option", "colour=red"],
        "threshold": [*apply, "--prototype", f["good"], "--threshold", "top:150"],
        "z_spec": ["export", f["stack"], "--z", "0:9", "--out", f["out"]],
        "no_embed_dim": [*apply, "--prototype", f["no_embed_dim"]],
        "no_backbone": [*apply, "--prototype", f["no_backbone"]],
        "config_list": [*apply, "--prototype", f["config_list"]],
        "banana": [*apply, "--prototype", f["banana"]],
        "nan": [*apply, "--prototype", f["nan"]],
        "int8": [*apply, "--prototype", f["int8"]],
        "short": [*apply, "--prototype", f["short"]],
        "missing_stack": ["info", f["stack"].with_name("nope.tif")],
        "missing_prototype": [*apply, "--prototype", f["good"].with_name("nope.npz")],
        "output_exists": ["export", f["stack"], "--out", f["exists"]],
        "unwritable_output": ["export", f["stack"], "--out", "/proc/protoscope-masks.tif"],
        "model_file": ["refine", "apply", f["stack"], "--model", f["model"], "--out", f["out"]],
    }


#: case -> text the one error line must contain (the option, value or file it is about)
EXPECTED = {
    "clip_low": "clip_low=99",
    "image_size": "image_size",
    "unknown_option": "'colour'",
    "threshold": "top:P",
    "z_spec": "'0:9' ends outside the stack",
    "no_embed_dim": "no_embed_dim.npz: metadata lacks 'embed_dim'",
    "no_backbone": "no_backbone.npz: metadata lacks 'backbone'",
    "config_list": "config_list.npz: metadata 'config' is invalid",
    "banana": "negative_weight must be a number, got 'banana'",
    "nan": "nan.npz: positive_references holds NaN",
    "int8": "int8.npz: positive_examples must hold real floating-point numbers, got dtype int8",
    "short": f"metadata says the embeddings are {DIM}-dimensional",
    "missing_stack": "nope.tif",
    "missing_prototype": "nope.npz: prototype file not found",
    "output_exists": "already exists",
    "unwritable_output": "protoscope-masks.tif",
    "model_file": "junk.safetensors",
}

#: One case per error class (and the OSError path) runs as ``python -m core`` in its own interpreter; the
#: variations of a class run through the same ``main`` in this process (an interpreter costs ~3 s of imports).
SUBPROCESS = ("clip_low", "threshold", "z_spec", "no_embed_dim", "missing_stack", "output_exists",
              "unwritable_output", "model_file")


def check_one_error_line(case: str, status: int, stderr: str, files: dict[str, Path]) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert EXPECTED[case] in lines[0]
    assert not files["out"].exists()  # nothing half-done is left behind
    assert files["exists"].read_bytes() == b"keep me"


@pytest.fixture(scope="module")
def results(files) -> dict[str, subprocess.CompletedProcess]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT)}

    def run(args: list) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=PROJECT, capture_output=True,
                              text=True, env=env, timeout=300)

    cases = case_arguments(files)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SUBPROCESS, pool.map(run, [cases[case] for case in SUBPROCESS])))


@pytest.mark.parametrize("case", SUBPROCESS)
def test_each_error_class_is_one_line_and_exit_2(results, files, case):
    if case == "unwritable_output" and not Path("/proc").is_dir():
        pytest.skip("needs /proc (a folder nobody can create files in, not even root)")
    check_one_error_line(case, results[case].returncode, results[case].stderr, files)


@pytest.mark.parametrize("case", [case for case in EXPECTED if case not in SUBPROCESS])
def test_every_variation_is_one_line_and_exit_2(files, case, capsys):
    status = main([str(arg) for arg in case_arguments(files)[case]])
    check_one_error_line(case, status, capsys.readouterr().err, files)


# ---- the same errors in Python: the classes callers can catch ---------------------------------------------------


def test_option_errors_name_the_option_the_value_and_the_range():
    with pytest.raises(OptionError, match=r"0 <= clip_low < clip_high <= 100 %, got clip_low=99, clip_high=95"):
        PipelineConfig.thesis().with_options(clip_low="99")
    with pytest.raises(OptionError, match=r"image_size must be a whole number of pixels >= 14 .* got 0"):
        PipelineConfig.thesis().with_options(image_size=0)
    with pytest.raises(OptionError, match=r"bad value 'x' for option knn_k: expected a whole number"):
        PipelineConfig.thesis().with_options(knn_k="x")
    with pytest.raises(OptionError, match=r"scoring: use one of mean, multi, knn"):
        PipelineConfig.thesis().with_options(scoring="best")
    with pytest.raises(OptionError, match=r"z_sigma must be a finite number >= 0 .* got nan"):
        PipelineConfig.thesis().with_options(z_sigma="nan")
    with pytest.raises(OptionError, match=r"min_size_px must be a whole number >= 0"):
        PipelineConfig.thesis().with_options(min_size_px=-1)
    with pytest.raises(OptionError, match=r"normalization must be 'slice' or 'stack', got 'global'"):
        PreprocessConfig(normalization="global")
    # the specialised option errors are OptionErrors (and ValueErrors) too
    assert issubclass(ZSpecError, OptionError) and issubclass(ThresholdError, OptionError)
    assert issubclass(OptionError, ValueError)


def test_configuration_from_a_file_rejects_missing_and_ill_typed_settings():
    data = PipelineConfig.best().as_dict()
    assert PipelineConfig.from_dict(data) == PipelineConfig.best()
    with pytest.raises(OptionError, match="preprocessing settings lack 'clip_percentiles'"):
        PipelineConfig.from_dict({**data, "preprocess": {"image_size": 980}})
    with pytest.raises(OptionError, match=r"clip_percentiles must be two numbers \[low, high\], got 'a'"):
        PipelineConfig.from_dict({**data, "preprocess": {"clip_percentiles": "a", "image_size": 980}})
    with pytest.raises(OptionError, match="knn_k must be a whole number, got 2.5"):
        PipelineConfig.from_dict({**data, "knn_k": 2.5})
    with pytest.raises(OptionError, match="pipeline configuration: 'fast' is not a valid Mode"):
        PipelineConfig.from_dict({**data, "mode": "fast"})
    with pytest.raises(OptionError, match="cleanup must be an object"):
        PipelineConfig.from_dict({**data, "cleanup": {"holes": 3}})


def test_prototype_file_problems_are_prototype_file_errors(files, tmp_path):
    good = load_prototype(files["good"])
    assert good.embed_dim == DIM and good.positive_examples.shape == (2, DIM)
    assert good.points.positive.tolist() == [[5, 5, 1], [20, 20, 1]]
    for name, message in (("no_embed_dim", "metadata lacks 'embed_dim'"), ("banana", "got 'banana'"),
                          ("nan", "NaN"), ("int8", "dtype int8"), ("short", rf"shape \(1, {DIM - 1}\)")):
        with pytest.raises(PrototypeFileError, match=message) as info:
            load_prototype(files[name])
        assert f"{name}.npz" in str(info.value) and "make it again" in str(info.value)
    complex_file = edited(files["good"], tmp_path / "c.npz",
                          arrays={"negative_references": np.ones((1, DIM), np.complex64)})
    with pytest.raises(PrototypeFileError, match="dtype complex64"):
        load_prototype(complex_file)
    points = edited(files["good"], tmp_path / "p.npz", arrays={"points_negative": np.ones((2, 2), np.int64)})
    with pytest.raises(PrototypeFileError, match=r"points_negative has shape \(2, 2\), expected \(N, 3\)"):
        load_prototype(points)
    dim = edited(files["good"], tmp_path / "d.npz", metadata=lambda m: m.update(embed_dim="49"))
    with pytest.raises(PrototypeFileError, match="'embed_dim' must be a whole number >= 1, got '49'"):
        load_prototype(dim)
    threshold = edited(files["good"], tmp_path / "t.npz", metadata=lambda m: m.update(intensity_range=[1, "x"]))
    with pytest.raises(PrototypeFileError, match="intensity_range"):
        load_prototype(threshold)
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(PrototypeFileError, match="not an .npz archive"):
        load_prototype((tmp_path / "single.npy").read_bytes(), name="'single.npy'")


def test_save_prototype_writes_atomically_and_refuses_to_overwrite(files, tmp_path):
    prototype = load_prototype(files["good"])
    path = save_prototype(prototype, tmp_path / "sub" / "copy.npz")
    assert load_prototype(path).positive_examples.tolist() == prototype.positive_examples.tolist()
    assert [p.name for p in path.parent.iterdir()] == ["copy.npz"]  # no temp file left
    with pytest.raises(Exception, match="already exists"):
        save_prototype(prototype, path)


def test_an_os_error_names_the_output_not_its_temp_file():
    error = PermissionError(13, "Permission denied", "/data/out/.~protoscope-12-ab12cd-0011aabb.masks.tif")
    assert error_line(error) == "error: cannot use '/data/out/masks.tif': Permission denied"
    assert error_line(OSError(28, "No space left on device")) == "error: No space left on device"
    assert error_line(OptionError("first line\n  second line\n")) == "error: first line; second line"
