"""CLIP-RC in the ROS node: selected at run time from a (tiny, random) checkpoint, released on a
switch away. The checkpoint comes from test_cliprc's fixture code (official keys and shapes)."""

from __future__ import annotations

import pytest
from nodeharness import sample_frame
from rclpy.parameter import Parameter
from test_cliprc import TINY, official_shapes, random_state, save_checkpoint

from ovseg_ros.ros.encode import rgb_to_msg

pytestmark = pytest.mark.ros


def test_node_switches_to_cliprc_and_back(harness, tiny_backbone, tmp_path):
    path = save_checkpoint(tmp_path / "voc_zero.pth", random_state(official_shapes(**TINY)))
    h = harness(backbone=tiny_backbone, method="naclip", input__short_side=64)
    pub = h.publisher("image")
    labels = h.collect("/ovseg/labels")
    msg = rgb_to_msg(sample_frame(160, 120, index=1), None)

    def publish() -> None:
        h.stamp(msg)
        pub.publish(msg)

    [r] = h.set_parameters(Parameter("method_params.cliprc.checkpoint", value=path))
    assert r.successful
    [r] = h.set_parameters(Parameter("method", value="cliprc"))
    assert r.successful, r.reason
    h.wait_reconfigured(timeout=120)
    method = h.node.segmenter.method
    assert method.name == "cliprc" and method.loaded
    assert method.setting.name == "voc_inductive"  # the file name says 'zero' (inductive)
    count = len(labels)
    assert h.stream(publish, lambda: len(labels) >= count + 2, timeout=120)
    assert (labels[-1][1].width, labels[-1][1].height) == (160, 120)

    [r] = h.set_parameters(Parameter("method", value="naclip"))
    assert r.successful
    h.wait_reconfigured(timeout=120)
    count = len(labels)
    assert h.stream(publish, lambda: len(labels) >= count + 1, timeout=120)
    assert h.node.segmenter.config.method == "naclip"
    assert not method.loaded  # the network was released on the switch
    assert h.node.slots.stats[""].failed == 0
