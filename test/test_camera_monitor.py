"""Tests of the sample camera's monitor: vocabulary parsing, statistics, the printed lines and the
overlay files."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from camerautil import VOCAB_V1, known_labels, solid

from ovseg_ros.ros.camera.monitor import OverlayWriter, Stats, parse_vocabulary_json, percentile
from ovseg_ros.ros.camera.sources import SourceError

# --- statistics ----------------------------------------------------------------------------


def test_parse_vocabulary_json():
    vocab = parse_vocabulary_json(VOCAB_V1)
    assert vocab.version == 1 and vocab.unlabeled == 255
    assert vocab.names == {0: "person", 1: "car", 2: "dog"}
    for bad, reason in [
        ("{", "not valid JSON"),
        ("[]", "not an object"),
        ('{"version": 1}', "no 'classes' list"),
        ('{"classes": [{"name": "x"}]}', "integer 'id'"),
        ('{"classes": ["x"]}', "not an object"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_vocabulary_json(bad)


def test_stats_waiting_then_report_line():
    stats = Stats("/ovseg/labels", start=100.0)
    stats.frame_published()
    stats.frame_published()
    line = stats.report(101.0, "image: 0 subscribers")
    assert line.startswith("waiting for /ovseg/labels ...")
    assert "in 2.0 fps" in line and "(2 published)" in line and "image: 0 subscribers" in line

    for _ in range(4):
        stats.frame_published()
    stats.vocabulary_received(VOCAB_V1)
    stats.output_received(101.5, 0.8, known_labels())
    stats.output_received(102.5, 0.9, known_labels())
    line = stats.report(103.0)  # a window of 2 s
    assert line == (
        "in 2.0 fps | out 1.0 fps | latency 850 ms (max 900) | vocab v1 | "
        "person 34%, car 12%, id 7 (unknown) 5%, unlabeled 49%"
    )
    # The next window has no output: no latency, the classes of the last output stay.
    stats.frame_published()
    line = stats.report(104.0)
    assert line.startswith("in 1.0 fps | out 0.0 fps | latency - (last output 1.5 s ago)")
    assert "person 34%" in line

    summary = stats.summary()
    assert "published 7 frames, received 2 outputs" in summary
    assert "latency mean 850 ms (max 900)" in summary
    stats.output_received(104.5, 0.7, ours=False)
    stats.overlay_received(saved=True)
    assert stats.summary() == (
        "published 7 frames, received 3 outputs (1 overlays, 1 saved, 1 for frames of another "
        "publisher), latency mean 800 ms (max 900)"
    )


def test_stats_latency_percentiles():
    stats = Stats(start=0.0)
    for latency in (0.3, 0.1, 0.2, 0.5, 0.4):
        stats.output_received(0.5, latency)
    assert "latency 300 ms (max 500)" in stats.report(1.0)
    for latency in (0.1, 0.2):
        stats.output_received(1.5, latency)
    stats.output_received(1.6, None)  # a zero stamp: counted, no latency
    line = stats.report(2.0)
    assert "out 3.0 fps" in line and "latency 150 ms (max 200)" in line
    assert stats.mean_latency == pytest.approx(0.3 * 5 / 7 + 0.3 / 7)
    assert percentile([1.0], 50) == 1.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_stats_class_names_follow_the_latest_vocabulary():
    stats = Stats(start=0.0)
    stats.output_received(0.1, 0.05, known_labels())
    line = stats.report(1.0)
    # No vocabulary yet: ids are reported, not crashed on.
    assert "no vocab yet" in line and "id 0 (unknown) 34%" in line
    stats.vocabulary_received(VOCAB_V1)
    v2 = json.loads(VOCAB_V1)
    v2["version"] = 2
    v2["classes"] = [{"id": 0, "name": "door"}, {"id": 7, "name": "chair"}]
    stats.vocabulary_received(json.dumps(v2))
    line = stats.report(2.0)
    assert "vocab v2" in line and "door 34%, id 1 (unknown) 12%, chair 5%" in line
    assert stats.vocabulary_received("not json") is not None
    assert "vocab invalid" in stats.report(3.0)
    assert stats.vocabulary.version == 2  # the previous map is kept


def test_stats_mono16_labels_and_many_classes():
    labels = np.full((10, 10), 65535, np.uint16)
    labels.flat[:90] = np.arange(90) // 10 + 300  # nine classes of 10 % each
    vocab = {
        "version": "abc",
        "unlabeled": 65535,
        "classes": [{"id": i, "name": f"c{i}"} for i in range(300, 309)],
    }
    stats = Stats(start=0.0, top=3)
    stats.vocabulary_received(json.dumps(vocab))
    stats.output_received(0.5, 0.01, labels)
    line = stats.report(1.0)
    assert "vocab vabc" in line
    assert line.endswith("c300 10%, c301 10%, c302 10%, +6 more, unlabeled 10%")
    stats.output_received(1.5, 0.01, np.full((4, 4), 65535, np.uint16))
    assert stats.report(2.0).endswith("no class, unlabeled 100%")
    tiny = np.full((1000, 1), 255, np.uint8)
    tiny[0] = 1
    stats.output_received(2.5, 0.01, tiny)
    assert "id 1 (unknown) <1%" in stats.report(3.0)


def test_stats_summary_without_output():
    stats = Stats("/robot/ovseg/labels")
    stats.frame_published()
    assert stats.summary() == (
        "published 1 frames, received 0 outputs (nothing arrived on /robot/ovseg/labels)"
    )


def test_overlay_writer(tmp_path):
    writer = OverlayWriter(tmp_path / "a" / "b", every=2)
    rgb = solid(6, 8, (255, 10, 0))
    kept = [writer.write(i, rgb) for i in range(1, 5)]
    assert [p.name if p else None for p in kept] == [
        "overlay_000001.png",
        None,
        "overlay_000003.png",
        None,
    ]
    latest = cv2.imread(str(tmp_path / "a" / "b" / "latest_overlay.png"))
    assert tuple(latest[0, 0]) == (0, 10, 255)  # stored as BGR, so viewers show red
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == [
        "latest_overlay.png",
        "overlay_000001.png",
        "overlay_000003.png",
    ]
    (tmp_path / "file").write_text("")
    with pytest.raises(SourceError, match="cannot create output folder"):
        OverlayWriter(tmp_path / "file" / "sub")
