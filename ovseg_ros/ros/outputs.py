"""The node's per-camera outputs: one small class each, publishing one segmented frame.

An output says whether anyone wants it now (`wanted`: enabled by its parameter and subscribed;
a camera none of whose outputs is wanted is not segmented at all) and turns a segmented frame
into its message (`publish`). Every output of a frame shares one `SegmentedFrame`, so what two
outputs need (the 8-bit confidence of ~/confidence and ~/points) is computed once. The node
publishes a frame's outputs in the order of OUTPUTS, under its output lock (the class-map rule).

A new output is a subclass with `leaf`, `msg_type`, `enabled` and `message`, added to OUTPUTS.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from ..engine.segmenter import Result
from ..viz import class_colors, class_mask, confidence_u8, counts_of_classes, overlay
from .encode import header_copy, labels_to_bytes, mono8_to_bytes, rgb_to_bytes
from .masks import MaskTopics
from .params import NodeOptions


def scaled_camera_info(info: CameraInfo, width: int, height: int) -> CameraInfo:
    """A copy of `info` for outputs of width x height (input.oversize downscale shrinks them).

    The intrinsics are scaled about pixel centres (x' = (x + 0.5) * s - 0.5); the distortion
    coefficients do not depend on the resolution. An info without a size is copied as it is.
    """
    out = copy.deepcopy(info)
    if not info.width or not info.height or (info.width, info.height) == (width, height):
        return out
    sx, sy = width / info.width, height / info.height
    out.width, out.height = width, height
    k = list(info.k)
    k[0], k[2] = k[0] * sx, (k[2] + 0.5) * sx - 0.5
    k[4], k[5] = k[4] * sy, (k[5] + 0.5) * sy - 0.5
    out.k = k
    p = list(info.p)
    p[0], p[2], p[3] = p[0] * sx, (p[2] + 0.5) * sx - 0.5, p[3] * sx
    p[5], p[6] = p[5] * sy, (p[6] + 0.5) * sy - 0.5
    out.p = p
    return out


def overlay_image(rgb: np.ndarray, result: Result, alpha: float) -> np.ndarray:
    """The ~/overlay image of a frame: its class colours blended over `rgb`, with the legend.

    The pixels of each class come with the result (counted where the label map was made), so
    the overlay does not count them again. The node bench times this function as the overlay.
    """
    vocab = result.vocabulary
    colors = class_colors(max(vocab.num_classes, 1))
    counts = counts_of_classes(result.counts, result.labels)
    return overlay(rgb, result.labels, colors, alpha, vocab.names, counts=counts)


@dataclass
class SegmentedFrame:
    """One camera frame with its result: what every output of the frame is made from."""

    camera: Any  # node_inputs.Camera
    header: Any  # the input's header, copied into every output
    rgb: np.ndarray  # the decoded (possibly downscaled) input, HxWx3 uint8
    result: Result
    options: NodeOptions

    @functools.cached_property
    def confidence8(self) -> np.ndarray:
        """The confidence as 0-255 uint8 (the bytes of ~/confidence and of ~/points)."""
        return confidence_u8(self.result.confidence)


class Output:
    """A per-camera output topic (subclasses: one per output)."""

    leaf: ClassVar[str] = ""  # the topic under the camera's namespace, e.g. "labels"
    msg_type: ClassVar[Any] = Image

    def __init__(self, publisher: Any) -> None:
        """Publish through `publisher` (made by the node with the output QoS)."""
        self.publisher = publisher

    def enabled(self, camera: Any, options: NodeOptions) -> bool:
        """Whether the parameters (and the camera's inputs) allow this output."""
        return True

    def wanted(self, camera: Any, options: NodeOptions) -> bool:
        """Enabled and subscribed: the frame is worth segmenting for this output."""
        return self.enabled(camera, options) and self.publisher.get_subscription_count() > 0

    def message(self, frame: SegmentedFrame) -> Any:
        """The output's message for the frame, or its serialized bytes (the Image outputs, see
        encode.py); None: nothing to publish this time."""
        raise NotImplementedError

    def publish(self, frame: SegmentedFrame) -> None:
        """Build and publish the frame's message."""
        msg = self.message(frame)
        if msg is not None:
            self.publisher.publish(msg)


class LabelsOutput(Output):
    """~/labels: class ids, mono8 (mono16 beyond 255 classes)."""

    leaf = "labels"

    def enabled(self, camera: Any, options: NodeOptions) -> bool:
        return options.publish_labels

    def message(self, frame: SegmentedFrame) -> Any:
        return labels_to_bytes(frame.result.labels, frame.header)


class ConfidenceOutput(Output):
    """~/confidence: the winning class's probability, mono8 0-255."""

    leaf = "confidence"

    def enabled(self, camera: Any, options: NodeOptions) -> bool:
        return options.publish_confidence

    def message(self, frame: SegmentedFrame) -> Any:
        return mono8_to_bytes(frame.confidence8, frame.header)


class OverlayOutput(Output):
    """~/overlay: class colours blended over the input, with a legend (rgb8)."""

    leaf = "overlay"

    def enabled(self, camera: Any, options: NodeOptions) -> bool:
        return options.publish_overlay

    def message(self, frame: SegmentedFrame) -> Any:
        image = overlay_image(frame.rgb, frame.result, frame.options.overlay_alpha)
        return rgb_to_bytes(image, frame.header)


class CameraInfoOutput(Output):
    """~/camera_info: the input's camera_info at the outputs' size, with the frame's header."""

    leaf = "camera_info"
    msg_type = CameraInfo

    def enabled(self, camera: Any, options: NodeOptions) -> bool:
        return camera.camera_info is not None

    def message(self, frame: SegmentedFrame) -> Any:
        info = frame.camera.camera_info
        if info is None:
            return None
        out = scaled_camera_info(info, frame.rgb.shape[1], frame.rgb.shape[0])
        out.header = header_copy(frame.header)
        return out


class PointsOutput(Output):
    """~/points: the semantic point cloud from the paired depth image (depth.enabled)."""

    leaf = "points"
    msg_type = PointCloud2

    def __init__(self, publisher: Any, warn: Callable[[str], None]) -> None:
        """`warn(text)` reports a frame without a cloud (throttled by the caller)."""
        super().__init__(publisher)
        self._warn = warn

    def enabled(self, camera: Any, options: NodeOptions) -> bool:
        return camera.depth is not None

    def message(self, frame: SegmentedFrame) -> Any:
        cam, vocab = frame.camera, frame.result.vocabulary
        cloud = cam.depth.cloud(
            frame.header,
            frame.result.labels,
            frame.confidence8,
            vocab.num_classes,
            cam.camera_info,
            frame.options,
        )
        if cloud is None:
            self._warn(f"{cam.label}: no ~/points for this frame: {cam.depth.problem}")
        return cloud


class MasksOutput:
    """~/masks/<class>: one 0/255 mono8 image per class someone subscribes to (masks.py)."""

    def __init__(self, masks: MaskTopics, ids_of: Callable[[Any], dict[str, int]]) -> None:
        """`ids_of(vocabulary)` maps the mask slugs of a class map to class ids."""
        self._masks = masks
        self._ids_of = ids_of

    def wanted(self, camera: Any, options: NodeOptions) -> bool:
        return options.publish_masks and self._masks.listened(camera.name)

    def publish(self, frame: SegmentedFrame) -> None:
        if not frame.options.publish_masks:
            return
        name = frame.camera.name
        targets = self._masks.targets(name, self._ids_of(frame.result.vocabulary))
        labels, header = frame.result.labels, frame.header
        messages = [(pub, mono8_to_bytes(class_mask(labels, cid), header)) for cid, pub in targets]
        self._masks.publish(name, messages)


#: The per-camera image outputs in publishing order (masks follow them, then camera_info, points).
IMAGE_OUTPUTS: tuple[type[Output], ...] = (LabelsOutput, ConfidenceOutput, OverlayOutput)
