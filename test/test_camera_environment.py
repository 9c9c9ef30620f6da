"""Tests of the sample camera's DDS environment (set before rclpy starts)."""

from __future__ import annotations

from rosutil import REPO

from ovseg_ros.ros.camera.environment import configure_environment


def test_configure_environment():
    env: dict[str, str] = {}
    notes = configure_environment(env)
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert "ROS_LOCALHOST_ONLY" not in env
    assert any("LOCALHOST" in n for n in notes)
    assert env["FASTDDS_DEFAULT_PROFILES_FILE"] == str(REPO / "config" / "fastdds.xml")
    # Choices of the user are kept.
    env = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET", "FASTDDS_DEFAULT_PROFILES_FILE": "/x.xml"}
    assert configure_environment(env) == [] and env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "SUBNET"
    env = {"ROS_LOCALHOST_ONLY": "0", "RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}
    assert configure_environment(env) == []
    assert "ROS_AUTOMATIC_DISCOVERY_RANGE" not in env and "FASTDDS_DEFAULT_PROFILES_FILE" not in env
    env = {"ROS_DISTRO": "humble"}
    configure_environment(env)
    assert env["ROS_LOCALHOST_ONLY"] == "1"
