"""The engine benchmark: matrix rows and skips, peak memory, agreement, step breakdown, text
timings and the files it writes (tiny model, tiny frames: the figures themselves mean nothing)."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG

from ovseg_ros.benchmarks import machine
from ovseg_ros.benchmarks.common import (
    label_agreement,
    parse_size,
    photo_frames,
    segmenter_agreement,
)
from ovseg_ros.benchmarks.engine_bench import run_engine_bench
from ovseg_ros.benchmarks.machine import PeakMemory
from ovseg_ros.benchmarks.matrix import run_matrix
from ovseg_ros.benchmarks.report import (
    format_engine_bench,
    format_steps,
    format_text,
    write_outputs,
)
from ovseg_ros.benchmarks.steps import step_breakdown
from ovseg_ros.benchmarks.text import bench_text
from ovseg_ros.benchmarks.variants import Variant, plan_variants
from ovseg_ros.engine import SegmenterConfig

#: Small model input so that every frame takes milliseconds.
FAST = {**TINY_CONFIG, "short_side": 64, "crop": 48, "stride": 32}


@pytest.fixture
def no_cuda(monkeypatch):
    """Pretend there is no GPU, so that the skips are the same on every machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_parse_size():
    assert parse_size("640x480") == (480, 640)
    assert parse_size("1280X720") == (720, 1280)
    for bad in ("640", "axb", "0x10", "640x480x3"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_plan_skips_impossible_combinations_with_a_note(no_cuda):
    variants, notes = plan_variants(
        ["cpu", "cuda"], ["fp32", "bf16", "fp16"], ["none", "int8"], ["none"], [0]
    )
    assert [v.label for v in variants] == ["cpu fp32", "cpu fp32 int8", "cpu bf16"]
    text = "\n".join(notes)
    assert "skipped device cuda" in text
    assert "skipped cpu fp16" in text and "skipped cpu bf16 int8" in text
    assert text.count("skipped device cuda") == 1  # one note per missing device, not per combo
    auto, _ = plan_variants(["auto"], ["auto"])
    assert auto == [Variant("cpu", "fp32")]
    assert Variant("cpu", "fp32").is_reference and not Variant("cpu", "bf16").is_reference
    assert (
        Variant("cpu", "fp32", "int8", "default", 2).label
        == "cpu fp32 int8 compile=default 2 threads"
    )


def test_matrix_has_one_row_per_combination(no_cuda):
    cfg = SegmenterConfig(**FAST)
    result = run_engine_bench(
        cfg,
        ["naclip", "clip"],
        ["whole", "slide"],
        [(48, 64), (40, 80)],
        repeats=2,
        text_templates=None,
        devices=["cpu", "cuda"],
        precisions=["fp32", "fp16"],
        agreement_frames=0,
        steps_size=None,
    )
    rows = result.matrix.rows
    combos = {(r.variant, r.method, r.size, r.mode) for r in rows}
    assert len(rows) == len(combos) == 2 * 2 * 2
    assert {r.size for r in rows} == {"64x48", "80x40"}
    assert all(r.variant == "cpu fp32" and len(r.samples) == 2 for r in rows)
    for r in rows:
        assert 0 < r.p50 <= r.p95 and r.fps == pytest.approx(1e3 / np.mean(r.samples))
        assert r.cpu_peak_rss_mib > 0 and r.gpu_peak_allocated_mib is None
        assert r.agreement is None  # the reference itself
    notes = "\n".join(result.matrix.notes)
    assert "skipped cpu fp16" in notes and "skipped device cuda" in notes
    report = format_engine_bench(result)
    assert "| cpu fp32 | naclip | 80x40 | slide |" in report
    assert "skipped cpu fp16" in report and "1000 / mean" in report


def test_variants_are_compared_with_fp32_eager_of_the_same_frames(no_cuda):
    cfg = SegmenterConfig(**FAST)
    # bf16 asked for without fp32: an fp32 reference is built for the comparison only.
    result = run_matrix(cfg, [Variant("cpu", "bf16")], ["naclip"], [(48, 64)], ["whole"], 1)
    assert [r.variant for r in result.rows] == ["cpu bf16"]
    assert 0.0 <= result.rows[0].agreement <= 1.0
    assert ("cpu", "naclip", "64x48", "whole") in result.references
    assert any("only indicative" in n for n in result.notes)


def test_agreement_of_a_segmenter_with_itself_is_one(make_segmenter):
    seg = make_segmenter(short_side=64)
    frames = photo_frames((48, 64), 2)
    assert segmenter_agreement(seg, seg, frames) == 1.0
    a = np.array([[0, 1], [2, 255]], np.uint8)
    assert label_agreement(a, a) == 1.0
    assert label_agreement(a, np.array([[0, 1], [3, 3]], np.uint8)) == 0.5
    with pytest.raises(ValueError):
        label_agreement(a, a[:1])


def test_peak_memory_is_positive_with_and_without_the_reset(monkeypatch):
    with PeakMemory(torch.device("cpu")) as mem:
        block = np.ones(32 * 2**20, np.uint8)  # 32 MiB touched inside the block
        del block
    assert mem.cpu_rss_mib > 32 and mem.gpu_allocated_mib is None
    monkeypatch.setattr(machine, "reset_rss_peak", lambda: False)
    with PeakMemory(torch.device("cpu")) as fallback:
        pass
    assert fallback.cpu_rss_mib > 0 and "ru_maxrss" in fallback.cpu_source


def test_step_breakdown_lists_every_step_and_shares_sum_to_one(make_segmenter):
    seg = make_segmenter(short_side=64, method="naclip")  # PEARL adds its TLP step (test_pearl)
    b = step_breakdown(seg, (60, 80), repeats=2, variant="cpu fp32")
    names = list(b.steps)
    expected = [
        "decode",
        "to tensor + resize",
        "normalise",
        "ViT",
        "labels",
        "device->host",
        "confidence",
        "masks",
        "overlay",
        "messages",
    ]
    assert len(names) == len(expected)
    for name, prefix in zip(names, expected, strict=True):
        assert name.startswith(prefix)
    assert all(ms >= 0 for ms in b.steps.values()) and b.steps[b.vit_step] > 0
    assert sum(b.shares().values()) == pytest.approx(1.0)
    assert b.outside_vit_ms == pytest.approx(b.total_ms - b.steps[b.vit_step])
    assert 0 < b.outside_vit_share < 1 and b.segment_ms > 0
    assert "masks (11, one per class)" in names  # the default vocabulary
    slide = step_breakdown(seg, (60, 80), repeats=1, mode="slide")
    assert list(slide.steps) == names  # the same steps: the crops are part of the ViT step
    assert slide.mode == "slide"
    text = format_steps(b)
    assert "Outside the ViT" in text and "< 10% target" in text


def test_text_timings_have_cold_truncated_and_cached(make_segmenter):
    seg = make_segmenter()
    t = bench_text(seg, "single")
    assert t["prompts"] == 20 and t["classes"] == 20
    for key in ("cold_s", "truncated_s", "cached_disk_s", "cached_memory_s"):
        assert t[key] > 0
    assert t["cache_hit_without_model"]  # the second encoder read the disk, ran no model
    assert t["max_abs_diff_truncated"] < 1e-4
    assert 2 < t["context"] < 77
    assert "disk cache hit" in format_text(t)


def test_outputs_are_json_markdown_and_a_png(tmp_path, no_cuda):
    cfg = SegmenterConfig(**FAST)
    result = run_engine_bench(
        cfg,
        ["naclip", "sclip"],
        ["whole"],
        [(48, 64), (64, 96)],
        repeats=1,
        text_templates="single",
        precisions=["fp32", "bf16"],
        agreement_frames=1,
        steps_size=(48, 64),
    )
    paths = write_outputs(result, tmp_path / "out", command="ovseg bench ...", date="2026-11-21")
    data = json.loads(paths["json"].read_text())
    assert data["date"] == "2026-11-21" and len(data["rows"]) == 2 * 2 * 2
    assert data["steps"]["size"] == "64x48" and data["text"]["prompts"] == 20
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"] == torch.__version__
    bf16 = [r for r in data["rows"] if r["precision"] == "bf16"]
    assert all(0 <= r["agreement"] <= 1 for r in bf16)
    md = paths["md"].read_text()
    assert md.startswith("# ovseg bench, 2026-11-21") and "| cpu bf16 | sclip | 96x64 |" in md
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import cv2

    image = cv2.imread(str(paths["png"]))
    assert image is not None and image.shape[0] > 200 and image.shape[1] > 200


def test_the_message_bench_times_both_forms_of_every_output(capsys):
    from ovseg_ros.benchmarks import messages

    rows = messages.measure(sizes=((6, 8),), repeats=3)
    names = [name for _, name, _, _ in rows]
    assert names == [
        "labels (mono8)",
        "confidence (mono8)",
        "overlay (rgb8)",
        "labels + confidence + overlay",
        f"{messages.CLASSES} masks",
    ]
    assert all(size == "8x6" and as_msg > 0 and as_bytes > 0 for size, _, as_msg, as_bytes in rows)
    assert rows[3][2] == pytest.approx(sum(r[2] for r in rows[:3]))
    assert messages.main(["--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 1280x720 | overlay (rgb8) |" in out and out.count("\n") == 12
    with pytest.raises(SystemExit):
        messages.main(["--repeats", "0"])
