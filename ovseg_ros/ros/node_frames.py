"""The node's frame stages: what the pipeline's decode, inference and publish threads call.

A mixin of OvsegNode (node.py); pipeline.py runs these in its three threads. Decoding skips a
camera none of whose outputs is wanted; publishing applies the class-map rule (node_classmap.py)
and hands the frame to each wanted output (outputs.py) under the node's output lock.
"""

from __future__ import annotations

import time
from typing import Any

from sensor_msgs.msg import CompressedImage

from . import classmap
from . import diagnostics as D
from .decode import ImageDecodeError, image_to_rgb
from .decode_compressed import compressed_to_rgb
from .node_inputs import Camera
from .outputs import MasksOutput, PointsOutput, SegmentedFrame
from .pipeline import Decoded
from .worker import Frame


class FrameStages:
    """Decode, segment and publish one frame for OvsegNode (state made in its _configure)."""

    def _decode(self, cam: Camera, frame: Frame) -> Any:
        """The frame as RGB, or None when it is rejected (counted by kind, logged per kind)."""
        opts = self._options
        try:
            if isinstance(frame.image, CompressedImage):
                return compressed_to_rgb(
                    frame.image, max_pixels=opts.max_pixels, oversize=opts.oversize
                )
            return image_to_rgb(
                frame.image,
                use_cv_bridge=self._use_cv_bridge,
                max_pixels=opts.max_pixels,
                oversize=opts.oversize,
            )
        except ImageDecodeError as exc:
            reason = str(exc)
            if cam.stats.reject(exc.kind, reason):
                self._logger.error(
                    f"{cam.label}: frame rejected ({exc.kind}): {D.shorten(reason)} (the next "
                    f"'{exc.kind}' rejections are counted in /diagnostics, logged every "
                    f"{D.REJECT_LOG_PERIOD:.0f} s)"
                )
            return None

    def _decode_frame(self, frame: Frame) -> Decoded | None:
        """Decode thread: the frame as RGB with the outputs wanted, or None when there is no work.

        A camera none of whose outputs has a subscriber is not decoded or segmented at all.
        """
        cam = self._cams[frame.camera]
        opts = self._options
        wanted = [out for out in cam.outputs if out.wanted(cam, opts)]
        if not wanted:
            cam.stats.skipped_idle += 1
            return None
        if cam.depth is not None and any(isinstance(out, PointsOutput) for out in wanted):
            cam.depth.hold(frame.header)  # its depth partner may still be on its way
        started = time.perf_counter()
        rgb = self._decode(cam, frame)
        if rgb is None:
            return None
        return Decoded(frame, rgb, wanted, (time.perf_counter() - started) * 1e3)

    def _segment_frames(self, images: list[Any]) -> list[Any]:
        """Inference thread: one forward pass for the waiting frames of one size (cameras)."""
        if len(images) == 1:
            return [self.segmenter.segment(images[0])]
        return self.segmenter.segment_batch(images)

    def _publish_frame(self, item: Decoded, result: Any) -> None:
        """Publish thread: the frame's wanted outputs, under the class-map rule."""
        if not self.context.ok():
            return  # shutting down (e.g. the node was embedded and its context shut down)
        cam = self._cams[item.camera]
        header = item.frame.header
        started = time.perf_counter()
        frame = SegmentedFrame(cam, header, item.image, result, self._options)
        with self._out_lock:
            if not self._admit(cam, result.vocabulary, header):
                return
            for output in cam.outputs:  # masks are published when enabled, even unwanted now
                if output in item.context or isinstance(output, MasksOutput):
                    output.publish(frame)
        cam.stats.published += 1
        now = self.get_clock().now().nanoseconds * 1e-9
        stamp = classmap.stamp_ns(header) * 1e-9
        latency = (now - stamp) if stamp > 0 else (time.monotonic() - item.frame.received)
        # The frame's own work (decode + forward pass + outputs), without its waits in hand-offs.
        publish_ms = (time.perf_counter() - started) * 1e3
        self._window.add(latency * 1e3, item.decode_ms + item.segment_ms + publish_ms)
