"""The node benchmark runs end to end (tiny model) and reports consistent figures."""

import pytest
from rosutil import next_domain_id

from ovseg_ros.engine import SegmenterConfig
from ovseg_ros.ros.bench_node import config_parameters, format_node_bench, run_node_bench

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
    table = format_node_bench(result)
    assert "Node overhead over the engine: x" in table and "~/overlay" in table
