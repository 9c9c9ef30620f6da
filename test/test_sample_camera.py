"""Tests of the sample camera: frame sources, messages, the monitor's statistics and lines, and a
round trip through rclpy with a stand-in for the segmentation node."""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from rosutil import REPO, child_process, next_domain_id, ros_context, ros_env, spin_until
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header, String

from ovseg_ros.ros import sample_camera as sc
from ovseg_ros.ros.codec import compressed_to_rgb, image_to_rgb, labels_to_msg, rgb_to_msg
from ovseg_ros.ros.sample_camera import (
    CameraOptions,
    FrameSource,
    OverlayWriter,
    SampleCameraNode,
    SourceError,
    Stats,
    configure_environment,
    fit_frame,
    frame_to_compressed,
    frame_to_msg,
    parse_size,
    parse_vocabulary_json,
    pinhole_camera_info,
)

VOCAB_V1 = json.dumps(
    {
        "version": 1,
        "unlabeled": 255,
        "classes": [
            {"id": 0, "name": "person", "synonyms": [], "color": [255, 0, 0]},
            {"id": 1, "name": "car", "synonyms": ["automobile"], "color": [0, 255, 0]},
            {"id": 2, "name": "dog", "synonyms": [], "color": [0, 0, 255]},
        ],
    }
)


def header(sec: int = 1700000000, nanosec: int = 5) -> Header:
    return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id="camera")


def write_png(path: Path, rgb: np.ndarray) -> None:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def solid(height: int, width: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.full((height, width, 3), rgb, np.uint8)


# --- sizes and resizing --------------------------------------------------------------------


def test_parse_size():
    assert parse_size("640x480") == (640, 480)
    assert parse_size(" 32X24 ") == (32, 24)
    assert parse_size("native") is None
    for bad in ("640", "640x", "x480", "-1x5", "0x10", "axb", "640x480x3", "99999x10"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_fit_frame_keeps_aspect_and_crops_the_centre():
    # Three vertical bands (red, green, blue), 300x100: a 100x100 frame is the green middle.
    image = np.concatenate(
        [solid(100, 100, (255, 0, 0)), solid(100, 100, (0, 255, 0)), solid(100, 100, (0, 0, 255))],
        axis=1,
    )
    out = fit_frame(image, (100, 100))
    assert out.shape == (100, 100, 3) and out.flags.c_contiguous
    assert (out == (0, 255, 0)).all()
    # Enlarging a 30x10 strip to 60x60 scales by 6 (180x60), then keeps the green middle.
    small = np.ascontiguousarray(image[::10, ::10])
    assert (fit_frame(small, (60, 60))[:, 10:50] == (0, 255, 0)).all()
    # Same aspect: a plain resize. None: unchanged.
    assert fit_frame(image, (150, 50)).shape == (50, 150, 3)
    assert fit_frame(image, None) is not None and fit_frame(image, None).shape == image.shape


# --- frame sources -------------------------------------------------------------------------


def test_samples_source_loops_and_stops_with_once():
    frames = FrameSource.samples(size=(64, 48), loop=True)
    first = [frames.read() for _ in range(6)]
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in first)
    assert not np.array_equal(first[0], first[1])
    np.testing.assert_array_equal(first[5], first[0])  # 5 photos, then again from the start
    once = list(FrameSource.samples(size=(64, 48), loop=False))
    assert len(once) == 5
    native = list(FrameSource.samples(size=None, loop=False))
    assert native[0].shape == (512, 512, 3)  # the astronaut at its own size
    assert "5 sample photos" in FrameSource.samples(size=(64, 48)).describe()


def test_folder_source_sorted_rgb_and_skips_broken_files(tmp_path):
    write_png(tmp_path / "b.png", solid(30, 40, (0, 255, 0)))
    write_png(tmp_path / "a.png", solid(30, 40, (255, 0, 0)))
    write_png(tmp_path / "c.PNG", solid(60, 80, (0, 0, 255)))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"definitely not a jpeg")
    warnings = []
    source = FrameSource.folder(tmp_path, size=(20, 15), loop=False, warn=warnings.append)
    frames = list(source)
    assert [tuple(f[0, 0]) for f in frames] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert all(f.shape == (15, 20, 3) for f in frames)
    assert len(warnings) == 1 and "broken.jpg" in warnings[0]
    assert source.read() is None
    looping = FrameSource.folder(tmp_path, size=None, loop=True, warn=warnings.append)
    colours = [tuple(looping.read()[0, 0]) for _ in range(4)]
    assert colours == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 0)]
    assert len(warnings) == 2  # one warning per source for the broken file, not one per pass


def test_folder_source_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist") as err:
        FrameSource.folder(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(err.value)
    with pytest.raises(SourceError, match="has no images"):
        FrameSource.folder(tmp_path)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="none of the 1 images"):
        FrameSource.folder(tmp_path, warn=lambda _text: None)
    with pytest.raises(SourceError, match="is not a folder"):
        FrameSource.folder(tmp_path / "x.png")


def write_video(path: Path, colours: list[tuple[int, int, int]], size=(64, 48)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened()
    for rgb in colours:
        writer.write(cv2.cvtColor(solid(size[1], size[0], rgb), cv2.COLOR_RGB2BGR))
    writer.release()


def test_video_source(tmp_path):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    path = tmp_path / "clip.avi"
    write_video(path, colours)
    frames = list(FrameSource.video(path, size=(32, 24), loop=False))
    assert len(frames) == 4
    for frame, colour in zip(frames, colours, strict=True):
        assert frame.shape == (24, 32, 3)
        assert np.abs(frame.reshape(-1, 3).mean(0) - colour).max() < 12  # JPEG-compressed
    looping = FrameSource.video(path, size=None, loop=True)
    got = [looping.read() for _ in range(6)]
    assert got[0].shape == (48, 64, 3)
    np.testing.assert_array_equal(got[4], got[0])  # rewound after the last frame
    np.testing.assert_array_equal(got[5], got[1])
    looping.close()


def test_video_and_webcam_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        FrameSource.video(tmp_path / "missing.avi")
    text = tmp_path / "clip.avi"
    text.write_text("this is not a video")
    with pytest.raises(SourceError, match="clip.avi"):
        FrameSource.video(text)
    if not Path("/dev/video63").exists():
        with pytest.raises(SourceError, match="webcam 63"):
            FrameSource.webcam(63)


# --- messages ------------------------------------------------------------------------------


def smooth_rgb(height: int = 24, width: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 90)], axis=-1
    ).astype(np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_frame_to_msg_colour_encodings_are_exact(encoding):
    rgb = smooth_rgb()
    msg = frame_to_msg(rgb, encoding, header())
    assert (msg.encoding, msg.width, msg.height) == (encoding, 32, 24)
    assert msg.step == 32 * len(encoding.rstrip("8"))
    assert msg.header.stamp.sec == 1700000000 and msg.header.frame_id == "camera"
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


def test_frame_to_msg_gray_and_yuv():
    rgb = smooth_rgb()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(image_to_rgb(frame_to_msg(rgb, "mono8", header()))[..., 0], gray)
    mono16 = frame_to_msg(rgb, "mono16", header())
    assert mono16.step == 64 and mono16.is_bigendian == 0
    np.testing.assert_array_equal(image_to_rgb(mono16)[..., 1], gray)
    for encoding in ("yuv422", "yuv422_yuy2"):
        msg = frame_to_msg(rgb, encoding, header())
        diff = np.abs(image_to_rgb(msg).astype(int) - rgb.astype(int))
        assert msg.step == 64 and diff.mean() < 4, encoding
        odd = frame_to_msg(rgb[:, :31], encoding, header())
        assert odd.width == 30  # 4:2:2 needs an even width
    with pytest.raises(ValueError, match="unsupported encoding"):
        frame_to_msg(rgb, "bayer_rggb8", header())


def test_frame_to_compressed():
    rgb = smooth_rgb(48, 64)
    msg = frame_to_compressed(rgb, header(), quality=95)
    assert msg.format == "rgb8; jpeg compressed bgr8"
    assert msg.header.stamp.nanosec == 5
    out = compressed_to_rgb(msg)
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb.astype(int)).mean() < 3
    gray = frame_to_compressed(rgb, header(), encoding="mono8")
    assert gray.format == "mono8; jpeg compressed mono8"
    assert compressed_to_rgb(gray).shape == rgb.shape


def test_pinhole_camera_info():
    info = pinhole_camera_info(640, 480, header(), hfov_deg=90.0)
    assert (info.width, info.height, info.header.frame_id) == (640, 480, "camera")
    k = np.asarray(info.k).reshape(3, 3)
    assert k[0, 0] == pytest.approx(320.0) and k[1, 1] == pytest.approx(320.0)  # tan(45) = 1
    assert (k[0, 2], k[1, 2], k[2, 2]) == (319.5, 239.5, 1.0)
    p = np.asarray(info.p).reshape(3, 4)
    np.testing.assert_allclose(p[:, :3], k)
    assert info.distortion_model == "plumb_bob" and list(info.d) == [0.0] * 5
    default = pinhole_camera_info(640, 480, header())
    assert 45.0 < math.degrees(2 * math.atan(320 / default.k[0])) < 75.0


# --- statistics ----------------------------------------------------------------------------


def known_labels(height: int = 10, width: int = 10) -> np.ndarray:
    """34 % person (0), 12 % car (1), 5 % id 7 (not in the vocabulary), the rest unlabeled."""
    n = height * width
    person, car, unknown = round(0.34 * n), round(0.12 * n), round(0.05 * n)
    labels = np.full(n, 255, np.uint8)
    labels[:person] = 0
    labels[person : person + car] = 1
    labels[person + car : person + car + unknown] = 7
    return labels.reshape(height, width)


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
    assert sc.percentile([1.0], 50) == 1.0
    with pytest.raises(ValueError):
        sc.percentile([], 50)


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


# --- overlay files and environment ---------------------------------------------------------


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


def test_configure_environment():
    env: dict[str, str] = {}
    notes = configure_environment(env)
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert "ROS_LOCALHOST_ONLY" not in env
    assert any("LOCALHOST" in n for n in notes)
    assert env["FASTDDS_DEFAULT_PROFILES_FILE"] == str(REPO / "config" / "fastdds.xml")
    # Choices of the user are kept.
    env = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET", "FASTDDS_DEFAULT_PROFILES_FILE": "/x.xml"}
    assert configure_environment(env) == [] and env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "SUBNET"
    env = {"ROS_LOCALHOST_ONLY": "0", "RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}
    assert configure_environment(env) == []
    assert "ROS_AUTOMATIC_DISCOVERY_RANGE" not in env and "FASTDDS_DEFAULT_PROFILES_FILE" not in env
    env = {"ROS_DISTRO": "humble"}
    configure_environment(env)
    assert env["ROS_LOCALHOST_ONLY"] == "1"


def test_help_mentions_discovery(capsys):
    with pytest.raises(SystemExit) as exc:
        sc.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "ROS_AUTOMATIC_DISCOVERY_RANGE" in text and "LOCALHOST" in text
    for flag in ("--folder", "--video", "--webcam", "--once", "--rate", "--size", "--encoding"):
        assert flag in text


def test_main_rejects_bad_sources(tmp_path, capsys):
    assert sc.main(["--folder", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "error: folder" in err and "does not exist" in err
    assert sc.main(["--video", str(tmp_path / "nope.avi")]) == 2
    assert "error: video" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        sc.main(["--size", "big"])
    assert exc.value.code == 2


# --- ROS round trip ------------------------------------------------------------------------

SENSOR_QOS = sc.camera_qos("sensor_data")


class EchoSegmenter:
    """Stands in for the ovseg node: labels of known ids, the input as overlay, a vocabulary."""

    def __init__(self, context, compressed: bool = False):
        import rclpy

        self.node = rclpy.create_node("ovseg", context=context)
        self.images: list[Image] = []
        self.infos: list[CameraInfo] = []
        self.compressed: list[CompressedImage] = []
        self.vocab_pub = self.node.create_publisher(String, "~/vocabulary", sc.VOCABULARY_QOS)
        self.vocab_pub.publish(String(data=VOCAB_V1))
        self.labels_pub = self.node.create_publisher(Image, "~/labels", sc.OUTPUT_QOS)
        self.overlay_pub = self.node.create_publisher(Image, "~/overlay", sc.OUTPUT_QOS)
        self.node.create_subscription(Image, "image", self.on_image, SENSOR_QOS)
        self.node.create_subscription(CameraInfo, "camera_info", self.infos.append, SENSOR_QOS)
        if compressed:
            self.node.create_subscription(
                CompressedImage, "image/compressed", self.compressed.append, SENSOR_QOS
            )

    def on_image(self, msg: Image) -> None:
        self.images.append(msg)
        rgb = image_to_rgb(msg)
        self.labels_pub.publish(labels_to_msg(known_labels(msg.height, msg.width), msg.header))
        self.overlay_pub.publish(rgb_to_msg(np.ascontiguousarray(rgb), msg.header))


def test_round_trip_with_a_stand_in_node(tmp_path):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    size = (64, 48)
    source = FrameSource.samples(size=size)
    expected_frames = [source.read() for _ in range(5)]
    lines: list[str] = []
    options = CameraOptions(
        rate=20.0, compressed=True, out_dir=str(tmp_path / "stream"), report_period=0.25
    )
    with ros_context() as context:
        camera = SampleCameraNode(source, options, context=context, printer=lines.append)
        echo = EchoSegmenter(context, compressed=True)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(camera)
        executor.add_node(echo.node)
        try:

            def done() -> bool:
                return (
                    camera.stats.outputs >= 5
                    and camera.stats.overlays >= 5
                    and camera.stats.vocabulary is not None
                    and any("person" in line for line in lines)
                )

            assert spin_until(executor, done, timeout=20.0), (camera.stats.summary(), lines)
            # A result for a frame someone else sent is counted apart (another camera).
            other = Header(stamp=echo.node.get_clock().now().to_msg(), frame_id="other")
            echo.labels_pub.publish(labels_to_msg(known_labels(4, 4), other))
            assert spin_until(executor, lambda: camera.stats.foreign == 1, timeout=10.0)
        finally:
            executor.shutdown(timeout_sec=1.0)
            camera.destroy_node()
            echo.node.destroy_node()
        assert rclpy.ok(context=context)

    stats = camera.stats
    assert stats.published >= stats.outputs - stats.foreign >= 5
    assert stats.latency_count == stats.outputs
    assert 0.0 <= stats.mean_latency < 2.0
    line = next(line for line in lines if "person" in line)
    assert " | vocab v1 | person 34%, car 12%, id 7 (unknown) 5%, unlabeled 49%" in line
    assert line.startswith("in ") and "fps | out " in line and " ms (max " in line
    assert lines[0].startswith("waiting for /ovseg/labels") or lines[0].startswith("in ")

    # What the stand-in received: frames of the requested size, camera_info with the same header.
    image = echo.images[-1]
    assert (image.width, image.height, image.encoding) == (64, 48, "rgb8")
    assert image.header.frame_id == "camera" and image.header.stamp.sec > 0
    stamps = {(m.header.stamp.sec, m.header.stamp.nanosec) for m in echo.images}
    assert any((i.header.stamp.sec, i.header.stamp.nanosec) in stamps for i in echo.infos)
    assert echo.infos[-1].width == 64 and echo.infos[-1].k[0] > 0
    assert echo.compressed and compressed_to_rgb(echo.compressed[-1]).shape == (48, 64, 3)

    # Overlays on disk: one PNG per overlay plus latest_overlay.png, in the right channel order.
    out = tmp_path / "stream"
    saved = sorted(out.glob("overlay_*.png"))
    assert len(saved) == stats.saved == stats.overlays
    latest = cv2.imread(str(out / "latest_overlay.png"))[..., ::-1]
    assert any(np.array_equal(latest, frame) for frame in expected_frames)


def test_frames_limit_waits_for_the_last_output(tmp_path):
    from rclpy.executors import SingleThreadedExecutor

    options = CameraOptions(rate=20.0, out_dir="", max_frames=4, linger=10.0)
    with ros_context() as context:
        camera = SampleCameraNode(FrameSource.samples(size=(32, 24)), options, context=context)
        echo = EchoSegmenter(context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(camera)
        executor.add_node(echo.node)
        try:
            # Frames sent before discovery completes are lost, so wait for the match first.
            assert spin_until(executor, lambda: camera.image_pub.get_subscription_count(), 10.0)
            start = time.monotonic()
            assert spin_until(executor, lambda: camera.finished, timeout=15.0)
        finally:
            executor.shutdown(timeout_sec=1.0)
            camera.destroy_node()
            echo.node.destroy_node()
    assert camera.stats.published == 4
    # Finished by the output of the 4th frame, long before the 10 s linger.
    assert camera.finish_reason == "4 frames published"
    assert camera.stats.outputs >= 1 and time.monotonic() - start < 8.0


def test_main_exit_codes_without_a_node(monkeypatch, tmp_path, capsys):
    write_png(tmp_path / "a.png", solid(24, 32, (10, 20, 30)))
    monkeypatch.setenv("ROS_DOMAIN_ID", str(next_domain_id()))
    base = ["--folder", str(tmp_path), "--rate", "20", "--frames", "3", "--linger", "0.2"]
    assert sc.main([*base, "--out", "", "--require-output"]) == 1
    err = capsys.readouterr().err
    assert "published 3 frames, received 0 outputs" in err
    assert "no output arrived on /ovseg/labels" in err
    assert sc.main([*base, "--out", str(tmp_path / "stream"), "--once"]) == 0
    assert "stopped (" in capsys.readouterr().err
    assert (tmp_path / "stream").is_dir()


def read_until(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Read the child's output until ``text`` shows up (or timeout / end of output)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while text not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
    return seen


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_cleanly(tmp_path, how):
    import signal

    write_png(tmp_path / "a.png", solid(24, 32, (10, 20, 30)))
    cmd = [sys.executable, "-m", "ovseg_ros.ros.sample_camera", "--folder", str(tmp_path)]
    cmd += ["--size", "32x24", "--rate", "10", "--out", ""]
    env = ros_env(next_domain_id())
    with child_process(cmd, env, cwd=REPO) as proc:
        seen = read_until(proc, "waiting for /ovseg/labels", timeout=20.0)
        assert "waiting for /ovseg/labels" in seen, seen
        os.killpg(proc.pid, getattr(signal, how))
        out, _ = proc.communicate(timeout=15)
    text = seen + out
    assert proc.returncode == 0, text
    assert f"stopped (interrupted by {how})" in text and "published" in text
    assert "Traceback" not in text


def test_yuv422_fallback_matches_what_opencv_decodes():
    """The numpy 4:2:2 encoder used with OpenCV < 4.7 round-trips through OpenCV's decoder."""
    from ovseg_ros.ros.sample_camera import _rgb_to_yuv422

    rgb = smooth_rgb()
    for uyvy, code in ((True, cv2.COLOR_YUV2RGB_UYVY), (False, cv2.COLOR_YUV2RGB_YUY2)):
        packed = _rgb_to_yuv422(rgb, uyvy)
        assert packed.shape == (*rgb.shape[:2], 2) and packed.dtype == np.uint8
        back = cv2.cvtColor(packed, code)
        assert np.abs(back.astype(int) - rgb.astype(int)).mean() < 4
        if hasattr(cv2, "COLOR_RGB2YUV_UYVY"):  # OpenCV >= 4.7: the same bytes within rounding
            ref = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_UYVY if uyvy else cv2.COLOR_RGB2YUV_YUY2)
            assert np.abs(ref.astype(int) - packed.astype(int)).max() <= 2
