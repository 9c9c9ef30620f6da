"""`ovseg eval` end to end (tiny random model), its config precedence and the runner's rules."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from ovseg_ros import cli
from ovseg_ros.evaluation.cli import dataset_spec, eval_config, eval_vocabulary
from ovseg_ros.evaluation.datasets import folder_spec
from ovseg_ros.evaluation.metrics import IGNORE_INDEX
from ovseg_ros.evaluation.runner import check_vocabulary, evaluate
from ovseg_ros.evaluation.vocabularies import parse_lines

TINY = [
    "--model",
    "ovseg-tiny",
    "--pretrained",
    "none",
    "--templates",
    "single",
    "--text-cache-dir",
    "none",
    "--device",
    "cpu",
    "-q",
]


def run_eval(*args: str) -> int:
    """Run `ovseg eval ...` in this process with the tiny random model."""
    return cli.main(["eval", *args, *TINY])


def test_voc_samples_end_to_end_writes_json_and_markdown_reproducibly(
    shared_data, tmp_path, capsys
):
    root = shared_data / "voc2012_val_samples"
    reports = []
    for run in ("a", "b"):
        out = tmp_path / run
        code = run_eval(
            "--dataset", "voc21", "--root", str(root), "--limit", "3", "--out", str(out),
            "--short-side", "224",  # one 224 window per image keeps the test fast
        )  # fmt: skip
        assert code == 0
        reports.append(json.loads((out / "eval.json").read_text()))
        markdown = (out / "eval.md").read_text()
        assert "| class | IoU | Acc |" in markdown and "| tvmonitor |" in markdown
    printed = capsys.readouterr().out
    assert printed.count("| **mean** |") == 2
    first, second = reports
    assert first["metrics"] == second["metrics"]  # random weights, but deterministic
    assert first["images"] == 3 and first["failed"] == []
    assert first["dataset"]["images_found"] == 14 and first["dataset"]["limit"] == 3
    assert len(first["metrics"]["classes"]) == 21
    assert 0 <= first["metrics"]["mIoU"] <= 100
    # the protocol's preset (the default method PEARL's: VOC21 on the whole image), with the
    # engine flags given on the command line on top
    assert first["config"]["short_side"] == 224 and first["config"]["mode"] == "whole"
    assert first["config"]["prob_threshold"] == 0.1 and first["config"]["templates"] == "single"
    assert first["vocabulary"]["background_class"] == 0
    assert len(first["vocabulary"]["background_words"]) == 26
    assert "random" in first["model"]["weights"]
    # every evaluated pixel is in the matrix exactly once
    gt_pixels = sum(c["gt_pixels"] for c in first["metrics"]["classes"])
    assert gt_pixels == sum(c["pred_pixels"] for c in first["metrics"]["classes"]) > 0


def test_missing_root_exits_2_naming_path_and_layout(tmp_path, capsys):
    code = run_eval("--dataset", "ade20k", "--root", str(tmp_path / "nowhere"))
    err = capsys.readouterr().err
    assert code == 2
    assert "nowhere does not exist" in err and "images/validation" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vocabulary", "ade20k"], "has 150 classes but PASCAL VOC 2012 (21 classes) has 21"),
        (["--vocabulary", "nope"], "no vocabulary called 'nope'"),
        (["--limit", "-1"], "--limit must be >= 0"),
        (["--save-predictions"], "--save-predictions needs --out"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, args, message):
    code = run_eval("--dataset", "voc21", "--root", str(tmp_path), *args)
    assert code == 2 and message in capsys.readouterr().err


def make_folder(root, broken: bool = True):
    """images/ + labels/ with classes.txt (background, cat, dog) and optionally a broken image."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("background: sky; wall\ncat\ndog; puppy\n")
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(
            root / "images" / f"im{i}.png"
        )
        label = np.zeros((40, 56), np.uint8)
        label[10:30, 10:30] = 1 + i
        label[0] = IGNORE_INDEX
        Image.fromarray(label).save(root / "labels" / f"im{i}.png")
    if broken:
        (root / "images" / "im2.jpg").write_bytes(b"broken")
        Image.fromarray(np.zeros((40, 56), np.uint8)).save(root / "labels" / "im2.png")


def test_folder_dataset_reports_and_counts_an_unreadable_image(tmp_path, capsys):
    make_folder(tmp_path / "data")
    out = tmp_path / "out"
    code = run_eval(
        "--dataset", "folder", "--root", str(tmp_path / "data"), "--out", str(out),
        "--save-predictions", "--short-side", "64", "--mode", "whole",
    )  # fmt: skip
    assert code == 1  # one image could not be evaluated: said, not fatal
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 2
    assert [f["name"] for f in report["failed"]] == ["im2"]
    assert "im2.jpg" in report["failed"][0]["error"]
    assert [c["name"] for c in report["metrics"]["classes"]] == ["background", "cat", "dog"]
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["im0.png", "im1.png"]
    assert "could not be evaluated" in (out / "eval.md").read_text()
    assert "skipped im2" in capsys.readouterr().err


def parse(*args: str):
    """Parsed `ovseg eval` flags."""
    return cli.build_parser().parse_args(["eval", *args])


def test_config_precedence_protocol_preset_class_file_flags(tmp_path):
    args = parse("--dataset", "voc21", "--root", str(tmp_path))
    vocab = eval_vocabulary(args)
    cfg = eval_config(args, dataset_spec(args, vocab), vocab)
    assert (cfg.short_side, cfg.prob_threshold, cfg.templates) == (336, 0.1, "imagenet80")

    args = parse("--dataset", "cityscapes", "--root", str(tmp_path))
    vocab = eval_vocabulary(args)
    cfg = eval_config(args, dataset_spec(args, vocab), vocab)
    assert (cfg.short_side, cfg.mode, cfg.crop, cfg.stride) == (560, "slide", 224, 112)
    assert cfg.prob_threshold == 0.0 and cfg.background_words == []
    assert cfg.vocabulary[6] == "traffic light"

    args = parse(
        "--dataset", "voc21", "--root", str(tmp_path), "--short-side", "224",
        "--prob-threshold", "0.3", "--background-words", "sky", "--method", "naclip",
        "--param", "sigma=3",
    )  # fmt: skip
    vocab = eval_vocabulary(args)
    cfg = eval_config(args, dataset_spec(args, vocab), vocab)
    assert (cfg.short_side, cfg.prob_threshold, cfg.background_words) == (224, 0.3, ["sky"])
    assert cfg.method_params == {"sigma": "3"} and len(cfg.vocabulary) == 20

    args = parse("--dataset", "folder", "--root", str(tmp_path), "--classes", "cat", "dog; pup")
    vocab = eval_vocabulary(args)
    assert vocab.names == ("cat", "dog") and vocab.background is None
    assert eval_config(args, dataset_spec(args, vocab), vocab).vocabulary == ["cat", "dog; pup"]


def test_folder_without_class_file_is_a_clear_error(tmp_path, capsys):
    code = run_eval("--dataset", "folder", "--root", str(tmp_path))
    assert code == 2 and "classes.txt" in capsys.readouterr().err


# make_folder's gt over both images: 20x20 of cat, 20x20 of dog, the rest background (row 0 ignored)
FG = 400
BG = 2 * (39 * 56 - FG)


@pytest.mark.parametrize("background", [True, False])
def test_unlabeled_predictions_map_to_background_or_miss(tmp_path, make_segmenter, background):
    make_folder(tmp_path, broken=False)
    lines = ["background: sky", "cat", "dog"] if background else ["other", "cat", "dog"]
    vocab = parse_lines(lines, "t", "t")
    segmenter = make_segmenter(
        vocabulary=vocab.engine_entries(), background_words=vocab.background_words, short_side=32
    )
    real = segmenter.segment

    def everything_unlabeled(rgb):
        result = real(rgb)
        return dataclasses.replace(result, labels=np.full_like(result.labels, result.unlabeled))

    segmenter.segment = everything_unlabeled
    report = evaluate(segmenter, folder_spec(3).open(tmp_path), vocab, progress=False)
    m = report["metrics"]
    assert [c["gt_pixels"] for c in m["classes"]] == [BG, FG, FG]
    if background:  # every pixel is predicted as the background class
        assert [c["pred_pixels"] for c in m["classes"]] == [BG + 2 * FG, 0, 0]
        assert [c["IoU"] for c in m["classes"]] == pytest.approx([100 * BG / (BG + 2 * FG), 0, 0])
        assert m["aAcc"] == pytest.approx(100 * BG / (BG + 2 * FG))
    else:  # a miss for every gt class, a false positive for none
        assert [c["pred_pixels"] for c in m["classes"]] == [0, 0, 0]
        assert [c["IoU"] for c in m["classes"]] == [0, 0, 0] and m["aAcc"] == 0


def test_segmenter_with_another_vocabulary_is_refused(make_segmenter):
    vocab = parse_lines(["background: sky", "cat", "dog"], "t", "t")
    with pytest.raises(ValueError, match="not the evaluation vocabulary"):
        check_vocabulary(make_segmenter(vocabulary=["cat", "bird"]), vocab)
