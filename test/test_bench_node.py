"""The node benchmark runs end to end (tiny model) and reports consistent figures, one frame at a
time and streaming at 30 Hz."""

import json

import pytest
from rosutil import next_domain_id

from ovseg_ros.engine import SegmenterConfig
from ovseg_ros.ros.bench_node import (
    config_parameters,
    format_node_bench,
    run_node_bench,
    write_node_outputs,
)

pytestmark = pytest.mark.ros


def test_config_parameters_round_trip():
    cfg = SegmenterConfig(method="sclip", method_params={"logit_scale": 30.0}, short_side=224)
    params = config_parameters(cfg)
    assert params["method"] == "sclip" and params["input.short_side"] == 224
    assert params["method_params.logit_scale"] == 30.0
    assert SegmenterConfig.from_params(params) == cfg


def test_node_bench_reports_engine_and_node_latency(tiny_backbone, monkeypatch):
    monkeypatch.setenv("ROS_DOMAIN_ID", str(next_domain_id()))
    cfg = SegmenterConfig(
        model_name="ovseg-tiny",
        model_pretrained="none",
        device="cpu",
        templates="single",
        text_cache_dir="none",
    )
    result = run_node_bench(cfg, (120, 160), frames=3, backbone=tiny_backbone)
    assert result["frames"] == 3 and result["size"] == "160x120"
    for name in ("labels", "confidence", "overlay"):
        stats = result["node_per_output_ms"][name]
        assert 0 < stats["p50"] <= result["node_end_to_end_ms"]["p95"] + 1e-6
    assert result["overhead_ratio_p50"] > 0
    assert result["stream"] is None  # no streaming phase asked for
    table = format_node_bench(result)
    assert "Node overhead over the engine: x" in table and "~/overlay" in table


def test_node_stream_reports_rates_and_drops_that_add_up(tiny_backbone, monkeypatch, tmp_path):
    monkeypatch.setenv("ROS_DOMAIN_ID", str(next_domain_id()))
    cfg = SegmenterConfig(
        model_name="ovseg-tiny",
        model_pretrained="none",
        device="cpu",
        templates="single",
        text_cache_dir="none",
    )
    result = run_node_bench(
        cfg, (120, 160), frames=1, backbone=tiny_backbone, duration=2.0, rate=30.0
    )
    st = result["stream"]
    published = st["published"]
    assert 10 <= published <= 70  # about 60 in 2 s at 30 Hz (fewer on a busy machine)
    assert 0 < st["input_rate_hz"] < 45
    assert st["outputs_complete"] >= 1 and st["output_rate_hz"] >= 0
    assert st["outputs_complete"] + st["drops"] == published
    assert st["drop_fraction"] == pytest.approx(st["drops"] / published)
    for name in ("labels", "confidence", "overlay"):
        assert st["outputs_complete"] <= st["per_output_count"][name] <= published
        assert st["node_per_output_ms"][name]["p50"] > 0
    assert st["node_end_to_end_ms"]["p50"] <= st["node_end_to_end_ms"]["p95"]
    c = st["node_counters"]
    assert st["drained"]
    assert c["received"] <= published
    assert c["processed"] + c["dropped"] + c["failed"] == c["received"]
    assert c["published"] == st["outputs_complete"]
    # every drop is a frame the node replaced before inference, or one that never reached it
    assert st["drops"] == c["dropped"] + (published - c["received"]) + c["failed"]
    table = format_node_bench(result)
    assert "Streaming, 30 Hz for 2 s" in table and "Node counters in the stream" in table
    paths = write_node_outputs(result, tmp_path, command="ovseg bench --node", date="2026-11-21")
    assert json.loads(paths["json"].read_text())["stream"]["published"] == published
    assert "Streaming" in paths["md"].read_text()
