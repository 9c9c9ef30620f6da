"""SampleCameraNode: publishes the frames of a FrameSource and monitors the ovseg node's outputs.

It publishes ``image`` and ``camera_info`` (plus ``image/compressed`` and ``depth`` +
``depth/camera_info`` when asked) with the QoS of ``camera_qos``, and listens to the node's
``labels``, ``overlay`` and ``vocabulary`` (and ``points`` with depth) outputs, feeding ``Stats``
and the ``OverlayWriter``. ``CameraOptions`` holds its settings.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rclpy.context import Context
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header, String

from ..classmap import stamp_ns as _stamp_ns
from ..decode import ImageDecodeError, image_to_rgb, msg_to_array
from . import PROG
from .messages import (
    depth_to_msg,
    floor_depth,
    frame_to_compressed,
    frame_to_msg,
    pinhole_camera_info,
)
from .monitor import OverlayWriter, Stats
from .sources import FrameSource, SourceError

try:  # Iron and newer
    from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
except ImportError:  # pragma: no cover - Humble
    from rclpy.qos_event import (  # type: ignore[no-redef]
        PublisherEventCallbacks,
        SubscriptionEventCallbacks,
    )

__all__ = [
    "OUTPUT_QOS",
    "VOCABULARY_QOS",
    "CameraOptions",
    "SampleCameraNode",
    "camera_qos",
]


@dataclass
class CameraOptions:
    """Settings of SampleCameraNode (the command line fills them)."""

    rate: float = 2.0
    encoding: str = "rgb8"
    compressed: bool = False
    jpeg_quality: int = 90
    qos: str = "sensor_data"
    frame_id: str = "camera"
    hfov_deg: float = 60.0
    monitor_node: str = "/ovseg"
    out_dir: str = "out/stream"
    save_every: int = 1
    max_frames: int = 0  # 0 = no limit
    depth: bool = False  # also publish depth + depth/camera_info (floor_depth) and watch ~/points
    duration: float = 0.0  # seconds; 0 = no limit
    linger: float = 3.0  # seconds to wait for outputs after the last frame
    report_period: float = 1.0


def camera_qos(name: str) -> QoSProfile:
    """``sensor_data``: best effort, keep last 1 (as camera drivers do); ``reliable``."""
    if name not in ("sensor_data", "reliable"):
        raise ValueError(f"qos must be sensor_data or reliable, got {name!r}")
    reliability = (
        ReliabilityPolicy.BEST_EFFORT if name == "sensor_data" else (ReliabilityPolicy.RELIABLE)
    )
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=1,
        reliability=reliability,
        durability=DurabilityPolicy.VOLATILE,
    )


#: The node's image outputs: reliable, keep last 1 (the node's default output QoS).
OUTPUT_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)

#: ``~/vocabulary`` is latched: reliable + transient_local, depth 1.
VOCABULARY_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


class SampleCameraNode(Node):
    """Publishes frames of a FrameSource and monitors the segmentation node's outputs.

    ``finished`` turns true when a limit is reached (``max_frames`` / the end of a source that
    does not loop, then ``linger`` seconds or the output of the last frame; ``duration``) or the
    source fails (``error`` holds why). Each report line goes to ``printer``.
    """

    def __init__(
        self,
        source: FrameSource,
        options: CameraOptions | None = None,
        *,
        context: Context | None = None,
        node_name: str = PROG,
        printer: Callable[[str], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        options = options or CameraOptions()
        if options.rate <= 0:
            raise ValueError(f"rate must be positive, got {options.rate}")
        # Before the node exists, so an unusable output folder leaves nothing to clean up.
        writer = OverlayWriter(options.out_dir, options.save_every) if options.out_dir else None
        super().__init__(node_name, context=context)
        self.options = options
        self.writer = writer
        self.source = source
        self._printer = printer or (lambda line: print(line, flush=True))
        self._monotonic = monotonic
        self.started = monotonic()
        base = options.monitor_node.rstrip("/") or "/ovseg"
        self.labels_topic = f"{base}/labels"
        self.overlay_topic = f"{base}/overlay"
        self.vocabulary_topic = f"{base}/vocabulary"
        self.stats = Stats(self.labels_topic, start=self.started)
        self.error: str | None = None
        self.finished = False
        self.finish_reason = ""
        self._publishing_done_at: float | None = None
        self._last_published_ns: int | None = None
        self._last_output_ns = -1
        # Stamps of the last frames sent: an output with another stamp answers someone else.
        self._recent_stamps: deque[int] = deque(maxlen=256)
        self._recent_set: set[int] = set()
        self._write_failed = False
        self._warned: set[str] = set()

        qos = camera_qos(options.qos)
        pub_events = PublisherEventCallbacks(incompatible_qos=self._on_incompatible_publisher)
        self.image_pub = self.create_publisher(Image, "image", qos, event_callbacks=pub_events)
        self.info_pub = self.create_publisher(CameraInfo, "camera_info", qos)
        self.compressed_pub = (
            self.create_publisher(CompressedImage, "image/compressed", qos)
            if options.compressed
            else None
        )
        self.depth_pub = self.depth_info_pub = None
        self.points_received = 0
        self.points_valid = 0.0  # share of points with a finite z in the last cloud
        if options.depth:
            self.depth_pub = self.create_publisher(Image, "depth", qos)
            self.depth_info_pub = self.create_publisher(CameraInfo, "depth/camera_info", qos)
            self.create_subscription(PointCloud2, f"{base}/points", self._on_points, OUTPUT_QOS)

        def sub_events(topic: str) -> SubscriptionEventCallbacks:
            return SubscriptionEventCallbacks(
                incompatible_qos=lambda event: self._on_incompatible_subscription(topic, event)
            )

        # The class maps first: rclpy's executor takes ready subscriptions in the order they were
        # created, so a class map and a label image waiting together are handled map first, and
        # the node delivers a map before any label image that uses it (README, class-map rule).
        self.create_subscription(
            String,
            self.vocabulary_topic,
            self._on_vocabulary,
            VOCABULARY_QOS,
            event_callbacks=sub_events(self.vocabulary_topic),
        )
        self.create_subscription(
            Image,
            self.labels_topic,
            self._on_labels,
            OUTPUT_QOS,
            event_callbacks=sub_events(self.labels_topic),
        )
        self.create_subscription(
            Image,
            self.overlay_topic,
            self._on_overlay,
            OUTPUT_QOS,
            event_callbacks=sub_events(self.overlay_topic),
        )
        self._publish_timer = self.create_timer(1.0 / options.rate, self._publish_next)
        self._report_timer = self.create_timer(options.report_period, self._report)
        # Limits are checked more often than a slow --rate publishes.
        self._limit_timer = self.create_timer(0.1, self._check_limits)

    # --- publishing ------------------------------------------------------------------------

    def _check_limits(self) -> None:
        if self.finished:
            return
        now = self._monotonic()
        if self.options.duration > 0 and now - self.started >= self.options.duration:
            self._finish(f"duration of {self.options.duration:g} s reached")
        elif self._publishing_done_at is not None:
            self._check_linger(now)

    def _publish_next(self) -> None:
        self._check_limits()
        if self.finished or self._publishing_done_at is not None:
            return
        try:
            frame = self.source.read()
        except SourceError as exc:
            self.error = str(exc)
            self._finish(f"source failed: {exc}")
            return
        if frame is None:
            self._publishing_done(self._monotonic(), "end of the source")
            return
        self.publish_frame(frame)
        if self.options.max_frames and self.stats.published >= self.options.max_frames:
            self._publishing_done(self._monotonic(), f"{self.options.max_frames} frames published")

    def publish_frame(self, rgb: np.ndarray) -> Header:
        """Publish one frame (image, camera_info, compressed) stamped with the current time."""
        stamp = self.get_clock().now().to_msg()
        header = Header(stamp=stamp, frame_id=self.options.frame_id)
        msg = frame_to_msg(rgb, self.options.encoding, header)
        self.image_pub.publish(msg)
        info = pinhole_camera_info(msg.width, msg.height, header, hfov_deg=self.options.hfov_deg)
        self.info_pub.publish(info)
        if self.depth_pub is not None:  # registered to the image: same header, same K
            self.depth_pub.publish(depth_to_msg(floor_depth(msg.width, msg.height, info.k), header))
            self.depth_info_pub.publish(info)
        if self.compressed_pub is not None:
            self.compressed_pub.publish(
                frame_to_compressed(
                    rgb, header, encoding=self.options.encoding, quality=self.options.jpeg_quality
                )
            )
        self._last_published_ns = _stamp_ns(header)
        if len(self._recent_stamps) == self._recent_stamps.maxlen:
            self._recent_set.discard(self._recent_stamps[0])
        self._recent_stamps.append(self._last_published_ns)
        self._recent_set.add(self._last_published_ns)
        self.stats.frame_published()
        return header

    def _publishing_done(self, now: float, reason: str) -> None:
        self._publishing_done_at = now
        self.finish_reason = reason
        self._check_linger(now)

    def _check_linger(self, now: float) -> None:
        """After the last frame: stop once its output is in, or after ``linger`` seconds."""
        assert self._publishing_done_at is not None
        last_done = (
            self._last_published_ns is not None and self._last_output_ns >= self._last_published_ns
        )
        if last_done or now - self._publishing_done_at >= self.options.linger:
            self._finish(self.finish_reason)

    def _finish(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.finish_reason = reason
            self._publish_timer.cancel()
            self._limit_timer.cancel()

    # --- monitoring ------------------------------------------------------------------------

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.get_logger().warning(text)

    def _on_labels(self, msg: Image) -> None:
        now_ns = self.get_clock().now().nanoseconds
        stamp_ns = _stamp_ns(msg.header)
        latency = (now_ns - stamp_ns) / 1e9 if stamp_ns > 0 else None
        if latency is None:
            self._warn_once(
                "stamp", f"{self.labels_topic} arrives with a zero stamp: no latency measured"
            )
        ours = stamp_ns <= 0 or stamp_ns in self._recent_set
        if ours:
            self._last_output_ns = max(self._last_output_ns, stamp_ns)
        else:
            self._warn_once(
                "foreign",
                f"{self.labels_topic} carries results for frames this camera did not publish: "
                f"another camera publishes to the node, or another program uses "
                f"ROS_DOMAIN_ID={self._domain_id()} (export a domain id of your own)",
            )
        labels = None
        try:
            labels = msg_to_array(msg)
        except ImageDecodeError as exc:
            self._warn_once("labels", f"cannot decode {self.labels_topic}: {exc}")
        self.stats.output_received(self._monotonic(), latency, labels, ours=ours, stamp_ns=stamp_ns)
        if self._publishing_done_at is not None and not self.finished:
            self._check_linger(self._monotonic())

    def _on_points(self, msg: PointCloud2) -> None:
        z = np.frombuffer(bytes(msg.data), dtype=np.uint8)
        count = msg.width * msg.height
        if count and msg.point_step >= 12 and len(z) >= count * msg.point_step:
            z = z[: count * msg.point_step].reshape(count, msg.point_step)[:, 8:12]
            self.points_valid = float(np.isfinite(z.copy().view("<f4")).mean())
        self.points_received += 1

    def _on_overlay(self, msg: Image) -> None:
        saved = False
        if self.writer is not None and not self._write_failed:
            try:
                rgb = image_to_rgb(msg)
                saved = self.writer.write(self.stats.overlays + 1, rgb) is not None
            except ImageDecodeError as exc:
                self._warn_once("overlay", f"cannot decode {self.overlay_topic}: {exc}")
            except OSError as exc:
                self._write_failed = True
                self.get_logger().error(f"{exc}; overlays are no longer saved")
        self.stats.overlay_received(saved)

    def _on_vocabulary(self, msg: String) -> None:
        error = self.stats.vocabulary_received(msg.data)
        if error is not None:
            self.get_logger().warning(f"{self.vocabulary_topic}: {error}")

    def _on_incompatible_subscription(self, topic: str, event: Any) -> None:
        policy = getattr(getattr(event, "last_policy_kind", None), "name", "?")
        self._warn_once(
            f"qos {topic}",
            f"a publisher of {topic} offers a QoS incompatible with this monitor (policy "
            f"{policy}); the monitor subscribes reliable (output.qos of the node must not be "
            f"sensor_data)",
        )

    def _on_incompatible_publisher(self, event: Any) -> None:
        policy = getattr(getattr(event, "last_policy_kind", None), "name", "?")
        self._warn_once(
            "qos image",
            f"a subscriber of {self.image_pub.topic_name} requests a QoS this camera does not "
            f"offer (policy {policy}); try --qos reliable",
        )

    def _domain_id(self) -> str:
        try:
            return str(self.context.get_domain_id())
        except Exception:  # older rclpy, or a context already shut down
            return os.environ.get("ROS_DOMAIN_ID", "0")

    def _report(self) -> None:
        topic = self.image_pub.topic_name
        if self.count_publishers(topic) > 1:
            self._warn_once(
                "publishers",
                f"{topic} has another publisher besides this camera; the node's outputs mix "
                f"both (ROS_DOMAIN_ID={self._domain_id()})",
            )
        detail = ""
        if self.stats.outputs == 0:
            detail = (
                f"{self.image_pub.topic_name}: {self.image_pub.get_subscription_count()} "
                f"subscribers, {self.labels_topic}: {self.count_publishers(self.labels_topic)} "
                f"publishers"
            )
        if self.depth_pub is not None and self.stats.outputs:
            detail = f"points {self.points_received} ({self.points_valid:.0%} valid)"
        self._printer(self.stats.report(self._monotonic(), detail))
