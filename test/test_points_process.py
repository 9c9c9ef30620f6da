"""~/points with the node and the sample camera as separate processes, over real DDS on this host.

`ovseg_node` runs with depth.enabled and output.qos sensor_data (the profile nav2's
semantic_segmentation_layer subscribes with); `sample_camera --depth` streams photos with a
registered 16UC1 floor depth; this test subscribes best effort, as the layer does, and checks what
the layer relies on: label image, confidence and cloud with identical headers, one point per label
pixel, the label and confidence fields equal to the images, and the floor's x, y, z.
Conventions of test_node_process.py: own ROS_DOMAIN_ID, localhost discovery, waits on conditions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from rclpy.qos import ReliabilityPolicy, qos_profile_sensor_data
from rosutil import child_process, next_domain_id, python_executable, ros_env
from sensor_msgs.msg import Image, PointCloud2
from std_msgs.msg import Header
from test_node_process import START_TIMEOUT, Inbox, ovseg_process, ros_client, wait

from ovseg_ros.ros.camera.messages import floor_depth, pinhole_camera_info
from ovseg_ros.ros.decode import msg_to_array
from ovseg_ros.ros.points import cloud_to_array

pytestmark = pytest.mark.ros

WIDTH, HEIGHT = 320, 240


def test_points_for_nav2_between_processes():
    domain = next_domain_id()
    camera_cmd = python_executable("sample_camera") + [
        "--depth",
        "--size",
        f"{WIDTH}x{HEIGHT}",
        "--rate",
        "5",
        "--out",
        "",
        "--frame-id",
        "camera_color_optical_frame",
    ]
    with (
        ovseg_process(domain, "depth.enabled:=true", "output.qos:=sensor_data") as ovseg,
        child_process(camera_cmd, ros_env(domain)) as camera,
        ros_client(domain) as (node, executor),
    ):
        qos = qos_profile_sensor_data
        labels = Inbox(node, Image, "/ovseg/labels", qos)
        confidence = Inbox(node, Image, "/ovseg/confidence", qos)
        points = Inbox(node, PointCloud2, "/ovseg/points", qos)

        def common() -> set:
            return set(labels.by_stamp()) & set(confidence.by_stamp()) & set(points.by_stamp())

        wait(executor, lambda: len(common()) >= 2, START_TIMEOUT, "labels + points", ovseg)
        assert camera.poll() is None, camera.stdout.read()
        publishers = node.get_publishers_info_by_topic("/ovseg/points")
        assert [p.qos_profile.reliability for p in publishers] == [ReliabilityPolicy.BEST_EFFORT]

    stamp = sorted(common())[-1]
    lab, conf, pts = (inbox.by_stamp()[stamp] for inbox in (labels, confidence, points))
    assert pts.header == lab.header == conf.header
    assert pts.header.frame_id == "camera_color_optical_frame"
    assert (pts.width, pts.height) == (lab.width, lab.height) == (WIDTH, HEIGHT)
    cloud = cloud_to_array(pts)
    np.testing.assert_array_equal(cloud["label"], msg_to_array(lab))
    np.testing.assert_array_equal(cloud["confidence"], msg_to_array(conf))
    # The sample camera's floor: 1 m below, pitched 30 degrees; its K is pinhole_camera_info's.
    info = pinhole_camera_info(WIDTH, HEIGHT, Header())
    fx, cx, fy, cy = info.k[0], info.k[2], info.k[4], info.k[5]
    z = floor_depth(WIDTH, HEIGHT, info.k) / 1000.0
    u, v = np.meshgrid(np.arange(WIDTH), np.arange(HEIGHT))
    np.testing.assert_allclose(cloud["z"], z, rtol=1e-6)
    np.testing.assert_allclose(cloud["x"], (u - cx) / fx * z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cloud["y"], (v - cy) / fy * z, rtol=1e-5, atol=1e-6)
    down = np.array([0.0, math.cos(math.radians(30)), math.sin(math.radians(30))])
    on_plane = np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=-1) @ down
    np.testing.assert_allclose(on_plane, 1.0, atol=2e-3)
