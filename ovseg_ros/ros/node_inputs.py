"""The node's inputs: per-camera subscriptions, input QoS (auto, lossless switch), QoS events.

A mixin of OvsegNode (node.py). Subscriptions are made and destroyed only on the executor thread
(constructor, 1 s timer). With input.qos auto, a new subscription is made first and the old one
is kept until the new one has matched the publishers, so no frame is lost in the switch; a frame
that arrives on both meanwhile is taken once.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from . import classmap
from . import diagnostics as D
from .depth import DepthInput
from .worker import Frame

#: Seconds an input subscription re-made for input.qos auto overlaps the old one at most.
QOS_SWITCH_SECONDS = 5.0
#: Seconds the old subscription stays after the new one matched, when no frame came in on both.
QOS_SWITCH_GRACE = 1.0


def choose_reliability(publisher_reliabilities: list[ReliabilityPolicy]) -> ReliabilityPolicy:
    """`input.qos: auto`: reliable when there are publishers and all are reliable."""
    if publisher_reliabilities and all(
        r == ReliabilityPolicy.RELIABLE for r in publisher_reliabilities
    ):
        return ReliabilityPolicy.RELIABLE
    return ReliabilityPolicy.BEST_EFFORT


class Camera:
    """Topics, publishers and counters of one camera."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prefix = f"{name}/" if name else ""
        self.label = name or "camera"
        self.stats = D.CameraCounters()
        self.image_sub = None
        self.old_image_sub = None  # input.qos auto: the subscription being replaced
        self.switch_started = 0.0
        self.switch_matched_at = 0.0  # when the new subscription had matched every publisher
        self.switch_confirmed = False  # a frame came in on both subscriptions
        self.recent_keys: deque[tuple[int, str]] = deque(maxlen=8)  # stamp + frame_id seen
        self.info_sub = None
        self.reliability: ReliabilityPolicy | None = None
        self.camera_info: CameraInfo | None = None
        self.outputs: list[Any] = []  # outputs.Output (and MasksOutput) in publishing order
        self.depth: DepthInput | None = None  # with depth.enabled: pairing, cloud, counters
        self.depth_sub = None
        self.depth_info_sub = None

    def publisher(self, leaf: str) -> Any:
        """The publisher of the output with that topic leaf ("labels"...), None if absent."""
        for output in self.outputs:
            if getattr(output, "leaf", None) == leaf:
                return output.publisher
        return None

    def out(self, leaf: str) -> str:
        """Private output topic of this camera (e.g. ~/front/labels)."""
        return f"~/{self.prefix}{leaf}"

    def inp(self, leaf: str) -> str:
        """Relative input topic of this camera (e.g. front/image)."""
        return f"{self.prefix}{leaf}"


class InputHandling:
    """Subscriptions, input QoS and QoS event reporting for OvsegNode."""

    def _input_profile(self, reliability: ReliabilityPolicy) -> QoSProfile:
        return QoSProfile(
            depth=1,
            history=HistoryPolicy.KEEP_LAST,
            reliability=reliability,
            durability=DurabilityPolicy.VOLATILE,
        )

    def _image_topic(self, cam: Camera) -> str:
        compressed = self._options.transport == "compressed"
        return cam.inp("image/compressed" if compressed else "image")

    def _subscribe(self, cam: Camera, reliability: ReliabilityPolicy | None = None) -> None:
        """Subscribe the camera's images (a previous subscription stays until the new matches)."""
        mode = self._options.input_qos
        topic = self._image_topic(cam)
        if reliability is None:
            if mode == "reliable":
                reliability = ReliabilityPolicy.RELIABLE
            elif mode == "sensor_data":
                reliability = ReliabilityPolicy.BEST_EFFORT
            else:
                reliability = choose_reliability(self._publisher_reliabilities(topic))
        if cam.old_image_sub is not None:  # a switch still in progress: drop the oldest
            self.destroy_subscription(cam.old_image_sub)
        cam.old_image_sub = cam.image_sub
        cam.switch_started = time.monotonic()
        cam.switch_matched_at = 0.0
        cam.switch_confirmed = False
        msg_type = CompressedImage if self._options.transport == "compressed" else Image
        cam.image_sub = self.create_subscription(
            msg_type,
            topic,
            lambda msg, c=cam: self._on_image(c, msg),
            self._input_profile(reliability),
            **self._subscription_events(topic),
        )
        cam.reliability = reliability
        if cam.info_sub is None:
            cam.info_sub = self.create_subscription(
                CameraInfo,
                cam.inp("camera_info"),
                lambda msg, c=cam: setattr(c, "camera_info", msg),
                self._input_profile(ReliabilityPolicy.BEST_EFFORT),
            )
        if cam.depth is not None and cam.depth_sub is None:
            self._subscribe_depth(cam, cam.depth)

    def _subscribe_depth(self, cam: Camera, depth: DepthInput) -> None:
        """depth.enabled: the camera's registered depth (and depth/camera_info when asked).

        The newest message of each is kept (DepthPairing), nothing is queued. Reliability follows
        input.qos (auto: from the depth publishers present now, best effort when there are none).
        """
        topic = cam.inp("depth")
        mode = self._options.input_qos
        if mode == "auto":
            reliability = choose_reliability(self._publisher_reliabilities(topic))
        else:
            reliable = mode == "reliable"
            reliability = ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
        cam.depth_sub = self.create_subscription(
            Image,
            topic,
            lambda msg: self._worker.enabled and depth.on_depth(msg),
            self._input_profile(reliability),
            **self._subscription_events(topic),
        )
        if self._options.depth_camera_info == "depth":
            cam.depth_info_sub = self.create_subscription(
                CameraInfo,
                cam.inp("depth/camera_info"),
                lambda msg: setattr(depth, "depth_info", msg),
                self._input_profile(ReliabilityPolicy.BEST_EFFORT),
            )

    def _finish_switch(self, cam: Camera) -> None:
        """Drop the replaced subscription once frames certainly reach the new one.

        Certain when a frame arrived on both (the overlap saw it twice), or a while after the new
        subscription matched every publisher: the subscription side reports the match before
        each publisher has matched it back, and a frame sent in between reaches only the old one.
        """
        old = cam.old_image_sub
        if old is None:
            return
        now = time.monotonic()
        count = getattr(cam.image_sub, "get_publisher_count", None)  # Iron and newer
        if count is not None and count() >= len(
            self._publisher_reliabilities(cam.image_sub.topic_name)
        ):
            cam.switch_matched_at = cam.switch_matched_at or now
        settled = cam.switch_matched_at and now - cam.switch_matched_at >= QOS_SWITCH_GRACE
        if cam.switch_confirmed or settled or now - cam.switch_started > QOS_SWITCH_SECONDS:
            cam.old_image_sub = None
            self.destroy_subscription(old)

    def _resolve(self, topic: str) -> str:
        """Fully qualified topic name (remappings applied); as given where rclpy cannot tell."""
        resolve = getattr(self, "resolve_topic_name", None)  # rclpy of Iron and newer
        return resolve(topic) if resolve is not None else topic

    def _publisher_reliabilities(self, topic: str) -> list[ReliabilityPolicy]:
        resolved = self._resolve(topic)
        if not resolved.startswith("/"):
            return []  # Humble, before the subscription exists: the 1 s check decides
        me = self.get_name()
        return [
            info.qos_profile.reliability
            for info in self.get_publishers_info_by_topic(resolved)
            if info.node_name != me
        ]

    def _check_input_qos(self) -> None:
        """input.qos auto: re-subscribe when the publishers' reliability calls for it."""
        for cam in self._cams.values():
            self._finish_switch(cam)
            if self._options.input_qos != "auto":
                continue
            topic = cam.image_sub.topic_name
            wanted = choose_reliability(self._publisher_reliabilities(topic))
            if wanted != cam.reliability:
                self._logger.info(
                    f"input QoS auto: publishers of {topic} are "
                    f"{'all reliable' if wanted == ReliabilityPolicy.RELIABLE else 'best effort'}"
                    f"; subscribing {wanted.name.lower()} (the old subscription stays until the "
                    "new one is matched)"
                )
                self._subscribe(cam, wanted)

    def _subscription_events(self, topic: str) -> dict[str, Any]:
        try:
            from rclpy.event_handler import SubscriptionEventCallbacks
        except ImportError:  # Humble
            from rclpy.qos_event import SubscriptionEventCallbacks

        def warn(event: Any) -> None:
            self._incompatible(topic, "publisher", event)

        return {"event_callbacks": SubscriptionEventCallbacks(incompatible_qos=warn)}

    def _publisher_events(self, topic: str) -> dict[str, Any]:
        try:
            from rclpy.event_handler import PublisherEventCallbacks
        except ImportError:  # Humble
            from rclpy.qos_event import PublisherEventCallbacks

        def warn(event: Any) -> None:
            self._incompatible(topic, "subscriber", event)

        return {"event_callbacks": PublisherEventCallbacks(incompatible_qos=warn)}

    def _incompatible(self, topic: str, peer: str, event: Any) -> None:
        self.qos_incompatibilities += 1
        try:
            from rclpy.qos import qos_policy_name_from_kind

            policy = qos_policy_name_from_kind(event.last_policy_kind)
        except Exception:  # noqa: BLE001 - only the wording of the warning depends on it
            policy = str(getattr(event, "last_policy_kind", "unknown"))
        self._logger.warning(
            f"QoS incompatibility on {self._resolve(topic)}: a {peer} cannot be "
            f"matched because of its {policy} policy ({event.total_count} so far); align the "
            "two sides' QoS (this node: input.qos / output.qos)",
            throttle_duration_sec=5.0,
        )

    def _on_image(self, cam: Camera, msg: Any) -> None:
        """Executor callback: keep the newest frame; nothing heavy here."""
        if not self._worker.enabled:
            return
        if cam.old_image_sub is not None:
            # While an input QoS switch overlaps two subscriptions, a frame arrives twice. Frames
            # without a stamp cannot be told apart: they are all taken (a repeat only replaces
            # the waiting frame).
            key = (classmap.stamp_ns(msg.header), msg.header.frame_id)
            if key[0] and key in cam.recent_keys:
                cam.switch_confirmed = True  # both subscriptions deliver: the old can go
                return
            cam.recent_keys.append(key)
        if cam.depth is not None:
            cam.depth.on_color(msg.header)
        self._slots.put(Frame(camera=cam.name, image=msg, header=msg.header))
