"""The node benchmark runs end to end (tiny model) and reports consistent figures, one frame at a
time and streaming at 30 Hz."""

import json

import pytest
from rosutil import next_domain_id, ros_context, spin_until

from ovseg_ros.engine import SegmenterConfig
from ovseg_ros.ros.bench_node import (
    format_node_bench,
    run_node_bench,
    write_node_outputs,
)
from ovseg_ros.ros.bench_node_session import config_parameters

pytestmark = pytest.mark.ros

#: The tiny random-weight model on the CPU, text encoded once per vocabulary without a cache.
TINY = {
    "model_name": "ovseg-tiny",
    "model_pretrained": "none",
    "device": "cpu",
    "templates": "single",
    "text_cache_dir": "none",
}


def test_config_parameters_round_trip():
    cfg = SegmenterConfig(method="sclip", method_params={"logit_scale": 30.0}, short_side=224)
    params = config_parameters(cfg)
    assert params["method"] == "sclip" and params["input.short_side"] == 224
    assert params["method_params.logit_scale"] == 30.0
    assert SegmenterConfig.from_params(params) == cfg


def test_node_bench_reports_engine_and_node_latency(tiny_backbone, monkeypatch):
    monkeypatch.setenv("ROS_DOMAIN_ID", str(next_domain_id()))
    cfg = SegmenterConfig(**TINY)
    result = run_node_bench(cfg, (120, 160), frames=3, backbone=tiny_backbone)
    assert result["frames"] == 3 and result["size"] == "160x120"
    for name in ("labels", "confidence", "overlay"):
        stats = result["node_per_output_ms"][name]
        assert 0 < stats["p50"] <= result["node_end_to_end_ms"]["p95"] + 1e-6
    assert result["overhead_ratio_p50"] > 0
    assert result["overlay_ms"]["p50"] > 0
    assert result["overhead_besides_overlay_ms_p50"] == pytest.approx(
        result["overhead_ms_p50"] - result["overlay_ms"]["p50"]
    )
    # The floor: the same traffic through a relay node, in the same run.
    assert result["relay_floor_ms"]["p50"] > 0
    floor = result["relay_floor_ms"]["p50"]
    assert result["own_work_ms_p50"] == pytest.approx(result["overhead_ms_p50"] - floor)
    assert result["own_work_besides_overlay_ms_p50"] == pytest.approx(
        result["overhead_besides_overlay_ms_p50"] - floor
    )
    assert result["stream"] is None  # no streaming phase asked for
    table = format_node_bench(result)
    assert "Node overhead over the engine: x" in table and "~/overlay" in table
    assert "Of that, the overlay with its legend" in table
    assert "DDS and rclpy alone for the same messages" in table


def test_the_floor_relay_answers_a_frame_with_output_sized_messages():
    """bench_relay: every output back at once, with the node's encodings, sizes and header."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from ovseg_ros.ros.bench_relay import Relay, relayable

    assert relayable(("labels", "confidence", "overlay")) and not relayable(("masks",))
    with pytest.raises(ValueError, match="stands for"):
        Relay(None, "x", (4, 4), ("labels", "points"))
    with ros_context(next_domain_id()) as context:
        relay = Relay(context, "floor_test", (48, 64), ("labels", "confidence", "overlay"))
        peer = Node("floor_peer", context=context)
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        got: dict[str, Image] = {}
        for topic in relay.topics:
            peer.create_subscription(Image, topic, lambda m, t=topic: got.setdefault(t, m), qos)
        camera = peer.create_publisher(Image, relay.input, qos)
        executor = SingleThreadedExecutor(context=context)
        for node in (relay.node, peer):
            executor.add_node(node)
        try:
            assert spin_until(executor, lambda: camera.get_subscription_count() == 1, timeout=15)
            assert spin_until(
                executor,
                lambda: all(relay.node.count_subscribers(t) == 1 for t in relay.topics),
                timeout=15,
            )
            frame = Image(height=48, width=64, encoding="rgb8", step=192)
            frame.data = bytes(48 * 64 * 3)
            frame.header.frame_id = "cam"
            frame.header.stamp.sec, frame.header.stamp.nanosec = 12, 345
            camera.publish(frame)
            assert spin_until(executor, lambda: len(got) == 3, timeout=15)
        finally:
            executor.shutdown()
            relay.destroy()
            peer.destroy_node()
    assert relay.relayed == 1
    shapes = {
        t.rsplit("/", 1)[1]: (m.encoding, m.width, m.height, len(m.data)) for t, m in got.items()
    }
    assert shapes == {
        "labels": ("mono8", 64, 48, 64 * 48),
        "confidence": ("mono8", 64, 48, 64 * 48),
        "overlay": ("rgb8", 64, 48, 64 * 48 * 3),
    }
    for msg in got.values():
        assert (msg.header.frame_id, msg.header.stamp.sec, msg.header.stamp.nanosec) == (
            "cam",
            12,
            345,
        )


def test_node_stream_reports_rates_and_drops_that_add_up(tiny_backbone, monkeypatch, tmp_path):
    monkeypatch.setenv("ROS_DOMAIN_ID", str(next_domain_id()))
    cfg = SegmenterConfig(**TINY)
    result = run_node_bench(
        cfg, (120, 160), frames=1, backbone=tiny_backbone, duration=2.0, rate=30.0
    )
    for st, cameras in ((result["stream"], 1), (result["stream_cameras"], 2)):
        assert st["cameras"] == cameras
        _check_stream(st, 30.0 * 2.0 * cameras)
    assert result["stream"]["output_over_engine_rate"] > 0
    assert result["stream_cameras"]["output_over_one_camera"] == pytest.approx(
        result["stream_cameras"]["output_rate_hz"] / result["stream"]["output_rate_hz"]
    )
    published = result["stream"]["published"]
    table = format_node_bench(result)
    assert "Streaming to one camera, 30 Hz for 2 s" in table
    assert (
        "Streaming to 2 cameras, 30 Hz for 2 s" in table and "Node counters in the stream" in table
    )
    assert "output rate / one camera's = " in table
    paths = write_node_outputs(result, tmp_path, command="ovseg bench --node", date="2026-11-21")
    assert json.loads(paths["json"].read_text())["stream"]["published"] == published
    assert "Streaming" in paths["md"].read_text()


def _check_stream(st, expected):
    """Rates, drops and counters of one streaming phase add up."""
    published = st["published"]
    assert expected / 6 <= published <= expected * 7 / 6  # fewer on a busy machine
    assert 0 < st["input_rate_hz"] < 45  # per camera
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


def test_merged_rounds_add_counts_and_keep_rates_per_interval():
    from ovseg_ros.ros.bench_node import _merge, stream_figures

    def part(intervals, span, e2e):
        return {
            "rate_hz": 30.0,
            "duration_s": 1.0,
            "cameras": 2,
            "published": 60,
            "input_intervals": 29,
            "input_span_s": 1.0,
            "outputs_complete": intervals + 1,
            "output_intervals": intervals,
            "output_span_s": span,
            "drops": 60 - intervals - 1,
            "per_output_count": {"labels": intervals + 1},
            "drained": True,
            "node_counters": {"received": 60},
            "end_to_end": e2e,
            "outputs": {"labels": e2e},
        }

    merged = _merge(part(9, 1.0, [10.0]), part(19, 1.0, [30.0]))
    assert merged["cameras"] == 2 and merged["rate_hz"] == 30.0 and merged["duration_s"] == 2.0
    assert merged["published"] == 120 and merged["node_counters"] == {"received": 120}
    st = stream_figures(merged, engine_rate_hz=20.0)
    assert st["output_rate_hz"] == pytest.approx(14.0)  # 28 intervals in 2 s
    assert st["output_over_engine_rate"] == pytest.approx(0.7)
    assert st["node_end_to_end_ms"]["p50"] == pytest.approx(20.0)


def test_node_bench_against_a_revision_runs_both_in_one_run(monkeypatch):
    """REV's node and this checkout's, each in a worker process, phases interleaved."""
    from pathlib import Path

    from ovseg_ros.ros.bench_node import format_node_against, run_node_against

    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    from ovseg_ros.ros import bench_node

    domain = next_domain_id()
    next_domain_id()  # the second worker's
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    domains = []
    start = bench_node._start_worker

    def start_worker(root, spec, worker_domain):
        domains.append(worker_domain)
        return start(root, spec, worker_domain)

    monkeypatch.setattr(bench_node, "_start_worker", start_worker)
    result = run_node_against(
        repo, "HEAD", dict(TINY), (96, 128), frames=2, duration=1.0, rate=15.0, rounds=1
    )
    # Each worker on its own domain: same node names and topics, so one domain would cross them.
    assert domains == [domain, domain + 1]
    before, after = result["rows"]
    assert before["label"] == "HEAD" and after["label"] == "this checkout"
    for row in (before, after):
        assert row["frames"] == 2 and row["engine_ms"]["p50"] > 0
        assert [st["cameras"] for st in row["streams"]] == [1, 2]
        assert all(st["outputs_complete"] >= 1 for st in row["streams"])
    table = format_node_against(result)
    assert "| stream, 2 cameras: output Hz |" in table and "after / before" in table
    assert "| DDS + rclpy floor (relay) p50 ms |" in table  # both rows, REV's too


def test_a_stand_in_engine_leaves_the_nodes_own_work(tiny_backbone, monkeypatch):
    """--stand-in-ms: the engine waits without using the CPU and returns the real result."""
    monkeypatch.setenv("ROS_DOMAIN_ID", str(next_domain_id()))
    cfg = SegmenterConfig(**TINY)
    result = run_node_bench(
        cfg, (120, 160), frames=3, backbone=tiny_backbone, stand_in_ms=50.0, cameras=1
    )
    assert 50.0 <= result["engine_ms"]["p50"] < 50.0 + 40.0  # the wait, not the model
    assert result["node_end_to_end_ms"]["p50"] >= 50.0
    assert result["stand_in_ms"] == 50.0
    assert "stand-in that waits 50 ms" in format_node_bench(result)


def test_a_stand_in_engine_batches_cameras_as_the_node_does_on_a_gpu(tiny_backbone, monkeypatch):
    """With the stand-in the node batches cameras (it is a GPU); a pass over two frames waits
    --stand-in-ms plus --stand-in-batch-ms, and the bench reports the shared passes."""
    monkeypatch.setenv("ROS_DOMAIN_ID", str(next_domain_id()))
    cfg = SegmenterConfig(**TINY)
    result = run_node_bench(
        cfg,
        (120, 160),
        frames=1,
        backbone=tiny_backbone,
        duration=1.5,
        rate=20.0,
        stand_in_ms=40.0,
        stand_in_batch_ms=10.0,
    )
    assert result["stand_in_batch_ms"] == 10.0
    two = result["stream_cameras"]
    assert two["batches"] >= 1 and two["node_counters"]["failed"] == 0
    assert result["stream"]["batches"] == 0  # one camera: nothing to share a pass with
    table = format_node_bench(result)
    assert "+10 ms per other camera's frame in a pass" in table
    assert "Forward passes that served more than one camera's frame" in table
