"""The node as a separate process: `ovseg_node` started from its console script, talking over real
DDS on this host (own ROS_DOMAIN_ID per test, the project's Fast DDS profile via rosutil).

The test side is an in-process rclpy node that streams real sample photos the way a camera does
(a timer, until the condition holds) and subscribes to the outputs; every wait is on a condition
(messages received, QoS seen in the graph, process exited), never a fixed sleep.
The model is `ovseg-tiny` with random weights: labels are meaningless, the contract is what is
checked (encodings, sizes, headers, class map, QoS, exit codes, shutdown).
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import cv2
import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rosutil import (
    PARAMS_FILE,
    child_process,
    next_domain_id,
    python_executable,
    ros_context,
    ros_env,
    spin_until,
    stop_process,
)
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String

from ovseg_ros.engine.config import DEFAULT_VOCABULARY
from ovseg_ros.ros.decode import msg_to_array
from ovseg_ros.ros.encode import rgb_to_msg
from ovseg_ros.samples import sample_images

pytestmark = pytest.mark.ros

# The tiny random-weight model (loads in about 2 s). `off` is quoted: unquoted, the ROS command
# line reads it as the YAML boolean false (see test_text_cache_off_unquoted).
NODE_PARAMS = [
    "model.name:=ovseg-tiny",
    "model.pretrained:=none",
    "device:=cpu",
    "templates:=single",
    "text.cache_dir:=none",
]
FRAME_ID = "test_camera_color_optical_frame"
START_TIMEOUT = 60.0  # node start (imports + model) and discovery on a loaded 2-core machine

RELIABLE = QoSProfile(
    depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST
)
LATCHED = QoSProfile(
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
    history=HistoryPolicy.KEEP_LAST,
)


# --- helpers -----------------------------------------------------------------------------------


@functools.cache
def _samples() -> dict[str, np.ndarray]:
    return dict(sample_images())


def sample(name: str, width: int, height: int) -> np.ndarray:
    """A bundled sample photo resized to width x height (HxWx3 uint8 RGB)."""
    return cv2.resize(_samples()[name], (width, height), interpolation=cv2.INTER_AREA)


def stamp_key(header: Any) -> tuple[int, int]:
    return (int(header.stamp.sec), int(header.stamp.nanosec))


class NodeProcess:
    """A running ovseg_node; its output is drained by a thread (a full pipe would block it)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.append(line)

    def output(self) -> str:
        return "".join(self._lines)

    def finish(self, timeout: float = 10.0) -> str:
        """All of the output, once the process has ended."""
        self._reader.join(timeout)
        return self.output()

    def stop(self) -> int:
        """SIGINT (then SIGKILL): the exit code."""
        code = stop_process(self.proc)
        self.finish()
        return code


def node_command(*params: str) -> list[str]:
    args = ["--ros-args", "--params-file", str(PARAMS_FILE)]
    for param in (*NODE_PARAMS, *params):
        args += ["-p", param]
    return python_executable("ovseg_node") + args


@contextmanager
def ovseg_process(domain: int, *params: str) -> Iterator[NodeProcess]:
    """ovseg_node with the tiny model (plus `params`) in its own process, always stopped."""
    with child_process(node_command(*params), ros_env(domain)) as proc:
        node = NodeProcess(proc)
        try:
            yield node
        finally:
            node.stop()


@contextmanager
def ros_client(domain: int) -> Iterator[tuple[Any, SingleThreadedExecutor]]:
    """The test's own node and executor in the given domain."""
    with ros_context(domain) as context:
        node = rclpy.create_node("ovseg_test_client", context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        try:
            yield node, executor
        finally:
            executor.shutdown()
            node.destroy_node()


def wait(
    executor: SingleThreadedExecutor,
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    ovseg: NodeProcess | None = None,
) -> None:
    """Spin until predicate() holds; fail early (with the node's output) if the node exits."""
    spin_until(
        executor,
        lambda: predicate() or (ovseg is not None and ovseg.proc.poll() is not None),
        timeout,
    )
    if predicate():
        return
    detail = ""
    if ovseg is not None:
        code = ovseg.proc.poll()
        state = "still running" if code is None else f"exited with code {code}"
        detail = f"; ovseg_node {state}, its output:\n{ovseg.output()[-4000:]}"
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}{detail}")


class Inbox:
    """A subscription that keeps what it receives (all messages, or only a count and the last)."""

    def __init__(self, node: Any, msg_type: type, topic: str, qos: QoSProfile, keep: bool = True):
        self.messages: list[Any] = []
        self.count = 0
        self.last: Any = None
        self._keep = keep
        self.sub = node.create_subscription(msg_type, topic, self._on_msg, qos)

    def _on_msg(self, msg: Any) -> None:
        self.count += 1
        self.last = msg
        if self._keep:
            self.messages.append(msg)

    def by_stamp(self) -> dict[tuple[int, int], Any]:
        return {stamp_key(m.header): m for m in self.messages}


class CameraStream:
    """Publishes one image over and over at `rate_hz` with fresh stamps, like a camera driver."""

    def __init__(
        self,
        node: Any,
        rgb: np.ndarray,
        qos: QoSProfile,
        rate_hz: float = 10.0,
        camera_info: CameraInfo | None = None,
    ) -> None:
        self._node = node
        # Built once; only the stamp changes per frame.
        self._msg = rgb_to_msg(rgb, Header(frame_id=FRAME_ID))
        self._info = camera_info
        self.sent: dict[tuple[int, int], str] = {}  # stamp -> frame_id of every published frame
        self.pub = node.create_publisher(Image, "image", qos)
        self.info_pub = node.create_publisher(CameraInfo, "camera_info", RELIABLE)
        self.timer = node.create_timer(1.0 / rate_hz, self._tick)

    def _tick(self) -> None:
        if self._info is not None:
            self.info_pub.publish(self._info)
        self._msg.header.stamp = self._node.get_clock().now().to_msg()
        self.sent[stamp_key(self._msg.header)] = self._msg.header.frame_id
        self.pub.publish(self._msg)

    def stop(self) -> None:
        self._node.destroy_timer(self.timer)


def node_input_reliability(node: Any, topic: str = "/image") -> set[ReliabilityPolicy]:
    """Reliability of the subscriptions that the ovseg node has on `topic` (from the graph)."""
    return {
        info.qos_profile.reliability
        for info in node.get_subscriptions_info_by_topic(topic)
        if info.node_name == "ovseg"
    }


# --- 1. end to end ----------------------------------------------------------------------------


def test_outputs_end_to_end():
    """Every output of one frame: encoding, size, header, class map, masks and camera_info."""
    domain = next_domain_id()
    width, height = 400, 300
    rgb = sample("chelsea", width, height)  # a cat
    info_in = CameraInfo()
    info_in.header.frame_id = "camera_info_frame_that_must_be_replaced"
    info_in.width, info_in.height = width, height
    info_in.distortion_model = "plumb_bob"
    info_in.d = [0.1, -0.05, 0.0, 0.0, 0.0]
    info_in.k = [300.0, 0.0, 200.0, 0.0, 300.0, 150.0, 0.0, 0.0, 1.0]
    expected_names = [" ".join(e.split(";")[0].split()) for e in DEFAULT_VOCABULARY]
    assert "cat" in expected_names

    with ovseg_process(domain) as ovseg, ros_client(domain) as (node, executor):
        vocab = Inbox(node, String, "/ovseg/vocabulary", LATCHED)
        labels = Inbox(node, Image, "/ovseg/labels", RELIABLE)
        confidence = Inbox(node, Image, "/ovseg/confidence", RELIABLE)
        overlay = Inbox(node, Image, "/ovseg/overlay", RELIABLE)
        mask = Inbox(node, Image, "/ovseg/masks/cat", RELIABLE)
        info = Inbox(node, CameraInfo, "/ovseg/camera_info", RELIABLE)
        camera = CameraStream(node, rgb, RELIABLE, rate_hz=10.0, camera_info=info_in)
        outputs = (labels, confidence, overlay, mask, info)

        def complete() -> set[tuple[int, int]]:
            stamps = set(labels.by_stamp())
            for inbox in outputs[1:]:
                stamps &= set(inbox.by_stamp())
            return stamps

        wait(executor, lambda: vocab.count > 0 and complete(), START_TIMEOUT, "all outputs", ovseg)
        camera.stop()

        # The class map: reliable + transient local, JSON, ids 0..n-1 in vocabulary order.
        class_map = json.loads(vocab.last.data)
        assert class_map["version"] == 1
        assert class_map["unlabeled"] == 255
        classes = class_map["classes"]
        assert [c["name"] for c in classes] == expected_names
        assert [c["id"] for c in classes] == list(range(len(expected_names)))
        person = classes[expected_names.index("person")]
        assert person["synonyms"] == ["person", "astronaut"]
        assert all(len(c["color"]) == 3 for c in classes)
        class_ids = {c["id"] for c in classes}
        cat_id = classes[expected_names.index("cat")]["id"]

        # Every output carries the header of a frame that was sent (stamp and frame_id).
        for inbox in outputs:
            assert inbox.messages
            for msg in inbox.messages:
                key = stamp_key(msg.header)
                assert key in camera.sent, f"output stamp {key} was never sent"
                assert msg.header.frame_id == camera.sent[key]

        for msg in labels.messages:  # every label value is a class id of the map, or 255
            values = set(np.unique(msg_to_array(msg)).tolist())
            assert values <= class_ids | {255}, values - class_ids - {255}

        stamp = sorted(complete())[-1]
        lab, conf, ovl, msk, inf = (inbox.by_stamp()[stamp] for inbox in outputs)
        for msg, encoding, step in ((lab, "mono8", 1), (conf, "mono8", 1), (ovl, "rgb8", 3)):
            assert (msg.encoding, msg.width, msg.height) == (encoding, width, height)
            assert msg.step == width * step and msg.is_bigendian == 0
        assert (msk.encoding, msk.width, msk.height) == ("mono8", width, height)

        label_img = msg_to_array(lab)
        assert label_img.shape == (height, width)
        assert msg_to_array(conf).shape == (height, width)
        assert msg_to_array(ovl).shape == (height, width, 3)
        mask_img = msg_to_array(msk)
        assert set(np.unique(mask_img).tolist()) <= {0, 255}
        np.testing.assert_array_equal(mask_img, (label_img == cat_id).astype(np.uint8) * 255)

        # camera_info comes back with the header of the output frame, the rest unchanged.
        assert stamp_key(inf.header) == stamp and inf.header.frame_id == FRAME_ID
        assert (inf.width, inf.height) == (width, height)
        assert inf.distortion_model == "plumb_bob"
        np.testing.assert_allclose(inf.k, info_in.k)
        np.testing.assert_allclose(inf.d, info_in.d)


# --- 2. input QoS auto ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080)], ids=["640x480", "1920x1080"])
@pytest.mark.parametrize("publisher", ["best_effort", "reliable"])
def test_input_qos_auto(publisher, size):
    """Best-effort and reliable camera publishers both get outputs, at VGA and at 1080p."""
    domain = next_domain_id()
    width, height = size
    if publisher == "reliable":
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        wanted = ReliabilityPolicy.RELIABLE
    else:
        qos = qos_profile_sensor_data
        wanted = ReliabilityPolicy.BEST_EFFORT

    with ovseg_process(domain) as ovseg, ros_client(domain) as (node, executor):
        labels = Inbox(node, Image, "/ovseg/labels", RELIABLE, keep=False)
        CameraStream(node, sample("astronaut", width, height), qos, rate_hz=10.0)
        # input.qos auto: the node matches the publishers' reliability (re-checked each second)
        # and keeps producing outputs after any resubscription.
        wait(
            executor,
            lambda: labels.count > 0 and node_input_reliability(node) == {wanted},
            START_TIMEOUT,
            f"labels and a {wanted.name.lower()} subscription on /image",
            ovseg,
        )
        seen = labels.count
        wait(executor, lambda: labels.count > seen, 30.0, "labels after the QoS check", ovseg)
        assert node_input_reliability(node) == {wanted}
        last = labels.last
        assert (last.encoding, last.width, last.height) == ("mono8", width, height)


# --- 3. set_vocabulary ---------------------------------------------------------------------------


def set_vocabulary_command(*args: str) -> list[str]:
    return python_executable("set_vocabulary") + list(args)


def run_set_vocabulary(domain: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        set_vocabulary_command(*args),
        env=ros_env(domain),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_set_vocabulary_executable():
    """Accepted change (exit 0, new class map v2), rejected change (exit 1), no node (exit 2)."""
    domain = next_domain_id()
    # The node-not-found case needs no node: it runs while the node starts.
    missing = subprocess.Popen(
        set_vocabulary_command("door", "--node", "/no_such_node", "--timeout", "2"),
        env=ros_env(domain),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with ovseg_process(domain) as ovseg, ros_client(domain) as (node, executor):
            vocab = Inbox(node, String, "/ovseg/vocabulary", LATCHED)
            labels = Inbox(node, Image, "/ovseg/labels", RELIABLE)
            # The timer only fires while this process spins: no frames during subprocess.run.
            camera = CameraStream(node, sample("coffee", 320, 240), RELIABLE, rate_hz=5.0)
            wait(
                executor,
                lambda: vocab.count > 0 and labels.count > 0,
                START_TIMEOUT,
                "the class map and labels",
                ovseg,
            )
            assert json.loads(vocab.last.data)["version"] == 1

            done = run_set_vocabulary(
                domain,
                "door",
                "chair",
                "red mug; coffee mug",
                "--node",
                "/ovseg",
                "--timeout",
                "60",
            )
            out = done.stdout + done.stderr
            assert done.returncode == 0, out
            assert "vocabulary v2 " in done.stdout, out
            printed = re.findall(r"^\s+(\d+)\s+(.+?)\s*$", done.stdout, flags=re.MULTILINE)
            assert printed == [
                ("0", "door  [masks/door]"),
                ("1", "chair  [masks/chair]"),
                ("2", "red mug  (also: coffee mug)  [masks/red_mug]"),
            ]
            assert "for label images stamped from" in done.stdout

            # The node announces the same map (latched), and frames sent after it use its ids.
            def announced_v2() -> bool:
                return json.loads(vocab.last.data)["version"] == 2

            wait(executor, announced_v2, 10.0, "class map v2 on /ovseg/vocabulary", ovseg)
            class_map = json.loads(vocab.last.data)
            assert [c["name"] for c in class_map["classes"]] == ["door", "chair", "red mug"]
            assert class_map["classes"][2]["synonyms"] == ["red mug", "coffee mug"]
            now = node.get_clock().now().to_msg()
            after = (now.sec, now.nanosec)

            def new_labels() -> list[Image]:
                return [m for m in labels.messages if stamp_key(m.header) > after]

            wait(executor, lambda: len(new_labels()) >= 2, 30.0, "labels after the change", ovseg)
            camera.stop()
            for msg in new_labels():
                assert set(np.unique(msg_to_array(msg)).tolist()) <= {0, 1, 2, 255}

            rejected = run_set_vocabulary(
                domain, "door", "door", "--node", "/ovseg", "--timeout", "30"
            )
            assert rejected.returncode == 1, rejected.stdout + rejected.stderr
            assert "rejected" in rejected.stdout, rejected.stdout
            assert "duplicate name 'door'" in rejected.stdout, rejected.stdout
    finally:
        try:
            missing_out, missing_err = missing.communicate(timeout=60)
        finally:
            if missing.poll() is None:
                missing.kill()
                missing.wait()
    assert missing.returncode == 2, missing_out + missing_err
    assert "no node /no_such_node found" in missing_err, missing_err


# --- 4. start-up failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "code", "named"),
    [
        ("model.checkpoint:=/nonexistent/weights.pt", 3, "/nonexistent/weights.pt"),
        ("input.short_side:=5", 2, "input.short_side"),
    ],
    ids=["missing-checkpoint", "short-side-out-of-range"],
)
def test_startup_failure_exit_code(param, code, named):
    """A model that cannot load exits 3, an invalid parameter 2; one FATAL line says which."""
    domain = next_domain_id()
    with ovseg_process(domain, param) as ovseg:
        try:
            ovseg.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ovseg_node still running 60 s after start:\n{ovseg.output()[-4000:]}")
        out = ovseg.finish()
    assert ovseg.proc.returncode == code, out
    fatal = [line for line in out.splitlines() if "FATAL" in line]
    assert len(fatal) == 1, out
    assert named in fatal[0], out
    assert "Traceback" not in out, out


# --- 5. clean shutdown ---------------------------------------------------------------------------


class TracebackInOutput(AssertionError):
    """The node printed a traceback while shutting down."""


def test_sigint_with_frames_in_flight_exits_cleanly():
    """SIGINT while a 30 Hz camera streams and outputs flow: exit code 0, no traceback."""
    domain = next_domain_id()
    with ovseg_process(domain) as ovseg, ros_client(domain) as (node, executor):
        outputs = [
            Inbox(node, Image, f"/ovseg/{leaf}", RELIABLE, keep=False)
            for leaf in ("labels", "confidence", "overlay", "masks/cat")
        ]
        CameraStream(node, sample("rocket", 640, 480), RELIABLE, rate_hz=30.0)
        wait(
            executor,
            lambda: all(inbox.count >= 3 for inbox in outputs),
            START_TIMEOUT,
            "outputs",
            ovseg,
        )
        # Keep the camera streaming (and the outputs subscribed) while the node is stopped.
        streaming = threading.Event()
        streaming.set()

        def spin() -> None:
            while streaming.is_set():
                executor.spin_once(timeout_sec=0.01)

        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
        try:
            code = ovseg.stop()
        finally:
            streaming.clear()
            spinner.join(5)
        out = ovseg.finish()
    assert code == 0, out
    if "Traceback" in out:
        raise TracebackInOutput(out)
