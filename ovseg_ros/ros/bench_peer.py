"""The node bench's peer: the cameras and the output subscribers, in a process of their own.

A node in a robot serves cameras and subscribers (RViz, planners) that live in other processes.
The bench does the same: NodeSession (bench_node_session.py) hosts the node and starts this file
as a script, so receiving the outputs (deserialising ~1.5 MB a frame, running an executor) does
not compete with the node's threads for the GIL (measured: building the confidence message took
0.9 ms in the node's publish thread with the peer in its process, 0.16 ms with the peer apart).

The peer answers one JSON command per line on stdin with one JSON line on stdout:

* {"op": "open", "key": K, "inputs": [topic per camera], "outputs": [[topics] per camera]}:
  publishers and subscriptions (reliable, depth 1) for a node, waited on until every one is
  matched; answers {"ok": true}.
* {"op": "one", "key": K, "camera": c, "frame": i, "timeout": s}: publish frame i stamped now to
  camera c, wait until it came back on every output; answers {"outputs": [ms per output]}.
* {"op": "stream", "key": K, "duration": s, "rate": hz}: publish to every camera at `rate` Hz
  for `duration` s; answers {"sent": [[camera, stamp ns], ...], "ticks": n}.
* {"op": "collect", "key": K, "published": n, "limit": s}: wait until `n` of the frames sent
  in the last stream came back complete (or `limit` s), then answer
  {"arrivals": {topic: {stamp: arrival time}}} for them.

Stamps and arrivals are wall-clock times of this machine, so latencies are the same across the
two processes. Frames are bench_frames(size) (the same images the session prepared).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


class Peer:
    """One rclpy node with the cameras' publishers and the outputs' subscriptions."""

    def __init__(self, size: tuple[int, int]) -> None:
        """Start ROS on ROS_DOMAIN_ID (set by the session) and make the frames."""
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node

        from ovseg_ros.ros.bench_node_session import FRAMES, bench_frames
        from ovseg_ros.ros.encode import rgb_to_msg

        self.context = Context()
        rclpy.init(context=self.context, domain_id=int(os.environ["ROS_DOMAIN_ID"]))
        self.executor = SingleThreadedExecutor(context=self.context)
        self.node = Node("bench_camera", context=self.context)
        self.executor.add_node(self.node)
        self.images = bench_frames(size, FRAMES)
        self.frames = FRAMES
        self._to_msg = rgb_to_msg
        self.sets: dict[str, dict[str, Any]] = {}  # key -> publishers, topics, messages, sent
        self.arrivals: dict[str, dict[int, float]] = {}  # output topic -> stamp -> arrival
        # The executor spins all the time, so arrivals are timed when they come, also between
        # two commands; commands wait on this condition, notified by every arrival.
        self._cond = threading.Condition()
        self._spinner = threading.Thread(target=self._spin, name="peer-executor", daemon=True)
        self._spinner.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def spin_until(self, predicate: Callable[[], bool], limit: float) -> bool:
        """Wait until predicate() (checked at every arrival, and every 50 ms) or `limit` s."""
        deadline = time.monotonic() + limit
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    @staticmethod
    def stamp(msg: Any) -> int:
        """Stamp the message with the wall clock now; return the stamp in ns (the match key)."""
        sent = time.time_ns()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(sent, 10**9)
        return sent

    def _keeper(self, topic: str) -> Callable[[Any], None]:
        arrivals = self.arrivals.setdefault(topic, {})

        def keep(msg: Any) -> None:
            arrived = time.time()
            with self._cond:
                arrivals[msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec] = arrived
                self._cond.notify_all()

        return keep

    def _complete(self, topics: list[str], stamp: int) -> bool:
        return all(stamp in self.arrivals[t] for t in topics)

    # --- commands ------------------------------------------------------------------------------

    def open(self, key: str, inputs: list[str], outputs: list[list[str]]) -> dict[str, Any]:
        """Publishers to the node's cameras and subscriptions to its outputs, all matched."""
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        reliable = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        pubs = [self.node.create_publisher(Image, topic, reliable) for topic in inputs]
        subs = [
            self.node.create_subscription(Image, topic, self._keeper(topic), reliable)
            for per_camera in outputs
            for topic in per_camera
        ]
        messages = [[self._to_msg(rgb, None) for rgb in self.images] for _ in pubs]
        self.sets[key] = {"pubs": pubs, "topics": outputs, "messages": messages, "sent": []}
        matched = self.spin_until(
            lambda: (
                all(p.get_subscription_count() > 0 for p in pubs)
                and all(s.get_publisher_count() > 0 for s in subs)
            ),
            30.0,
        )
        if not matched:
            raise RuntimeError("the node and the bench camera did not discover each other")
        return {"ok": True}

    def one(self, key: str, camera: int, frame: int, timeout: float) -> dict[str, Any]:
        """One frame to one camera, back on every output: the latency of each output in ms."""
        s = self.sets[key]
        msg = s["messages"][camera][frame % self.frames]
        stamp = self.stamp(msg)
        s["pubs"][camera].publish(msg)
        topics = s["topics"][camera]
        if not self.spin_until(lambda: self._complete(topics, stamp), timeout):
            raise RuntimeError(f"frame {frame} did not come back within {timeout} s")
        return {"outputs": [(self.arrivals[t][stamp] * 1e9 - stamp) * 1e-6 for t in topics]}

    def stream(self, key: str, duration: float, rate: float) -> dict[str, Any]:
        """Every camera at `rate` Hz for `duration` s, whatever the node does (as cameras do)."""
        s = self.sets[key]
        sent: list[tuple[int, int]] = []
        ticks = [0]

        def tick() -> None:
            for cam, pub in enumerate(s["pubs"]):
                msg = s["messages"][cam][ticks[0] % self.frames]
                sent.append((cam, self.stamp(msg)))
                pub.publish(msg)
            ticks[0] += 1

        timer = self.node.create_timer(1.0 / rate, tick)
        start = time.monotonic()
        self.spin_until(lambda: time.monotonic() - start >= duration, duration + 5.0)
        timer.cancel()
        self.node.destroy_timer(timer)
        s["sent"] = sent
        return {"sent": sent, "ticks": ticks[0]}

    def collect(self, key: str, published: int, limit: float) -> dict[str, Any]:
        """The arrivals of the last stream's frames, once `published` of them are complete."""
        s = self.sets[key]
        sent, topics = s["sent"], s["topics"]

        def arrived() -> int:
            return sum(self._complete(topics[c], k) for c, k in sent)

        self.spin_until(lambda: arrived() >= published, limit)
        stamps = {k for _, k in sent}
        with self._cond:  # the executor thread adds arrivals
            return {
                "arrivals": {
                    t: {str(k): v for k, v in self.arrivals[t].items() if k in stamps}
                    for per_camera in topics
                    for t in per_camera
                }
            }

    def close(self) -> None:
        """End the executor, destroy the node and end the context."""
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()
        self._spinner.join(10)


def main(stdin: Any = sys.stdin, stdout: Any = sys.stdout) -> None:
    """Read the frame size, then commands, one JSON line each; answer each (errors included)."""
    spec = json.loads(stdin.readline())
    peer = Peer(tuple(spec["size"]))
    try:
        print(json.dumps({"ready": True}), file=stdout, flush=True)
        for line in stdin:
            command = json.loads(line)
            op = command.pop("op")
            try:
                answer = getattr(peer, op)(**command)
            except Exception as exc:  # noqa: BLE001 - the session raises it with the reason
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), file=stdout, flush=True)
    finally:
        peer.close()


if __name__ == "__main__":
    main()
