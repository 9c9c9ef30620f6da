"""Tests of SampleCameraNode: a round trip through rclpy with a stand-in for the segmentation
node, and the frame limit that waits for the last output."""

from __future__ import annotations

import time

import cv2
import numpy as np
from camerautil import VOCAB_V1, known_labels
from rosutil import ros_context, spin_until
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header, String

from ovseg_ros.ros.camera.node import (
    OUTPUT_QOS,
    VOCABULARY_QOS,
    CameraOptions,
    SampleCameraNode,
    camera_qos,
)
from ovseg_ros.ros.camera.sources import FrameSource
from ovseg_ros.ros.decode import image_to_rgb
from ovseg_ros.ros.decode_compressed import compressed_to_rgb
from ovseg_ros.ros.encode import labels_to_msg, rgb_to_msg

SENSOR_QOS = camera_qos("sensor_data")


class EchoSegmenter:
    """Stands in for the ovseg node: labels of known ids, the input as overlay, a vocabulary."""

    def __init__(self, context, compressed: bool = False):
        import rclpy

        self.node = rclpy.create_node("ovseg", context=context)
        self.images: list[Image] = []
        self.infos: list[CameraInfo] = []
        self.compressed: list[CompressedImage] = []
        self.vocab_pub = self.node.create_publisher(String, "~/vocabulary", VOCABULARY_QOS)
        self.vocab_pub.publish(String(data=VOCAB_V1))
        self.labels_pub = self.node.create_publisher(Image, "~/labels", OUTPUT_QOS)
        self.overlay_pub = self.node.create_publisher(Image, "~/overlay", OUTPUT_QOS)
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
