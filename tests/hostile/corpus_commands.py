"""Hostile and odd command lines for ``prototype``, ``apply``, ``evaluate`` and ``export``, built from scratch.

`write_inputs(folder)` writes the small input files every case reads (stacks, points files, prototype files,
ground-truth masks) and returns ``{key: path}``; `CASES` lists the command lines. A case's arguments may name
``{in}`` (the input folder) and ``{out}`` (the case's own, initially empty, output folder); a ``setup`` prepares
that output folder first (an existing file, a read-only folder, a file where a folder belongs).

Expectations: ``'error'`` — exit status 2, exactly one stderr line ``error: ...`` (holding ``says`` when given),
no traceback, nothing new in the output folder (no output, no ``.~protoscope-*`` temp), inputs unchanged;
``'ok'`` — exit status 0 and the outputs named in ``makes``.

The prototype files are made without embedding anything (random unit rows, as a click would give), so the
corpus needs no torch. Run ``python tests/hostile/corpus_commands.py FOLDER`` to write the inputs and list
the cases.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from core.config import PipelineConfig  # noqa: E402
from core.demo import make_demo  # noqa: E402
from core.features.registry import get_spec  # noqa: E402
from core.prototypes import PointSet, Prototype, save_prototype  # noqa: E402

__all__ = ["CASES", "Case", "ERROR", "OK", "write_inputs", "DIM", "SHAPE"]

ERROR, OK = "error", "ok"
DIM = get_spec("filterbank").embed_dim  # 49
SHAPE = (4, 64, 64)  # (Z, Y, X) of the main stack: small, so that an 'ok' case takes ~1 s of work
IMAGE_SIZE = 112  # model input side for the prototype files: 8 x 8 patches of 14 px


# ---- stacks ------------------------------------------------------------------------------------------------


def _write_zcyx(path: Path, image: np.ndarray, mask: np.ndarray) -> Path:
    """A two-channel ImageJ TIFF: channel 0 the image, channel 1 the ground truth (0/1), voxel 0.5 x 0.5 x 2 µm."""
    data = np.stack([image, mask.astype(image.dtype)], axis=1)
    tifffile.imwrite(path, data, imagej=True, resolution=(2.0, 2.0), metadata={"axes": "ZCYX", "spacing": 2.0,
                                                                                 "unit": "um"})
    return path


def _stacks(folder: Path) -> dict[str, Path]:
    image, mask = make_demo(shape=SHAPE, seed=7)
    image2, mask2 = make_demo(shape=(2, 40, 48), seed=8)
    nan_image = image.astype(np.float32)
    nan_image[:] = np.nan
    empty_truth = np.zeros(SHAPE, np.uint8)
    paths = {
        "stack": _write_zcyx(folder / "stack.tif", image, mask),
        "two_slices": _write_zcyx(folder / "two_slices.tif", image2, mask2),
        "nan_channel": _write_zcyx(folder / "nan_channel.tif", nan_image, mask),
        "no_truth": _write_zcyx(folder / "no_truth.tif", image, empty_truth),
        "mask_file": folder / "mask.tif",
        "mask_small": folder / "mask_small.tif",
    }
    tifffile.imwrite(paths["mask_file"], mask.astype(np.uint8), imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(paths["mask_small"], mask[:, :32, :32].astype(np.uint8), imagej=True, metadata={"axes": "ZYX"})
    return paths


# ---- points files ------------------------------------------------------------------------------------------


def _points_text(folder: Path) -> dict[str, Path]:
    """Points files, valid and hostile, as text (json.dumps writes NaN and 1e308 as JSON's NaN / 1e+308)."""
    ys, xs = np.nonzero(make_demo(shape=SHAPE, seed=7)[1][1])
    by, bx = np.nonzero(make_demo(shape=SHAPE, seed=7)[1][1] == 0)
    positive = [[int(xs[i]), int(ys[i]), 1] for i in np.linspace(0, len(xs) - 1, 4).astype(int)]
    negative = [[int(bx[i]), int(by[i]), 1] for i in np.linspace(0, len(bx) - 1, 4).astype(int)]
    rng = np.random.default_rng(0)
    many_positive = np.column_stack([rng.integers(0, 64, 50_000), rng.integers(0, 64, 50_000), np.ones(50_000, int)])
    many_negative = np.column_stack([rng.integers(0, 64, 50_000), rng.integers(0, 64, 50_000), np.full(50_000, 2)])
    documents: dict[str, object] = {
        "valid": {"positive": positive, "negative": negative},
        "border": {"positive": [[0, 0, 0], [63, 63, 0], [0, 63, 3]], "negative": [[63, 0, 0], [32, 0, 3]]},
        "one_each": {"positive": positive[:1], "negative": negative[:1]},
        "two_slices": {"positive": [[10, 10, 0], [20, 30, 1]], "negative": [[47, 39, 1]]},
        "many": {"positive": many_positive.tolist(), "negative": many_negative.tolist()},
        "a_list": [[1, 2, 3]],
        "a_number": 42,
        "no_positive_key": {"negative": negative},
        "positive_misspelt": {"positives": positive, "negative": negative},
        "too_deep": {"positive": [positive], "negative": negative},
        "two_coordinates": {"positive": [[5, 5]], "negative": []},
        "four_coordinates": {"positive": [[5, 5, 1, 1]], "negative": []},
        "ragged": {"positive": [[5, 5, 1], [5, 5]], "negative": []},
        "strings": {"positive": [["a", "b", "c"]], "negative": []},
        "number_strings": {"positive": "5,5,1", "negative": []},
        "object_point": {"positive": [{"x": 5, "y": 5, "z": 1}], "negative": []},
        "nan": {"positive": [[float("nan"), 5, 1]], "negative": negative},
        "infinite": {"positive": [[5, float("inf"), 1]], "negative": negative},
        "huge": {"positive": [[1e308, 5, 1]], "negative": negative},
        "negative_xy": {"positive": [[-5, -5, 1]], "negative": negative},
        "outside_image": {"positive": [[64, 10, 1]], "negative": negative},
        "far_outside_image": {"positive": [[10, 100_000, 1]], "negative": negative},
        "slice_outside": {"positive": [[5, 5, 4]], "negative": negative},
        "slice_negative": {"positive": [[5, 5, -1]], "negative": negative},
        "empty_positive": {"positive": [], "negative": negative},
        "no_negative_best": {"positive": positive, "negative": []},
        "negative_outside": {"positive": positive, "negative": [[5, 70, 1]]},
    }
    paths = {}
    for name, document in documents.items():
        path = folder / f"points_{name}.json"
        path.write_text(json.dumps(document))
        paths[f"points_{name}"] = path
    raw = {
        "points_not_json": b"positive: [[1, 2, 3]]\n",
        "points_empty_file": b"",
        "points_binary": bytes(range(256)) * 4,
        "points_truncated": json.dumps(documents["valid"]).encode()[:40],
    }
    raw["points_named_npz"] = json.dumps(documents["valid"]).encode()  # JSON under a prototype's name
    for key, content in raw.items():
        name = "points.npz" if key == "points_named_npz" else f"{key}.json"
        (folder / name).write_bytes(content)
        paths[key] = folder / name
    return paths


# ---- prototype files ---------------------------------------------------------------------------------------


def _unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _good_prototype(dim: int = DIM, backbone: str = "filterbank", weights_id: str = "none") -> Prototype:
    positive, negative = _unit_rows(3, dim, 0), _unit_rows(2, dim, 1)
    return Prototype(
        positive_references=positive.mean(axis=0, keepdims=True), negative_references=negative.mean(axis=0, keepdims=True),
        positive_examples=positive, negative_examples=negative,
        config=PipelineConfig.thesis().with_options(image_size=IMAGE_SIZE),
        backbone=backbone, weights_id=weights_id, embed_dim=dim,
        points=PointSet(np.array([[5, 5, 1], [20, 20, 1], [40, 12, 2]]), np.array([[60, 60, 1], [2, 50, 2]])),
        source_file="stack.tif", intensity_range=(100.0, 4000.0),
    )


def _archive(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(path, allow_pickle=False) as archive:
        contents = {key: archive[key] for key in archive.files}
    return contents, json.loads(str(contents["metadata_json"]))


def _edited(good: Path, out: Path, *, metadata: Callable[[dict], object] | None = None,
            arrays: dict | None = None, drop: tuple[str, ...] = (), raw_metadata: np.ndarray | None = None) -> Path:
    """A copy of the prototype file `good` with its metadata dict changed in place by `metadata`, some arrays
    replaced or dropped, or the metadata array itself replaced by `raw_metadata`."""
    contents, meta = _archive(good)
    if metadata is not None:
        metadata(meta)
    contents["metadata_json"] = np.array(json.dumps(meta)) if raw_metadata is None else raw_metadata
    contents.update(arrays or {})
    for key in drop:
        contents.pop(key)
    with open(out, "wb") as stream:  # np.savez(path) would append .npz to a name without it
        np.savez(stream, **contents)
    return out


def _prototypes(folder: Path) -> dict[str, Path]:
    good = save_prototype(_good_prototype(), folder / "good.npz")
    best = _good_prototype()
    best = Prototype(**{**best.__dict__, "config": PipelineConfig.best().with_options(image_size=IMAGE_SIZE),
                        "calibrated_threshold": 0.1})
    paths = {"proto_good": good, "proto_best": save_prototype(best, folder / "best.npz")}
    paths["proto_dinov2"] = save_prototype(_good_prototype(384, "dinov2_vits14", "hub:facebook/dinov2-small"),
                                           folder / "dinov2.npz")
    paths["proto_dim7"] = save_prototype(_good_prototype(7), folder / "dim7.npz")

    def update(**values) -> Callable[[dict], None]:
        return lambda meta: meta.update(values)

    def config_update(**values) -> Callable[[dict], None]:
        return lambda meta: meta["config"].update(values)

    empty = np.zeros((0, DIM), np.float32)
    edits: dict[str, dict] = {
        "zero_size": {"arrays": {key: empty for key in ("positive_references", "negative_references",
                                                        "positive_examples", "negative_examples")}},
        "no_positive_reference": {"arrays": {"positive_references": empty}},
        "nan_reference": {"arrays": {"positive_references": np.full((1, DIM), np.nan, np.float32)}},
        "inf_example": {"arrays": {"negative_examples": np.full((2, DIM), np.inf, np.float32)}},
        "complex_reference": {"arrays": {"negative_references": np.ones((1, DIM), np.complex64)}},
        "int8_examples": {"arrays": {"positive_examples": np.ones((3, DIM), np.int8)}},
        "three_dim_array": {"arrays": {"positive_references": np.ones((1, 1, DIM), np.float32)}},
        "dim_disagrees": {"arrays": {"negative_examples": np.ones((2, DIM - 1), np.float32)}},
        "string_points": {"arrays": {"points_positive": np.array([["a", "b", "c"]])}},
        "points_far_away": {"arrays": {"points_positive": np.array([[1e300, 0, 0]])}},
        "one_pixel_array": {"arrays": {"pixel_positive_examples": np.ones((4, 3), np.float32)}},
        "missing_array": {"drop": ("negative_examples",)},
        "metadata_not_json": {"raw_metadata": np.array("{not json")},
        "metadata_a_list": {"raw_metadata": np.array(json.dumps(["protoscope-prototype"]))},
        "metadata_numbers": {"raw_metadata": np.arange(3.0)},
        "not_protoscope": {"metadata": update(format="something-else")},
        "newer_format": {"metadata": update(format_version=99)},
        "backbone_number": {"metadata": update(backbone=5)},
        "backbone_unknown": {"metadata": update(backbone="vit_huge")},
        "embed_dim_text": {"metadata": update(embed_dim="49")},
        "embed_dim_zero": {"metadata": update(embed_dim=0)},
        "channel_text": {"metadata": update(channel="one")},
        "timepoint_negative": {"metadata": update(timepoint=-1)},
        "calibrated_text": {"metadata": update(calibrated_threshold="high")},
        "intensity_range_one": {"metadata": update(intensity_range=[5])},
        "config_text": {"metadata": update(config="thesis")},
        "config_mode_unknown": {"metadata": config_update(mode="fast")},
        "config_lambda_text": {"metadata": config_update(negative_weight="banana")},
        "config_image_size_zero": {"metadata": lambda meta: meta["config"]["preprocess"].update(image_size=0)},
        "config_threshold_bad": {"metadata": config_update(threshold="top:500")},
        "config_cleanup_list": {"metadata": config_update(cleanup=[1, 2])},
        "random_weights_bad_seed": {"metadata": update(weights_id="random:seedX")},
    }
    for name, edit in edits.items():
        paths[f"proto_{name}"] = _edited(good, folder / f"{name}.npz", **edit)
    (folder / "text.npz").write_bytes(b"this is a text file renamed .npz\n")
    paths["proto_text"] = folder / "text.npz"
    (folder / "empty.npz").write_bytes(b"")
    paths["proto_empty"] = folder / "empty.npz"
    contents, _ = _archive(good)
    contents["positive_references"] = np.array([object(), None], dtype=object)
    with open(folder / "pickled.npz", "wb") as stream:
        np.savez(stream, **contents)  # an object array: only loadable with pickle, which we never allow
    paths["proto_pickled"] = folder / "pickled.npz"
    np.save(folder / "single.npy", np.zeros(DIM, np.float32))
    os.replace(folder / "single.npy", folder / "single.npz")
    paths["proto_single_array"] = folder / "single.npz"
    data = good.read_bytes()
    (folder / "truncated.npz").write_bytes(data[: len(data) // 2])
    paths["proto_truncated"] = folder / "truncated.npz"
    return paths


def write_inputs(folder: str | Path) -> dict[str, Path]:
    """Write every input file into `folder` (created); returns {key: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {**_stacks(folder), **_points_text(folder), **_prototypes(folder)}


# ---- the cases ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One command line. args: after ``python -m core``, with {in} and {out} placeholders.

    setup : name of a preparation of the output folder ('existing', 'read_only', 'file_as_folder');
    says : text the error line must contain; makes : files an 'ok' case must leave in {out}.
    """

    name: str
    args: tuple[str, ...]
    expect: str = ERROR
    says: str = ""
    setup: str = ""
    makes: tuple[str, ...] = field(default=())

    def argv(self, inputs: Path, out: Path) -> list[str]:
        return [arg.replace("{in}", str(inputs)).replace("{out}", str(out)) for arg in self.args]


def _prototype(points: str, *extra: str, out: str = "{out}/p.npz", stack: str = "stack.tif") -> tuple[str, ...]:
    return ("prototype", f"{{in}}/{stack}", "--points", f"{{in}}/{points}", "--out", out, "--channel", "0",
            "--backbone", "filterbank", "--option", f"image_size={IMAGE_SIZE}", *extra)


def _apply(prototype: str = "good.npz", *extra: str, out: str = "{out}/m.tif", stack: str = "stack.tif") -> tuple[str, ...]:
    return ("apply", f"{{in}}/{stack}", "--prototype", f"{{in}}/{prototype}", "--out", out, "--channel", "0", *extra)


def _evaluate(*extra: str, stack: str = "stack.tif", mask: tuple[str, ...] = ("--mask-channel", "1")) -> tuple[str, ...]:
    return ("evaluate", f"{{in}}/{stack}", "--image-channel", "0", *mask, "--backbone", "filterbank",
            "--mode", "thesis", "--points", "3", "--seeds", "1", "--slices", "2", "--skip-ends", "1",
            "--settings", "same-slice", "--option", f"image_size={IMAGE_SIZE}", *extra)


def _export(*extra: str, out: str = "{out}/e.tif") -> tuple[str, ...]:
    return ("export", "{in}/stack.tif", "--out", out, *extra)


_POINTS_ERRORS = {  # points file -> text of the error line
    "points_not_json.json": "not a readable JSON points file",
    "points_empty_file.json": "not a readable JSON points file",
    "points_binary.json": "not a readable JSON points file",
    "points_truncated.json": "not a readable JSON points file",
    "points_a_list.json": "expected a JSON object",
    "points_a_number.json": "expected a JSON object",
    "points_no_positive_key.json": "expected a JSON object with 'positive'",
    "points_positive_misspelt.json": "'positive'",
    "points_too_deep.json": "[x, y, z]",
    "points_two_coordinates.json": "[x, y, z]",
    "points_four_coordinates.json": "[x, y, z]",
    "points_ragged.json": "[x, y, z]",
    "points_strings.json": "numbers",
    "points_number_strings.json": "[x, y, z]",
    "points_object_point.json": "numbers",
    "points_nan.json": "points_nan.json: positive points contain non-finite coordinates",
    "points_infinite.json": "points_infinite.json: positive points contain non-finite coordinates",
    "points_huge.json": "points_huge.json: positive point (1e+308, 5, 1) is far outside any stack",
    "points_negative_xy.json": "(x=-5, y=-5, z=1) lies outside the 64 x 64 slice",
    "points_outside_image.json": "(x=64, y=10, z=1) lies outside the 64 x 64 slice",
    "points_far_outside_image.json": "y=100000",
    "points_slice_outside.json": "z=4",
    "points_slice_negative.json": "z=-1",
    "points_empty_positive.json": "at least one positive point",
    "points_negative_outside.json": "negative point (x=5, y=70, z=1)",
}

_PROTOTYPE_ERRORS = {  # prototype file -> text of the error line
    "text.npz": "text.npz",
    "empty.npz": "empty.npz",
    "pickled.npz": "pickled.npz",
    "single.npz": "not an .npz archive",
    "truncated.npz": "truncated.npz",
    "zero_size.npz": "positive_references is empty",
    "no_positive_reference.npz": "positive_references is empty",
    "nan_reference.npz": "positive_references holds NaN",
    "inf_example.npz": "negative_examples holds NaN or infinite",
    "complex_reference.npz": "dtype complex64",
    "int8_examples.npz": "dtype int8",
    "three_dim_array.npz": "positive_references has shape (1, 1, 49)",
    "dim_disagrees.npz": f"{DIM}-dimensional",
    "string_points.npz": "points_positive must hold numbers",
    "points_far_away.npz": "far outside any stack",
    "one_pixel_array.npz": "only one of pixel_positive_examples",
    "missing_array.npz": "missing negative_examples",
    "metadata_not_json.npz": "metadata_json is not valid JSON",
    "metadata_a_list.npz": "not a Protoscope prototype file",
    "metadata_numbers.npz": "metadata_json must be one text",
    "not_protoscope.npz": "not a Protoscope prototype file",
    "newer_format.npz": "newer Protoscope",
    "backbone_number.npz": "metadata 'backbone' must be a non-empty text",
    "backbone_unknown.npz": "vit_huge",
    "embed_dim_text.npz": "'embed_dim' must be a whole number",
    "embed_dim_zero.npz": "'embed_dim' must be a whole number >= 1",
    "channel_text.npz": "'channel'",
    "timepoint_negative.npz": "'timepoint'",
    "calibrated_text.npz": "calibrated_threshold",
    "intensity_range_one.npz": "intensity_range",
    "config_text.npz": "metadata 'config' is invalid",
    "config_mode_unknown.npz": "'fast' is not a valid Mode",
    "config_lambda_text.npz": "negative_weight must be a number",
    "config_image_size_zero.npz": "image_size",
    "config_threshold_bad.npz": "top:P",
    "config_cleanup_list.npz": "cleanup must be an object",
    "random_weights_bad_seed.npz": "no whole-number seed",
    "dim7.npz": "7-dimensional",
    "nope.npz": "nope.npz: prototype file not found",
}

_OPTION_ERRORS = {  # --option NAME=VALUE -> text of the error line
    "colour=red": "unknown pipeline option 'colour'",
    "image_size": "must look like name=value",
    "=5": "must look like name=value",
    "image_size=abc": "bad value 'abc' for option image_size",
    "image_size=0": "image_size must be a whole number of pixels >= 14",
    "image_size=13": "image_size must be a whole number of pixels >= 14",
    "image_size=120": "image_size=120 is not a multiple of the 14-px patch",
    "image_size=1000000": "image_size",
    "image_size=1.5": "bad value '1.5' for option image_size",
    "clip_low=99": "clip_low=99",
    "clip_low=-1": "clip_low=-1",
    "clip_high=101": "clip_high=101",
    "clip_low=nan": "clip_low",
    "negative_weight=nan": "negative_weight",
    "negative_weight=-0.5": "negative_weight",
    "negative_weight=2.5": "negative_weight",
    "negative_weight=inf": "negative_weight",
    "z_sigma=-1": "z_sigma",
    "z_sigma=inf": "z_sigma",
    "z_sigma=1e308": "z_sigma",
    "n_prototypes=0": "n_prototypes",
    "knn_k=0": "knn_k",
    "knn_k=2.5": "knn_k",
    "pixel_max_side=10": "pixel_max_side",
    "augment_radius=-1": "augment_radius",
    "augment_radius=1000000": "augment_radius",
    "patch_components=-1": "patch_components",
    "hole_size_px=-1": "hole_size_px",
    "min_size_px=x": "min_size_px",
    "closing_px=-3": "closing_px",
    "closing_px=1000000000": "closing_px",
    "scoring=best": "scoring",
    "upsampling=cubic": "upsampling",
    "threshold=top:0": "top:P",
    "threshold=banana": "threshold",
    "normalization=global": "normalization",
    "pixel_classifier=svm": "pixel_classifier",
    "pixel_standardize=image": "pixel_standardize",
}


def _cases() -> list[Case]:
    cases: list[Case] = []
    # prototype: points files
    for points, says in _POINTS_ERRORS.items():
        cases.append(Case(f"prototype-{Path(points).stem}", _prototype(points), says=says))
    cases += [
        Case("prototype-points-missing", _prototype("nope.json"), says="points file not found"),
        Case("prototype-points-a-folder", ("prototype", "{in}/stack.tif", "--points", "{in}", "--out", "{out}/p.npz",
                                           "--backbone", "filterbank"), says="not a readable JSON points file"),
        Case("prototype-best-without-negative", _prototype("points_no_negative_best.json", "--mode", "best"),
             says="needs negative points"),
        Case("prototype-out-txt", _prototype("points_valid.json", out="{out}/p.txt"), says=".npz"),
        Case("prototype-out-no-extension", _prototype("points_valid.json", out="{out}/prototype"), says=".npz"),
        Case("prototype-out-json", _prototype("points_valid.json", "--overwrite", out="{in}/points_valid.json"),
             says="prototype files end in .npz"),
        Case("prototype-out-is-points", _prototype("points.npz", "--overwrite", out="{in}/points.npz"),
             says="is an input of this command"),
        Case("prototype-points-missing-option", ("prototype", "{in}/stack.tif", "--out", "{out}/p.npz"),
             says="the following arguments are required: --points"),
        Case("prototype-out-exists", _prototype("points_valid.json", out="{out}/exists.npz"), setup="existing",
             says="already exists"),
        Case("prototype-out-read-only", _prototype("points_valid.json"), setup="read_only", says="p.npz"),
        Case("prototype-out-under-a-file", _prototype("points_valid.json", out="{out}/exists.npz/p.npz"),
             setup="existing", says="not a folder"),
        Case("prototype-channel-99", _prototype("points_valid.json", "--channel", "99"), says="99"),
        Case("prototype-timepoint-5", _prototype("points_valid.json", "--timepoint", "5"), says="time point 5"),
        Case("prototype-option-clip", _prototype("points_valid.json", "--option", "clip_low=99"), says="clip_low=99"),
        Case("prototype-option-patch-grid", _prototype("points_valid.json", "--option", "image_size=100"),
             says="image_size=100 is not a multiple"),
        Case("prototype-unknown-backbone", _prototype("points_valid.json", "--backbone", "vit_huge"), says="vit_huge"),
        Case("prototype-weights-missing", _prototype("points_valid.json", "--backbone", "dinov2_vits14"),
             says="random"),
        Case("prototype-nan-channel", _prototype("points_valid.json", stack="nan_channel.tif"),
             says="'nan_channel.tif' channel 0 (Channel 0) slice z=1 has no finite pixel values"),
        Case("prototype-best-augment-radius-huge", _prototype("points_valid.json", "--mode", "best", "--option",
                                                              "augment_radius=1000000"), says="augment_radius"),
    ]
    # prototype: odd but valid
    cases += [
        Case("prototype-ok-border-points", _prototype("points_border.json", "--mode", "thesis"), OK, makes=("p.npz",)),
        Case("prototype-ok-border-points-best", _prototype("points_border.json", "--mode", "best"), OK,
             makes=("p.npz",)),
        Case("prototype-ok-one-point-each", _prototype("points_one_each.json", "--mode", "best"), OK,
             makes=("p.npz",)),
        Case("prototype-ok-two-slice-stack", _prototype("points_two_slices.json", "--mode", "best",
                                                        stack="two_slices.tif"), OK, makes=("p.npz",)),
        Case("prototype-ok-50k-points", _prototype("points_many.json", "--mode", "best"), OK, makes=("p.npz",)),
        Case("prototype-ok-into-missing-folder", _prototype("points_valid.json", out="{out}/new/deeper/p.npz"), OK,
             makes=("new",)),
    ]
    # apply: prototype files
    for prototype, says in _PROTOTYPE_ERRORS.items():
        cases.append(Case(f"apply-proto-{Path(prototype).stem}", _apply(prototype), says=says))
    cases += [
        Case("apply-other-backbone-given", _apply("dinov2.npz", "--backbone", "filterbank"),
             says="--backbone filterbank disagrees"),
        Case("apply-other-backbone-no-weights", _apply("dinov2.npz"), says="random"),
    ]
    # apply: options
    for option, says in _OPTION_ERRORS.items():
        cases.append(Case(f"apply-option-{option}", _apply("good.npz", "--option", option), says=says))
    cases += [
        Case("apply-best-option-on-thesis", _apply("best.npz", "--option", "pixel_max_side=8"), says="pixel_max_side"),
        Case("apply-z-text", _apply("good.npz", "--z", "abc"), says="abc"),
        Case("apply-z-outside", _apply("good.npz", "--z", "4"), says="4"),
        Case("apply-z-range-outside", _apply("good.npz", "--z", "0:9"), says="0:9"),
        Case("apply-z-empty", _apply("good.npz", "--z", ""), says="error"),
        Case("apply-z-empty-range", _apply("good.npz", "--z", "2:2"), says="2:2"),
        Case("apply-z-far-negative", _apply("good.npz", "--z=-99"), says="-99"),
        Case("apply-threshold-text", _apply("good.npz", "--threshold", "banana"), says="banana"),
        Case("apply-threshold-top-150", _apply("good.npz", "--threshold", "top:150"), says="top:P"),
        Case("apply-threshold-top-nan", _apply("good.npz", "--threshold", "top:nan"), says="top:"),
        Case("apply-threshold-score-text", _apply("good.npz", "--threshold", "score:high"), says="score:"),
        Case("apply-threshold-score-inf", _apply("good.npz", "--threshold", "score:inf"), says="score:"),
        Case("apply-channel-text", _apply("good.npz", "--channel", "green"), says="argument --channel: invalid int"),
        Case("apply-unknown-flag", _apply("good.npz", "--colour", "red"), says="unrecognized arguments: --colour"),
        Case("apply-channel-99", _apply("good.npz", "--channel", "99"), says="99"),
        Case("apply-channel-minus-99", _apply("good.npz", "--channel", "-99"), says="-99"),
        Case("apply-timepoint-5", _apply("good.npz", "--timepoint", "5"), says="time point 5"),
        Case("apply-timepoint-negative", _apply("good.npz", "--timepoint", "-1"), says="time point -1"),
        Case("apply-nan-channel", _apply("good.npz", stack="nan_channel.tif"), says="no finite pixel"),
        Case("apply-stack-missing", _apply("good.npz", stack="nope.tif"), says="nope.tif"),
        Case("apply-stack-is-prototype", _apply("good.npz", stack="good.npz"), says="good.npz"),
    ]
    # apply: outputs
    cases += [
        Case("apply-out-png", _apply(out="{out}/m.png"), says="m.png"),
        Case("apply-out-no-extension", _apply(out="{out}/masks"), says="masks"),
        Case("apply-out-ome", _apply(out="{out}/m.ome.tif"), says="OME"),
        Case("apply-out-exists", _apply(out="{out}/exists.npz"), setup="existing", says="already exists"),
        Case("apply-out-exists-tif", _apply(out="{out}/exists.tif"), setup="existing", says="already exists"),
        Case("apply-out-is-stack", _apply("good.npz", "--overwrite", out="{in}/stack.tif"), says="stack.tif"),
        Case("apply-out-is-prototype", _apply("good.npz", "--overwrite", out="{in}/good.npz"), says="good.npz"),
        Case("apply-out-is-a-folder", _apply(out="{out}"), says="folder"),
        Case("apply-out-read-only", _apply(), setup="read_only", says="m.tif"),
        Case("apply-out-under-a-file", _apply(out="{out}/exists.tif/m.tif"), setup="existing", says="not a folder"),
        Case("apply-out-in-proc", _apply(out="/proc/protoscope-hostile/m.tif"), says="/proc/protoscope-hostile"),
        Case("apply-areas-is-out", _apply("good.npz", "--areas", "{out}/m.tif"), says="two outputs"),
        Case("apply-areas-exists", _apply("good.npz", "--areas", "{out}/exists.tif"), setup="existing",
             says="already exists"),
        Case("apply-areas-read-only", _apply("good.npz", "--areas", "{out}/ro/areas.csv"), setup="read_only_sub",
             says="areas.csv"),
        Case("apply-areas-is-stack", _apply("good.npz", "--overwrite", "--areas", "{in}/stack.tif"), says="stack.tif"),
    ]
    # apply: odd but valid
    cases += [
        Case("apply-ok-two-slice-stack", _apply("good.npz", "--areas", "{out}/a.csv", stack="two_slices.tif"), OK,
             makes=("a.csv", "m.tif")),
        Case("apply-ok-best-one-slice", _apply("best.npz", "--z", "3", "--option", "pixel_classifier=none"), OK,
             makes=("m.tif",)),
        Case("apply-ok-huge-prototype-count", _apply("good.npz", "--option", "scoring=multi", "--option",
                                                     "n_prototypes=1000000000"), OK, makes=("m.tif",)),
        Case("apply-ok-repeated-slices", _apply("good.npz", "--z", "1,1,0", "--threshold", "score:0.0"), OK,
             makes=("m.tif",)),
    ]
    # evaluate
    cases += [
        Case("evaluate-points-minus-3", _evaluate("--points", "-3"), says="--points -3"),
        Case("evaluate-points-huge", _evaluate("--points", "100000000"), says="--points"),
        Case("evaluate-seeds-0", _evaluate("--seeds", "0"), says="--seeds 0"),
        Case("evaluate-slices-0", _evaluate("--slices", "0"), says="--slices 0"),
        Case("evaluate-margin-negative", _evaluate("--margin", "-1"), says="--margin"),
        Case("evaluate-no-ground-truth", _evaluate(mask=()), says="--mask-channel"),
        Case("evaluate-mask-file-count", ("evaluate", "{in}/stack.tif", "{in}/two_slices.tif", "--image-channel", "0",
                                          "--mask-file", "{in}/mask.tif", "--backbone", "filterbank"),
             says="2 stacks but 1 mask files"),
        Case("evaluate-mask-file-other-shape", _evaluate(mask=("--mask-file", "{in}/mask_small.tif")),
             says="mask_small.tif"),
        Case("evaluate-mask-file-missing", _evaluate(mask=("--mask-file", "{in}/nope.tif")), says="nope.tif"),
        Case("evaluate-mask-channel-99", _evaluate(mask=("--mask-channel", "99")), says="99"),
        Case("evaluate-image-channel-99", ("evaluate", "{in}/stack.tif", "--image-channel", "99", "--mask-channel", "1",
                                           "--backbone", "filterbank"), says="99"),
        Case("evaluate-all-nan-channel", _evaluate(stack="nan_channel.tif"), says="no finite pixel"),
        Case("evaluate-empty-ground-truth", _evaluate(stack="no_truth.tif"), says="no evaluated slice"),
        Case("evaluate-same-stack-twice", ("evaluate", "{in}/stack.tif", "{in}/stack.tif", *_evaluate()[2:]),
             says="same name"),
        Case("evaluate-points-not-a-number", _evaluate("--points", "many"), says="argument --points: invalid int"),
        Case("evaluate-settings-unknown", _evaluate("--settings", "cross-planet"), says="invalid choice"),
        Case("evaluate-option-bad", _evaluate("--option", "knn_k=0"), says="knn_k"),
        Case("evaluate-option-patch-grid", _evaluate("--option", "image_size=100"), says="image_size=100 is not a multiple"),
        Case("evaluate-variant-bad", _evaluate("--variant", "x=fast:knn_k=1"), says="base must be thesis or best"),
        Case("evaluate-json-is-stack", _evaluate("--json", "{in}/stack.tif"), says="stack.tif"),
        Case("evaluate-csv-is-mask", _evaluate("--csv", "{in}/mask.tif", mask=("--mask-file", "{in}/mask.tif")),
             says="mask.tif"),
        Case("evaluate-json-read-only", _evaluate("--json", "{out}/r.json"), setup="read_only", says="r.json"),
        Case("evaluate-json-under-a-file", _evaluate("--json", "{out}/exists.tif/r.json"), setup="existing",
             says="not a folder"),
        Case("evaluate-unknown-backbone", ("evaluate", "{in}/stack.tif", "--image-channel", "0", "--mask-channel", "1",
                                           "--backbone", "vit_huge"), says="vit_huge"),
        Case("evaluate-ok-two-slice-stack", _evaluate("--json", "{out}/r.json", stack="two_slices.tif"), OK,
             makes=("r.csv", "r.json")),
    ]
    # export options (the io corpus covers hostile files)
    cases += [
        Case("export-level-5", _export("--level", "5"), says="level"),
        Case("export-level-negative", _export("--level", "-1"), says="level"),
        Case("export-timepoint-3", _export("--timepoint", "3"), says="time point 3"),
        Case("export-channel-9", _export("--channel", "9"), says="9"),
        Case("export-level-text", _export("--level", "two"), says="argument --level: invalid int"),
        Case("export-z-text", _export("--z", "1;2"), says="1;2"),
        Case("export-z-step-zero", _export("--z", "0:4:0"), says="0:4:0"),
        Case("export-out-png", _export(out="{out}/e.png"), says="e.png"),
        Case("export-out-no-extension", _export(out="{out}/exported"), says="exported"),
        Case("export-out-exists", _export(out="{out}/exists.tif"), setup="existing", says="already exists"),
        Case("export-out-is-input", _export("--overwrite", out="{in}/stack.tif"), says="stack.tif"),
        Case("export-out-read-only", _export(), setup="read_only", says="e.tif"),
        Case("export-out-under-a-file", _export(out="{out}/exists.tif/e.tif"), setup="existing", says="not a folder"),
        Case("export-ok-ome", _export("--z", "3,0", "--channel=-1", out="{out}/e.ome.tif"), OK, makes=("e.ome.tif",)),
    ]
    return cases


CASES: list[Case] = _cases()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile_commands")
    written = write_inputs(target / "in")
    print(f"{len(written)} input files in {target / 'in'}")
    for case in CASES:
        print(f"{case.expect:6s} {case.name:45s} python -m core {' '.join(case.argv(target / 'in', target / 'out' / case.name))}")
