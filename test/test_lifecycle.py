"""The managed (lifecycle) node: every transition, outputs only when active, memory released.

In-process with the `harness` fixture (the lifecycle services called through a peer node, as
`ros2 lifecycle set` does) and as the `ovseg_lifecycle_node` process over DDS on this host.
"""

from __future__ import annotations

import gc
import weakref

import pytest
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from nodeharness import LATCHED, sample_frame
from rclpy.parameter import Parameter
from rosutil import child_process, python_executable, ros_context, ros_env, spin_until
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String

from ovseg_ros.ros.encode import rgb_to_msg
from ovseg_ros.ros.lifecycle import OvsegLifecycleNode

pytestmark = pytest.mark.ros

FRAME = sample_frame(160, 120)


class Lifecycle:
    """A peer's clients of the node's lifecycle services, and a camera + label listener."""

    def __init__(self, h) -> None:
        self.h = h
        self.change = h.peer.create_client(ChangeState, "/ovseg/change_state")
        self.get = h.peer.create_client(GetState, "/ovseg/get_state")
        self.labels = h.collect("/ovseg/labels")
        self.camera = h.publisher("/image")

    def set(self, transition: int) -> bool:
        request = ChangeState.Request(transition=Transition(id=transition))
        return bool(self.h.call(self.change, request).success)

    def state(self) -> str:
        return self.h.call(self.get, GetState.Request()).current_state.label

    def send(self) -> None:
        msg = rgb_to_msg(FRAME, Header())
        self.h.stamp(msg)
        self.camera.publish(msg)

    def labels_arrive(self, timeout: float = 30.0) -> bool:
        before = len(self.labels)
        return self.h.stream(self.send, lambda: len(self.labels) >= before + 2, timeout)

    def no_labels_while_streaming(self, seconds: float = 2.0) -> bool:
        before = len(self.labels)
        self.h.stream(self.send, lambda: False, seconds)
        return len(self.labels) == before


def test_unconfigured_node_has_parameters_only(harness, tiny_backbone):
    h = harness(backbone=tiny_backbone, managed=True)
    node: OvsegLifecycleNode = h.node
    assert node.state == "unconfigured"
    assert node.segmenter is None
    assert node.get_parameter("lifecycle.autostart").value is False
    names = {n for n, _ in node.get_topic_names_and_types()}
    assert "/ovseg/labels" not in names and "/ovseg/vocabulary" not in names


def test_every_transition_and_outputs_only_when_active(harness, tiny_backbone):
    h = harness(backbone=tiny_backbone, managed=True)
    lc = Lifecycle(h)
    assert lc.state() == "unconfigured"

    assert lc.set(Transition.TRANSITION_CONFIGURE)
    assert lc.state() == "inactive" and h.node.segmenter is not None
    assert h.node.count_subscribers("/ovseg/labels") == 1  # the publisher exists, silent
    assert h.node.count_publishers("/image") == 1 and h.node.count_subscribers("/image") == 0
    assert lc.no_labels_while_streaming()

    assert lc.set(Transition.TRANSITION_ACTIVATE)
    assert lc.state() == "active"
    assert lc.labels_arrive(), "an active node segments the frames"

    assert lc.set(Transition.TRANSITION_DEACTIVATE)
    assert lc.state() == "inactive"
    assert h.spin_until(lambda: h.node.count_subscribers("/image") == 0, 10)
    assert h.node.worker.ended()
    assert lc.no_labels_while_streaming(), "an inactive node publishes nothing"
    assert h.node.segmenter is not None  # the model stays loaded by default

    assert lc.set(Transition.TRANSITION_ACTIVATE)  # instant: nothing to load
    assert lc.labels_arrive()
    assert lc.set(Transition.TRANSITION_DEACTIVATE)

    assert lc.set(Transition.TRANSITION_CLEANUP)
    assert lc.state() == "unconfigured" and h.node.segmenter is None
    assert h.spin_until(lambda: h.node.count_subscribers("/ovseg/labels") == 1, 5)
    names = {n for n, _ in h.node.get_topic_names_and_types()}
    assert "/ovseg/vocabulary" not in names

    # and the whole cycle again, from a clean slate
    assert lc.set(Transition.TRANSITION_CONFIGURE)
    assert lc.set(Transition.TRANSITION_ACTIVATE)
    assert lc.labels_arrive()


def test_bad_transitions_are_refused(harness, tiny_backbone):
    h = harness(backbone=tiny_backbone, managed=True)
    lc = Lifecycle(h)
    assert not lc.set(Transition.TRANSITION_ACTIVATE)  # not configured
    assert not lc.set(Transition.TRANSITION_DEACTIVATE)
    assert not lc.set(Transition.TRANSITION_CLEANUP)
    assert lc.state() == "unconfigured"
    assert lc.set(Transition.TRANSITION_CONFIGURE)
    assert not lc.set(Transition.TRANSITION_CONFIGURE)  # already configured
    assert lc.state() == "inactive"


def test_a_failed_configure_says_why_and_stays_unconfigured(harness, tiny_backbone):
    # Unconfigured, parameters are taken as they come; configure checks them.
    h = harness(backbone=tiny_backbone, managed=True, vocabulary=["cat", "cat"])
    lc = Lifecycle(h)
    assert not lc.set(Transition.TRANSITION_CONFIGURE)
    assert lc.state() == "unconfigured" and h.node.segmenter is None
    assert "vocabulary" in h.node.last_error and "cat" in h.node.last_error
    assert h.node.last_error.count(".") <= 2  # one sentence
    h.set_parameters(Parameter("vocabulary", Parameter.Type.STRING_ARRAY, ["cat", "dog"]))
    assert lc.set(Transition.TRANSITION_CONFIGURE)
    assert h.node.segmenter.vocabulary.names == ["cat", "dog"]


def _model_ref(node) -> weakref.ref:
    return weakref.ref(node.segmenter.backbone.model)


def test_cleanup_frees_the_model(harness):
    h = harness(managed=True)
    lc = Lifecycle(h)
    assert lc.set(Transition.TRANSITION_CONFIGURE)
    model = _model_ref(h.node)
    assert lc.set(Transition.TRANSITION_ACTIVATE) and lc.labels_arrive()
    assert lc.set(Transition.TRANSITION_DEACTIVATE)
    gc.collect()
    assert model() is not None  # kept while inactive
    assert lc.set(Transition.TRANSITION_CLEANUP)
    gc.collect()
    assert model() is None, "cleanup must release the model"


def test_unload_on_deactivate_frees_the_model_and_activate_loads_it(harness):
    h = harness(managed=True, lifecycle__unload_on_deactivate=True)
    lc = Lifecycle(h)
    assert lc.set(Transition.TRANSITION_CONFIGURE) and lc.set(Transition.TRANSITION_ACTIVATE)
    model = _model_ref(h.node)
    assert lc.labels_arrive()
    assert lc.set(Transition.TRANSITION_DEACTIVATE)
    gc.collect()
    assert model() is None and lc.state() == "inactive"
    assert lc.no_labels_while_streaming()
    assert lc.set(Transition.TRANSITION_ACTIVATE)
    assert h.node.segmenter is not None and lc.labels_arrive()


def test_vocabulary_change_while_inactive_is_used_on_activation(harness, tiny_backbone):
    h = harness(backbone=tiny_backbone, managed=True)
    lc = Lifecycle(h)
    vocab = h.collect("/ovseg/vocabulary", msg_type=String, qos=LATCHED)
    assert lc.set(Transition.TRANSITION_CONFIGURE)
    h.set_parameters(Parameter("vocabulary", Parameter.Type.STRING_ARRAY, ["road", "tree"]))
    h.wait_reconfigured()
    assert h.node.segmenter.vocabulary.names == ["road", "tree"]
    assert lc.set(Transition.TRANSITION_ACTIVATE)
    assert h.spin_until(lambda: any('"road"' in m.data for _, m in vocab), 10)
    assert lc.labels_arrive()


def test_mask_topics_made_while_active_publish(harness, tiny_backbone):
    h = harness(backbone=tiny_backbone, managed=True, vocabulary=["sky", "ground"])
    lc = Lifecycle(h)
    assert lc.set(Transition.TRANSITION_CONFIGURE) and lc.set(Transition.TRANSITION_ACTIVATE)
    masks = h.collect("/ovseg/masks/sky")
    assert h.stream(lc.send, lambda: len(masks) >= 2, 30), "a lazily made mask topic publishes"


@pytest.mark.parametrize("state", ["unconfigured", "inactive", "active"])
def test_shutdown_from_each_state(harness, state):
    h = harness(managed=True)
    lc = Lifecycle(h)
    if state != "unconfigured":
        assert lc.set(Transition.TRANSITION_CONFIGURE)
    if state == "active":
        assert lc.set(Transition.TRANSITION_ACTIVATE) and lc.labels_arrive()
    model = _model_ref(h.node) if state != "unconfigured" else None
    transition = {
        "unconfigured": Transition.TRANSITION_UNCONFIGURED_SHUTDOWN,
        "inactive": Transition.TRANSITION_INACTIVE_SHUTDOWN,
        "active": Transition.TRANSITION_ACTIVE_SHUTDOWN,
    }[state]
    assert lc.set(transition)
    assert h.node.state == "finalized" and h.node.segmenter is None
    if state == "active":
        assert h.node.worker.ended()
    gc.collect()
    assert model is None or model() is None


def test_plain_node_has_no_lifecycle(harness, tiny_backbone):
    h = harness(backbone=tiny_backbone)
    names = {n for n, _ in h.node.get_service_names_and_types()}
    assert "/ovseg/change_state" not in names
    assert not h.node.has_parameter("lifecycle.autostart")


# --- as a process ------------------------------------------------------------------------------

NODE_PARAMS = [
    "model.name:=ovseg-tiny",
    "model.pretrained:=none",
    "device:=cpu",
    "templates:=single",
    "text.cache_dir:=none",
]


def _command(*params: str) -> list[str]:
    args = ["--ros-args"]
    for param in (*NODE_PARAMS, *params):
        args += ["-p", param]
    return python_executable("ovseg_lifecycle_node") + args


def _client(context):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    node = rclpy.create_node("lifecycle_test_client", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    return node, executor


def _call(executor, client, request, timeout=60.0):
    assert spin_until(executor, client.service_is_ready, timeout), "service never appeared"
    future = client.call_async(request)
    assert spin_until(executor, future.done, timeout)
    return future.result()


def _labels_while_streaming(node, executor, proc, timeout: float) -> list:
    """Stream FRAME to /image until two label images came back (or the process ended)."""
    got: list = []
    node.create_subscription(Image, "/ovseg/labels", got.append, 10)
    pub = node.create_publisher(Image, "/image", 10)
    msg = rgb_to_msg(FRAME, Header())

    def send_until_labels() -> bool:
        msg.header.stamp = node.get_clock().now().to_msg()
        pub.publish(msg)
        return len(got) >= 2 or proc.poll() is not None

    spin_until(executor, send_until_labels, timeout, step=0.1)
    return got


def test_process_driven_by_a_lifecycle_manager_then_shut_down():
    """Unconfigured at start; configure + activate over the services; shutdown ends it (0)."""
    from rosutil import next_domain_id

    domain = next_domain_id()
    with child_process(_command(), ros_env(domain)) as proc, ros_context(domain) as context:
        node, executor = _client(context)
        try:
            get = node.create_client(GetState, "/ovseg/get_state")
            change = node.create_client(ChangeState, "/ovseg/change_state")
            assert _call(executor, get, GetState.Request()).current_state.label == "unconfigured"
            for t in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
                assert _call(executor, change, ChangeState.Request(transition=Transition(id=t)))
            assert len(_labels_while_streaming(node, executor, proc, 60)) >= 2, "no labels"
            request = ChangeState.Request(
                transition=Transition(id=Transition.TRANSITION_ACTIVE_SHUTDOWN)
            )
            assert _call(executor, change, request).success
            assert proc.wait(timeout=15) == 0, "the finalized node exits with 0"
        finally:
            executor.shutdown()
            node.destroy_node()


def test_process_autostart_segments_at_once():
    from rosutil import next_domain_id, stop_process

    domain = next_domain_id()
    cmd = _command("lifecycle.autostart:=true")
    with child_process(cmd, ros_env(domain)) as proc, ros_context(domain) as context:
        node, executor = _client(context)
        try:
            got = _labels_while_streaming(node, executor, proc, 90)
            assert proc.poll() is None and len(got) >= 2
            assert stop_process(proc) == 0  # SIGINT in the active state: clean exit
        finally:
            executor.shutdown()
            node.destroy_node()


def test_process_autostart_failure_is_one_sentence_and_exit_2():
    from rosutil import next_domain_id

    domain = next_domain_id()
    cmd = _command("lifecycle.autostart:=true", "vocabulary:=[cat, cat]")
    with child_process(cmd, ros_env(domain)) as proc:
        out, _ = proc.communicate(timeout=90)
    text = out if isinstance(out, str) else (out or b"").decode()
    assert proc.returncode == 2, text[-2000:]
    assert "lifecycle autostart failed" in text and "Traceback" not in text


def test_lifecycle_memory_report_follows_the_states():
    """bench_lifecycle (the BENCHMARKS figures) on the tiny model: the rows and what they hold."""
    from rosutil import next_domain_id

    from ovseg_ros.ros import bench_lifecycle

    rows = bench_lifecycle.measure("ovseg-tiny", "cpu", 1, 160, 120, 180, next_domain_id())
    states = [r["state"] for r in rows]
    assert states[0] == "unconfigured (start)" and states[-1] == "unconfigured (cleaned up)"
    assert states[2].startswith("active")
    held = [r["model_tensors_mb"] for r in rows]
    assert held[0] == 0 and held[-1] == 0  # nothing before configure, nothing after cleanup
    assert held[1] > 0 and held[1] == held[2] == held[3]  # the model is kept while inactive
    assert all(r["rss_mb"] > 0 for r in rows)
    assert "| active" in bench_lifecycle.table(rows)
