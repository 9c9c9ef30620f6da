"""The `ovseg` command line: segment, methods, bench, flags mapped onto SegmenterConfig."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from ovseg_ros import cli
from ovseg_ros.commands.config import config_from_args

TINY = [
    "--model",
    "ovseg-tiny",
    "--pretrained",
    "none",
    "--templates",
    "single",
    "--text-cache-dir",
    "off",
]


@pytest.fixture()
def image_dir(tmp_path):
    """A folder with two small PNG photos (random content) and one non-image file."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "a.png"), rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "b.jpg"), rng.integers(0, 256, (90, 50, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_segment_writes_labels_overlay_and_json(image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(
        [
            "segment",
            str(image_dir),
            "--out",
            str(out),
            "--classes",
            "cat",
            "dog; puppy",
            "--method",
            "sclip",
            "-q",
            *TINY,
        ]
    )
    assert code == 0
    for stem, shape in (("a", (40, 70)), ("b", (90, 50))):
        labels = cv2.imread(str(out / f"{stem}_labels.png"), cv2.IMREAD_UNCHANGED)
        assert labels.shape == shape and labels.dtype == np.uint8
        assert set(np.unique(labels)) <= {0, 1, 255}
        overlay = cv2.imread(str(out / f"{stem}_overlay.png"))
        assert overlay.shape == (*shape, 3)
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["method"] == "sclip"
        assert summary["size"] == list(shape)
        assert [c["name"] for c in summary["vocabulary"]["classes"]] == ["cat", "dog"]
        assert summary["vocabulary"]["classes"][1]["synonyms"] == ["dog", "puppy"]
        # the JSON's class fractions are those of the label PNG
        for item in summary["classes"]:
            assert item["fraction"] == pytest.approx(np.mean(labels == item["id"]), abs=1e-5)
    assert "wrote 2 result(s)" in capsys.readouterr().out


def test_segment_samples_and_unreadable_file_is_reported(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"definitely not a png")
    out = tmp_path / "out"
    code = cli.main(["segment", str(bad), "--samples", "--out", str(out), *TINY])
    captured = capsys.readouterr()
    assert code == 1  # one input could not be read: said, not silently dropped
    assert "skipped" in captured.err and "broken.png" in captured.err
    assert (out / "astronaut_overlay.png").is_file()
    assert (out / "chelsea.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--classes"], "vocabulary is empty"),
        (["--classes", "cat", "Cat"], "duplicate name"),
        (["--method", "nope"], "unknown method"),
        (["--param", "sigma=-1"], "sigma"),
        (["--param", "nonsense=1"], "has no parameter"),
        (["--param", "novalue"], "NAME=VALUE"),
        (["--mode", "slide", "--crop", "64", "--stride", "128"], "stride"),
        (["--prob-threshold", "1.5"], "prob_threshold"),
    ],
)
def test_bad_parameters_exit_2_with_reason(args, message, tmp_path, capsys):
    code = cli.main(["segment", "--samples", "--out", str(tmp_path), *TINY, *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_weights_error_and_fallback(tmp_path, capsys):
    args = [
        "segment",
        "--samples",
        "--out",
        str(tmp_path / "o"),
        "--model",
        "ovseg-tiny",
        "--templates",
        "single",
        "--text-cache-dir",
        "off",
        "-q",
        "--checkpoint",
        str(tmp_path / "missing.pt"),
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "missing.pt" in err and "does not exist" in err and "Traceback" not in err
    assert cli.main([*args, "--fallback-random"]) == 0
    assert (tmp_path / "o" / "rocket_labels.png").is_file()


def test_flags_map_onto_config_fields():
    parser = cli.build_parser()
    args = parser.parse_args(
        [
            "segment",
            "--short-side",
            "224",
            "--mode",
            "slide",
            "--background-words",
            "--method",
            "naclip",
            "--param",
            "sigma=3",
            "--refine",
            "pamr",
            "--inference-max-batch",
            "4",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.short_side, cfg.mode, cfg.refine, cfg.max_batch) == (224, "slide", "pamr", 4)
    assert cfg.background_words == []
    assert cfg.method_params == {"sigma": "3"}
    untouched = config_from_args(parser.parse_args(["segment"]))
    assert untouched == type(cfg)()  # defaults come from the dataclass alone


def test_methods_lists_registry(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("clip", "maskclip", "sclip", "clearclip", "naclip"):
        assert name in out
    assert "sigma=5.0" in out


def test_bench_prints_a_row_per_method_and_mode(capsys):
    code = cli.main(
        [
            "bench",
            "--size",  # the old single-size flag still works
            "96x64",
            "--repeats",
            "1",
            "--methods",
            "naclip",
            "clearclip",
            "--modes",
            "whole",
            "slide",
            "--text-templates",
            "single",
            "--steps-size",
            "none",
            "--agreement-frames",
            "0",
            "-q",
            *TINY,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for row in ("| naclip | 96x64 | whole |", "| naclip | 96x64 | slide |", "| clearclip |"):
        assert row in out
    assert "Truncation x" in out and "disk cache hit" in out


def test_bench_matrix_flags_skip_impossible_variants_and_write_files(tmp_path, capsys):
    out_dir = tmp_path / "bench"
    code = cli.main(
        [
            "bench",
            "--sizes",
            "64x48",
            "80x60",
            "--methods",
            "naclip",
            "--devices",
            "cpu",
            "cuda:7",
            "--precisions",
            "fp32",
            "fp16",
            "--threads",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--steps-size",
            "64x48",
            "--text-templates",
            "none",
            "--short-side",
            "64",
            "--out",
            str(out_dir),
            "-q",
            *TINY,
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "| cpu fp32 1 threads | naclip | 64x48 | whole |" in captured.out
    assert "| cpu fp32 1 threads | naclip | 80x60 | whole |" in captured.out
    assert "skipped cpu fp16" in captured.out and "skipped device cuda:7" in captured.out
    assert "Outside the ViT" in captured.out
    data = json.loads((out_dir / "bench.json").read_text())
    assert len(data["rows"]) == 2 and data["settings"]["variants"] == ["cpu fp32 1 threads"]
    assert (out_dir / "bench.md").read_text().count("| cpu fp32 1 threads |") == 2
    assert (out_dir / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_a_bad_size(capsys):
    assert cli.main(["bench", "--sizes", "640by480", *TINY]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_console_script_runs_as_module():
    done = subprocess.run(
        [sys.executable, "-m", "ovseg_ros.cli", "methods"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "naclip" in done.stdout
