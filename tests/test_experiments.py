"""The thesis's experiments (core.experiments, ``python -m core experiments``) on two tiny synthetic stacks.

The stacks are 6 x 112 x 112 and are embedded at image_size 196 with the filter bank: a 14 x 14 patch grid whose
nearest resize back to 112 px gives exact 8-pixel blocks, so in thesis mode a top-P % mask covers exactly
round(196·P/100) / 196 of the slice.
"""

import json

import numpy as np
import pytest
import tifffile

from core.cli import main as cli
from core.features.backbones import RANDOM_LABEL, load_backbone
from core.config import PipelineConfig
from core.demo import make_demo
from core.features.embedding_cache import EmbeddingCache
from core.experiments.base import RANDOM_NOTE
from core.experiments.figures import COLOURS, backbones_figure
from core.experiments.report import write_figures, write_report
from core.experiments import runs
from core.experiments.runs import (
    projection_rows,
    run_backbones,
    run_points,
    run_separability,
    run_threshold,
    run_transfer,
    separability_scores,
)
from core.errors import ProtoscopeError
from core.features.embedding import SliceEmbedder
from core.io import open_stack
from core.pipeline import build_scorer
from core.protocol import EvalStack, ProtocolSettings, open_eval_stacks, protocol_points
from core.thresholds import ThresholdSpec
from core.window import ScoreWindow

TINY = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
CONFIG = PipelineConfig.thesis().with_options(image_size=196)
SETTINGS = ProtocolSettings(seeds=(0,), n_slices=3, skip_ends=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two 6-slice 112 x 112 synthetic vessel stacks (ZCYX TIFF: channel 0 image, channel 1 ground truth)."""
    path = tmp_path_factory.mktemp("experiments")
    for name, seed in (("alpha", 3), ("beta", 4)):
        image, mask = make_demo(shape=(6, 112, 112), seed=seed)
        tifffile.imwrite(path / f"{name}.tif", np.stack([image, mask.astype(np.uint16)], axis=1), imagej=True,
                         metadata={"axes": "ZCYX"})
    return path


@pytest.fixture(scope="module")
def stacks(folder):
    return [EvalStack(folder / f"{name}.tif", 0, mask_channel=1) for name in ("alpha", "beta")]


@pytest.fixture(scope="module")
def cache(folder):
    return EmbeddingCache(folder / "cache")


@pytest.fixture(scope="module")
def filterbank():
    return load_backbone("filterbank")


@pytest.fixture(scope="module")
def backbones_result(stacks, filterbank, cache):
    return run_backbones(stacks, [filterbank], CONFIG, SETTINGS, cache=cache)


def test_backbones_table(backbones_result, filterbank):
    summary = backbones_result.tables["summary"]
    assert [row["backbone"] for row in summary] == ["filterbank"]
    row = summary[0]
    assert row["backbone_label"] == filterbank.label()
    assert row["n"] == 6  # 2 stacks x 3 slices x 1 seed
    assert {"dice", "dice_std", "iou", "iou_std", "hd95_px", "hd95_px_std"} <= set(row)
    assert 0 <= row["iou"] <= row["dice"] <= 1 and row["hd95_px"] >= 0
    per_stack = backbones_result.tables["per_stack"]
    assert sorted(r["stack"] for r in per_stack) == ["alpha", "beta"] and all(r["n"] == 3 for r in per_stack)
    # The pooled mean is the mean of the two equally sized stacks' means.
    assert row["dice"] == pytest.approx(np.mean([r["dice"] for r in per_stack]))
    slices = backbones_result.tables["slices"]
    assert {r["setting"] for r in slices} == {"same-slice"} and all(0 <= r["dice"] <= 1 for r in slices)
    bars = backbones_result.figures["dice_per_stack"].data
    assert len(bars) == 1 and bars[0].name == filterbank.label() and list(bars[0].x) == ["alpha", "beta"]


def test_threshold_sweep_keeps_exactly_p_percent_of_the_grid(stacks, filterbank, cache, backbones_result):
    percents = tuple(range(2, 31, 2))
    result = run_threshold(stacks, [filterbank], CONFIG, SETTINGS, cache=cache, percents=percents)
    pooled = [r for r in result.tables["summary"] if r["stack"] == "all"]
    assert [r["top_percent"] for r in pooled] == list(percents) and all(r["n"] == 6 for r in pooled)
    assert len(result.tables["slices"]) == 6 * len(percents)
    for row in result.tables["slices"]:
        # 14 x 14 = 196 patches, each an exact 8 x 8 block of the 112 x 112 slice; e.g. 10 % -> 20 patches.
        assert row["mask_fraction"] == round(196 * row["top_percent"] / 100) / 196
        assert 0 <= row["dice"] <= 1
    assert next(r for r in result.tables["slices"] if r["top_percent"] == 10)["mask_fraction"] == 20 / 196
    # top:10 is the thesis threshold: the same points and prototypes as the protocol give the same Dice.
    at_ten = {(r["stack"], r["z"], r["seed"]): r["dice"] for r in result.tables["slices"] if r["top_percent"] == 10}
    protocol = {(r["stack"], r["z"], r["seed"]): r["dice"] for r in backbones_result.tables["slices"]}
    assert at_ten == pytest.approx(protocol)
    assert len(result.figures["dice_vs_threshold"].data) == 3  # alpha, beta, pooled mean


def test_threshold_masks_at_top_10_are_the_score_windows_masks(stacks, filterbank, cache, monkeypatch):
    """The sweep's top:10 masks are ScoreWindow(fitted scorer).segment(z, top:10) for the protocol's points, with
    z smoothing on (sigma 1 slice: the window averages slices z-2 .. z+2)."""
    config = CONFIG.with_options(z_sigma=1.0)
    masks = []
    real_dice = runs.dice

    def recording_dice(mask, truth):
        masks.append(np.array(mask))
        return real_dice(mask, truth)

    monkeypatch.setattr(runs, "dice", recording_dice)
    result = run_threshold(stacks[:1], [filterbank], config, SETTINGS, cache=cache, percents=(5, 10))
    rows = result.tables["slices"]
    assert len(masks) == len(rows) == 3 * 2  # slices 0, 2, 5 x 1 seed x 2 thresholds, one dice call per row
    assert result.info["slices"] == {"alpha": [0, 2, 5]}
    with open_stack(stacks[0].image_path) as image:
        embedder = SliceEmbedder(image, 0, filterbank, config.preprocess, cache=cache)
        for row, mask in zip(rows, masks):
            if row["top_percent"] != 10:
                continue
            truth = np.asarray(image.read_slice(row["z"], 1)) > 0
            # margin: half a 14 px patch at 196 px for a 112 px slice = 4 px
            points = protocol_points(truth, row["z"], row["seed"], 25, 4)
            window = ScoreWindow(build_scorer(embedder, points, config, seed=row["seed"]), embedder)
            expected = window.segment(row["z"], threshold=ThresholdSpec("top", 10)).mask
            assert expected.shape == (112, 112) and expected.sum() == 20 * 64  # 20 of 196 patches of 8 x 8 px
            np.testing.assert_array_equal(mask, expected)


def test_open_eval_stacks_picks_the_protocols_slices_and_closes(stacks):
    with open_eval_stacks(stacks, SETTINGS) as opened:
        assert [entry.label for entry in opened] == ["alpha", "beta"]
        assert [entry.z_values for entry in opened] == [[0, 2, 5], [0, 2, 5]]  # linspace(0, 5, 3) rounded
        assert opened[0].channel == 0 and opened[0].notes == []
        assert opened[0].margin(SETTINGS, CONFIG) == 4  # ceil(14 / 2 * 112 / 196)
        assert opened[0].truth(2).dtype == bool
    with pytest.raises(ProtoscopeError, match="same name"):
        with open_eval_stacks([stacks[0], stacks[0]], SETTINGS):
            pass


def test_transfer_matrix_is_n_by_n_with_same_file_on_the_diagonal(stacks, filterbank, cache):
    result = run_transfer(stacks, [filterbank], CONFIG, SETTINGS, cache=cache)
    cells = {(c["reference"], c["target"]): c for c in result.tables["cells"]}
    assert sorted(cells) == [("alpha", "alpha"), ("alpha", "beta"), ("beta", "alpha"), ("beta", "beta")]
    for (reference, target), cell in cells.items():
        assert cell["setting"] == ("same-file" if reference == target else "cross-file")
        # one reference slice per stack and seed: the 2 other slices of its stack, or the 3 slices of the other
        assert cell["n"] == (2 if reference == target else 3)
        rows = [r for r in result.tables["slices"] if r["setting"] != "same-slice"
                and r["ref_stack"] == reference and r["stack"] == target]
        assert cell["dice"] == pytest.approx(np.mean([r["dice"] for r in rows]))
        assert 0 <= cell["dice"] <= 1
    matrix = result.tables["matrix"]
    assert [row["reference"] for row in matrix] == ["alpha", "beta"]
    assert matrix[0]["beta"] == f"{cells[('alpha', 'beta')]['dice']:.3f} ± {cells[('alpha', 'beta')]['dice_std']:.3f}"
    assert [r["setting"] for r in result.tables["settings"]] == ["same-slice", "same-file", "cross-file"]
    heatmap = result.figures["transfer_matrix_filterbank"].data[0]
    assert np.asarray(heatmap.z, dtype=float).shape == (2, 2)


def test_points_experiment_one_row_per_count_and_slice(stacks, filterbank, cache, backbones_result):
    result = run_points(stacks, [filterbank], CONFIG, SETTINGS, cache=cache, counts=(1, 25))
    assert [(r["n_points"], r["n"]) for r in result.tables["summary"]] == [(1, 6), (25, 6)]
    assert all(0 <= r["dice"] <= 1 for r in result.tables["slices"])
    # 25 points is the protocol's default: the same numbers as the backbone experiment.
    at_25 = [r["dice"] for r in result.tables["slices"] if r["n_points"] == 25]
    assert at_25 == pytest.approx([r["dice"] for r in backbones_result.tables["slices"]])
    assert [r.name for r in result.figures["dice_vs_points"].data] == [filterbank.label()]


def test_separability_scores_by_hand():
    # Structure patches (left half) all e0, background all e1: cosine distance 0 within, 1 across ->
    # silhouette exactly (1 - 0) / 1 = 1 and every neighbour of a patch has its label.
    embeddings = np.zeros((4, 4, 3), np.float32)
    embeddings[:, :2, 0] = 1
    embeddings[:, 2:, 1] = 1
    truth = np.zeros((56, 56), bool)
    truth[:, :28] = True
    scores = separability_scores(embeddings, truth, k=3)
    assert scores["structure_fraction"] == 0.5 and scores["n_patches"] == 16 and scores["majority_accuracy"] == 0.5
    assert scores["silhouette"] == pytest.approx(1.0) and scores["knn_accuracy"] == 1.0


def test_separability_experiment(stacks, filterbank, cache):
    result = run_separability(stacks, [filterbank], CONFIG, SETTINGS, cache=cache, projections=("pca",))
    row = result.tables["summary"][0]
    assert row["n"] == 6 and row["k"] == 10
    assert -1 <= row["silhouette"] <= 1 and 0.5 <= row["knn_accuracy"] <= 1
    projection = result.tables["projection"]
    kinds = [r["kind"] for r in projection]
    assert kinds.count("positive prototype") == kinds.count("negative prototype") == 1
    assert kinds.count("structure") + kinds.count("background") == 196  # every patch of the 14 x 14 grid
    representative = result.info["representative"]
    assert representative["z"] in result.info["slices"][representative["stack"]]
    assert "projection_filterbank" in result.figures


def test_protocol_points_are_the_protocols_points(stacks, filterbank, cache):
    """The threshold sweep rebuilds the protocol's prototypes: same points, hence the same mask at top:10."""
    truth = tifffile.imread(stacks[0].image_path)[2, 1] > 0
    points = protocol_points(truth, 2, 0, 25, 4)
    assert len(points.positive) == len(points.negative) == 25 and set(points.positive[:, 2]) == {2}
    assert truth[points.positive[:, 1], points.positive[:, 0]].all() and not truth[points.negative[:, 1], points.negative[:, 0]].any()


def test_random_weights_are_marked_on_figures_and_reports(stacks, cache, tmp_path):
    random = load_backbone("dinov2_vits14", "random", config_overrides=TINY)
    assert random.is_random and RANDOM_LABEL in random.label()
    config = PipelineConfig.thesis().with_options(image_size=112)
    result = run_backbones(stacks[:1], [random], config, ProtocolSettings(seeds=(0,), n_slices=2, skip_ends=0), cache=cache)
    assert all(0 <= r["dice"] <= 1 for r in result.tables["slices"])
    texts = [a.text for a in result.figures["dice_per_stack"].layout.annotations]
    assert any(RANDOM_NOTE in text for text in texts)
    assert random.label() in result.figures["dice_per_stack"].layout.title.text
    write_report(result, tmp_path / "backbones", backbones=[random], stacks=stacks[:1], png=False)
    readme = (tmp_path / "backbones" / "README.md").read_text(encoding="utf-8")
    assert RANDOM_NOTE in readme and random.label() in readme
    assert json.loads((tmp_path / "backbones" / "run.json").read_text())["random_weights"] is True
    # A real backbone's figure carries no such banner.
    plain = backbones_figure([{"backbone": "filterbank", "backbone_label": "Filter bank", "stack": "a", "n": 1,
                               "dice": 0.5, "dice_std": 0.0}])
    assert not any(RANDOM_NOTE in a.text for a in plain.layout.annotations)


def test_cli_all_writes_csv_html_and_readme(folder, capsys):
    out = folder / "out"
    code = cli.main(["experiments", "all", str(folder / "alpha.tif"), str(folder / "beta.tif"), "--image-channel", "0",
                     "--mask-channel", "1", "--backbone", "filterbank", "--option", "image_size=196", "--seeds", "1",
                     "--slices", "3", "--skip-ends", "0", "--point-counts", "2,5", "--thresholds", "5:15:5",
                     "--no-umap", "--no-png", "--cache", str(folder / "cache"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "## backbones" in printed and "## transfer" in printed
    expected = {
        "backbones": ["summary.csv", "per_stack.csv", "slices.csv", "dice_per_stack.html"],
        "separability": ["summary.csv", "slices.csv", "projection.csv", "projection_filterbank.html"],
        "points": ["summary.csv", "slices.csv", "dice_vs_points.html"],
        "threshold": ["summary.csv", "slices.csv", "dice_vs_threshold.html"],
        "transfer": ["matrix.csv", "cells.csv", "settings.csv", "slices.csv", "transfer_matrix_filterbank.html"],
    }
    for name, files in expected.items():
        for file in files + ["README.md", "run.json"]:
            assert (out / name / file).is_file(), f"{name}/{file} missing"
        assert not list((out / name).glob("*.png"))
        info = json.loads((out / name / "run.json").read_text())
        assert info["command"].startswith("python -m core experiments all") and info["random_weights"] is False
        assert info["backbones"][0]["label"].startswith("Filter bank")
    threshold_lines = (out / "threshold" / "summary.csv").read_text().splitlines()
    assert threshold_lines[0].startswith("backbone,backbone_label,stack,top_percent,n,dice,dice_std")
    assert len(threshold_lines) == 1 + 3 * 3  # (alpha, beta, all) x (5, 10, 15) %
    assert "cdn.plot.ly" in (out / "backbones" / "dice_per_stack.html").read_text()
    index = (out / "README.md").read_text()
    assert all(f"[{name}]({name}/README.md)" in index for name in expected)


def test_cli_needs_an_experiment_and_ground_truth(folder, capsys):
    assert cli.main(["experiments", str(folder / "alpha.tif"), "--image-channel", "0", "--mask-channel", "1"]) == 2
    assert "name an experiment first" in capsys.readouterr().err
    assert cli.main(["experiments", "backbones", str(folder / "alpha.tif"), "--image-channel", "0"]) == 2
    assert "--mask-channel" in capsys.readouterr().err


@pytest.mark.slow
def test_umap_scatter_is_seeded_and_places_the_prototypes():
    # ~1.5-2 min: UMAP's numba compilation on a 2-core machine.
    rng = np.random.default_rng(0)
    structure = rng.normal(size=(60, 8)) + np.eye(8)[0] * 4
    background = rng.normal(size=(90, 8)) - np.eye(8)[0] * 4
    embeddings = np.vstack([structure, background]).astype(np.float32)
    labels = np.arange(150) < 60
    positive, negative = structure.mean(axis=0), background.mean(axis=0)
    first, _ = projection_rows(embeddings, labels, positive, negative, methods=("umap",), max_points=100, umap_max_samples=80)
    again, _ = projection_rows(embeddings, labels, positive, negative, methods=("umap",), max_points=100, umap_max_samples=80)
    assert first == again and len(first) == 102
    xy = {kind: np.array([[r["x"], r["y"]] for r in first if r["kind"] == kind]) for kind in COLOURS}
    # Each prototype lands nearer its own class's centre than the other's.
    for own, other, prototype in (("structure", "background", "positive prototype"),
                                  ("background", "structure", "negative prototype")):
        point = xy[prototype][0]
        assert np.linalg.norm(point - xy[own].mean(0)) < np.linalg.norm(point - xy[other].mean(0))


def test_cli_help_lists_the_experiments(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["experiments", "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    assert "{backbones,separability,points,threshold,transfer,all}" in text and "--no-png" in text


def test_failed_png_export_warns_and_keeps_the_html(tmp_path, monkeypatch):
    import plotly.graph_objects as go
    import plotly.io as pio

    def no_browser(*args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    monkeypatch.setattr(pio, "write_images", no_browser)
    warnings = []
    written = write_figures({"bars": go.Figure(go.Bar(x=[1], y=[1]))}, tmp_path, png=True, warn=warnings.append)
    assert written == [tmp_path / "bars.html"] and (tmp_path / "bars.html").is_file()
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*"))
    assert len(warnings) == 1 and "PNG export failed" in warnings[0] and "Chrome" in warnings[0]


def test_png_export_writes_through_temp_files(tmp_path, monkeypatch):
    """kaleido writes into atomic temps (suffix .png kept, so it picks the format); each is renamed to <stem>.png."""
    import plotly.graph_objects as go
    import plotly.io as pio

    targets = []

    def fake_write_images(figures, paths, width, height):
        for path in paths:
            targets.append(path)
            path.write_bytes(b"png")

    monkeypatch.setattr(pio, "write_images", fake_write_images)
    figures = {"a": go.Figure(go.Bar(x=[1], y=[1])), "b": go.Figure(go.Bar(x=[2], y=[2]))}
    written = write_figures(figures, tmp_path, png=True)
    assert [p.name for p in written] == ["a.html", "b.html", "a.png", "b.png"]
    assert len(targets) == 2 and all(t.suffix == ".png" and t.parent == tmp_path for t in targets)
    assert {t.name for t in targets}.isdisjoint({"a.png", "b.png"})
    assert (tmp_path / "a.png").read_bytes() == b"png" and not list(tmp_path.glob(".*"))
