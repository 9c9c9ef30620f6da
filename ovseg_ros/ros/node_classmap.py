"""The node's class-map announcements: ~/vocabulary, ~/label_info and the mask topics' classes.

A mixin of OvsegNode (node.py). Every vocabulary version is announced once, with a stamp, before
the first output that uses it (classmap.py states the rule and the clients' side); LabelInfo
follows prob_threshold and the first camera's frame_id. Called under the node's output lock.
"""

from __future__ import annotations

import time
from typing import Any

from std_msgs.msg import String

from ..engine.text import Vocabulary
from ..viz import class_colors
from . import classmap
from .masks import mask_slugs

try:  # vision_msgs is optional (not available as a wheel); LabelInfo is published when present
    from vision_msgs.msg import LabelInfo, VisionClass
except ImportError:  # pragma: no cover - depends on the installation
    LabelInfo = None
    VisionClass = None

#: Seconds a new class map waits for its subscribers' acknowledgements before it is used.
ACK_SECONDS = 1.0


def vocabulary_dict(vocab: Vocabulary) -> dict[str, Any]:
    """The class map of `vocab` with each class's overlay colour."""
    return vocab.to_dict(class_colors(max(vocab.num_classes, 1)))


def label_info_msg(vocab: Vocabulary, stamp: int, frame_id: str, threshold: float) -> Any:
    """vision_msgs/LabelInfo of a class map (only called when vision_msgs is importable)."""
    msg = LabelInfo()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
    msg.header.frame_id = frame_id
    msg.class_map = [VisionClass(class_id=c.id, class_name=c.name) for c in vocab.classes]
    msg.threshold = float(threshold)
    return msg


class ClassMapPublishing:
    """Announcing class maps for OvsegNode (state made in its _configure)."""

    def _make_classmap_publishers(self, latched: Any) -> None:
        """~/vocabulary and (with vision_msgs) ~/label_info, reliable and transient local."""
        self._vocab_pub = self._make_publisher(
            String, "~/vocabulary", latched, **self._publisher_events("~/vocabulary")
        )
        self._label_info_pub = (
            self._make_publisher(
                LabelInfo, "~/label_info", latched, **self._publisher_events("~/label_info")
            )
            if LabelInfo is not None
            else None
        )

    def _slug_map(self, vocab: Vocabulary) -> tuple[list[str], dict[str, int]]:
        """Mask slugs of a class map and slug -> class id (cached for the last versions)."""
        cached = self._slugs.get(vocab.version)
        if cached is None:
            slugs = mask_slugs(vocab.names)
            cached = (slugs, {s: i for i, s in enumerate(slugs)})
            self._slugs = {v: c for v, c in self._slugs.items() if v >= vocab.version - 1} | {
                vocab.version: cached
            }
        return cached

    def _set_mask_classes(self, vocab: Vocabulary) -> None:
        slugs, _ = self._slug_map(vocab)
        opts = self._options
        self._masks.set_classes(slugs, opts.masks_advertised, opts.publish_masks)
        self._mask_gc.trigger()

    def _announce(self, vocab: Vocabulary) -> None:
        """Publish the class map of `vocab` with its stamp, once a version (under _out_lock)."""
        if self._announced is not None and vocab.version <= self._announced.version:
            return
        announcement = self._stamps.announce(vocab.version)
        self._announced = vocab
        self._set_mask_classes(vocab)
        self._publish_classmap(vocab, announcement.stamp)

    def _wait_for_delivery(self) -> None:
        """Wait until every subscriber of the class-map topics has the last one (bounded)."""
        from rclpy.duration import Duration

        deadline = time.monotonic() + ACK_SECONDS
        for pub in (self._vocab_pub, self._label_info_pub):
            left = deadline - time.monotonic()
            if pub is None or left <= 0:
                continue
            try:
                if not pub.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))):
                    self._logger.warning(
                        f"{pub.topic_name}: not every subscriber acknowledged the class map "
                        f"within {ACK_SECONDS:g} s; using it anyway",
                        throttle_duration_sec=30.0,
                    )
            except Exception:  # noqa: BLE001 - an rmw without the call: nothing to wait for
                return

    def _publish_classmap(self, vocab: Vocabulary, stamp: int) -> None:
        slugs, _ = self._slug_map(vocab)
        self._vocab_pub.publish(
            String(data=classmap.classmap_json(vocabulary_dict(vocab), stamp, slugs))
        )
        self._publish_label_info(vocab, stamp)

    def _publish_label_info(self, vocab: Vocabulary, stamp: int) -> None:
        if self._label_info_pub is not None:
            msg = label_info_msg(
                vocab, stamp, self._label_info_frame, self.segmenter.config.prob_threshold
            )
            self._label_info_pub.publish(msg)

    def _republish_label_info(self) -> None:
        """prob_threshold changed: LabelInfo.threshold follows (same class map, same stamp)."""
        with self._out_lock:
            if self._announced is not None and self._stamps.current is not None:
                self._publish_label_info(self._announced, self._stamps.current.stamp)

    def _admit(self, cam: Any, vocab: Vocabulary, header: Any) -> bool:
        """Announce what the frame's class map needs; False if its outputs must be discarded.

        Under _out_lock. The rule of classmap.py: a frame labelled with an older class map than
        the one announced, or stamped before its map's announcement, is not published.
        """
        if self._announced is None or vocab.version > self._announced.version:
            self._announce(vocab)
        outcome, again = self._stamps.admit(vocab.version, classmap.stamp_ns(header))
        if outcome == classmap.OLDER_MAP:
            cam.stats.older_map += 1
            return False
        if outcome == classmap.BEFORE_MAP:
            cam.stats.before_map += 1
            return False
        if again is not None:
            self._logger.warning(
                f"{cam.label}: input stamps jumped back in time; class map "
                f"v{vocab.version} announced again from the new stamp"
            )
            self._publish_classmap(vocab, again.stamp)
        if header.frame_id and not self._label_info_frame:
            # The first camera frame_id seen: LabelInfo carries one (with several cameras, the
            # first camera's), republished once rather than flipping between cameras.
            self._label_info_frame = header.frame_id
            self._publish_label_info(vocab, self._stamps.current.stamp)
        return True
