"""The node's /diagnostics status: rates, latencies, counters, and a level that tells the truth.

A mixin of OvsegNode (node.py); the counters and rules are diagnostics.py (no rclpy there). QoS
mismatches are read from the ROS graph every report, so the warning lasts exactly as long as a
mismatched peer is there.
"""

from __future__ import annotations

import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

from . import diagnostics as D
from .decode import REJECTION_KINDS


class HealthReporting:
    """diagnostics() and the graph's QoS check for OvsegNode."""

    def qos_problems(self) -> list[str]:
        """QoS mismatches present in the ROS graph now, on this node's image topics."""
        me = self.get_name()
        out_reliable = self._qos_out.reliability == ReliabilityPolicy.RELIABLE
        problems = []
        for cam in self._cams.values():
            topic = cam.image_sub.topic_name
            sub_reliable = cam.reliability == ReliabilityPolicy.RELIABLE
            for info in self.get_publishers_info_by_topic(topic):
                if info.node_name == me:
                    continue
                why = D.incompatibility(
                    info.qos_profile.reliability == ReliabilityPolicy.RELIABLE,
                    info.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL,
                    sub_reliable,
                    False,
                )
                if why:
                    problems.append(f"{topic}: publisher {info.node_name} ({why})")
            for leaf in ("labels", "confidence", "overlay", "camera_info"):
                pub = cam.publisher(leaf)
                if pub is None:
                    continue
                for info in self.get_subscriptions_info_by_topic(pub.topic_name):
                    if info.node_name == me:
                        continue
                    why = D.incompatibility(
                        out_reliable,
                        False,
                        info.qos_profile.reliability == ReliabilityPolicy.RELIABLE,
                        info.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL,
                    )
                    if why:
                        problems.append(f"{pub.topic_name}: subscriber {info.node_name} ({why})")
        return problems

    def diagnostics(self) -> DiagnosticStatus:
        """One DiagnosticStatus with rates, latencies, counters and a truthful level."""
        now = time.monotonic()
        latency, inference = self._window.snapshot()
        cfg = self.segmenter.config
        vocab = self.segmenter.vocabulary
        values: list[tuple[str, str]] = []
        problems: list[D.Problem] = []
        total_in = total_out = 0.0
        for cam in self._cams.values():
            st = self._slots.stats[cam.name]
            prev_t, prev_in, prev_out = self._diag_prev.get(cam.name, (self._started, 0, 0))
            dt = max(now - prev_t, 1e-6)
            rate_in = (st.received - prev_in) / dt
            rate_out = (cam.stats.published - prev_out) / dt
            self._diag_prev[cam.name] = (now, st.received, cam.stats.published)
            total_in += rate_in
            total_out += rate_out
            p = f"{cam.label}: "
            cam.stats.failures(st.failed, now)
            values += [
                (p + "input rate (Hz)", f"{rate_in:.2f}"),
                (p + "output rate (Hz)", f"{rate_out:.2f}"),
                (p + "frames received", str(st.received)),
                (p + "frames published", str(cam.stats.published)),
                (p + "frames dropped (replaced by newer)", str(st.dropped)),
                (p + "frames rejected", str(sum(cam.stats.rejected.values()))),
                (p + "frames failed", str(st.failed)),
                (p + "frames skipped (no subscriber)", str(cam.stats.skipped_idle)),
                (p + "outputs discarded (older class map)", str(cam.stats.older_map)),
                (p + "outputs discarded (stamped before its class map)", str(cam.stats.before_map)),
                (p + "input QoS", cam.reliability.name.lower() if cam.reliability else "-"),
                (p + "mask topics", str(self._masks.count(cam.name))),
            ]
            values += D.rejection_values(p, cam.stats, REJECTION_KINDS)
            if cam.depth is not None:
                values += D.depth_values(p, cam.depth)
                problems += D.depth_problems(cam.label, cam.depth, now)
            problems += D.camera_problems(cam.label, cam.stats, st.received, self._started, now)
        gpu = "-"
        device = self.segmenter.device
        if device.type == "cuda":
            import torch

            gpu = f"{torch.cuda.memory_allocated(device) / 2**20:.0f} MiB"
        qos = self.qos_problems()
        values += [
            ("inference ms p50", f"{D.percentile(inference, 50):.1f}"),
            ("inference ms p95", f"{D.percentile(inference, 95):.1f}"),
            ("latency ms p50 (input stamp to publish)", f"{D.percentile(latency, 50):.1f}"),
            ("latency ms p95 (input stamp to publish)", f"{D.percentile(latency, 95):.1f}"),
            ("device", self._device_text),
            ("GPU memory allocated", gpu),
            ("method", cfg.method),
            ("vocabulary version", str(vocab.version)),
            ("vocabulary classes", str(vocab.num_classes)),
            ("vocabulary", D.names_summary(vocab.names)),
            ("enabled", str(self._worker.enabled).lower()),
            ("reconfiguring", ", ".join(self._reconfigurer.pending()) or "-"),
            ("last change error", self._change_error or "-"),
            ("QoS incompatibilities seen", str(self.qos_incompatibilities)),
            ("QoS mismatches now", D.shorten("; ".join(qos)) or "-"),
        ]
        if self._change_error and now - self._change_error_at < D.CHANGE_FAILURE_SECONDS:
            problems.append(D.Problem(1, self._change_error))
        if qos:
            problems.append(
                D.Problem(
                    1, D.shorten(f"QoS mismatch: {qos[0]}" + (" ..." if len(qos) > 1 else ""))
                )
            )
        status = DiagnosticStatus()
        status.name = f"{self.get_fully_qualified_name()}: open-vocabulary segmentation"
        status.hardware_id = self._device_text
        if problems:
            status.level = bytes([max(p.level for p in problems)])
            status.message = D.shorten("; ".join(p.text for p in problems), 2 * D.MAX_TEXT)
        elif not self._worker.enabled:
            status.level = DiagnosticStatus.OK
            status.message = "paused (~/enable or the enabled parameter)"
        else:
            status.level = DiagnosticStatus.OK
            status.message = (
                f"segmenting {total_in:.1f} fps in, {total_out:.1f} fps out with {cfg.method}"
            )
        status.values = [KeyValue(key=k, value=v) for k, v in values]
        return status

    def _publish_diagnostics(self) -> None:
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [self.diagnostics()]
        self._diag_pub.publish(msg)
