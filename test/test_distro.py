"""The code on a ROS distribution's numpy and OpenCV, and the check that a workspace install
leaves them alone (test/distro/untouched.py, run by `make test-jazzy`)."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import ovseg_ros

sys.path.insert(0, str(Path(__file__).parent / "distro"))
import untouched  # noqa: E402

DISTRO = os.environ.get("OVSEG_DISTRO", "")


def all_modules() -> list[str]:
    names = ["ovseg_ros"]
    for info in pkgutil.walk_packages(ovseg_ros.__path__, "ovseg_ros."):
        names.append(info.name)
    return sorted(names)


def test_every_module_imports():
    modules = all_modules()
    assert len(modules) > 40 and "ovseg_ros.ros.node" in modules
    for name in modules:
        importlib.import_module(name)


@pytest.mark.skipif(DISTRO != "jazzy", reason="asserts Jazzy's versions; runs in make test-jazzy")
def test_jazzy_numpy_and_opencv_are_the_distributions():
    # Jazzy (Ubuntu 24.04): numpy 1.26, OpenCV 4.6. The suite runs on exactly these there.
    assert np.__version__.startswith("1.26."), np.__version__
    assert cv2.__version__.startswith("4.6."), cv2.__version__
    assert cv2.CV_8UC3 == 16  # what cv_bridge built against OpenCV 4 expects


def test_a_changed_numpy_is_reported():
    before = {"numpy": "1.26.4", "ros-rclpy": "7.1.6", "torch": "2.14.1"}
    after = {"numpy": "2.4.6", "ros-rclpy": "7.1.6", "torch": "2.15.0"}
    problems = untouched.check(before, after)
    assert problems[0] == "numpy changed from 1.26.4 to 2.4.6"
    assert not any("torch" in p for p in problems)  # not the distribution's


def test_a_removed_ros_package_and_a_second_opencv_are_reported():
    before = {"opencv-python-headless": "4.6.0.66", "ros-sensor-msgs": "5.3.6"}
    after = {"opencv-python-headless": "4.6.0.66", "opencv-python": "5.0.0.93"}
    problems = untouched.check(before, after)
    assert "ros-sensor-msgs changed from 5.3.6 to nothing" in problems
    assert any(p.startswith("opencv-python 5.0.0.93 was installed") for p in problems)


def test_an_unchanged_distribution_passes_and_nothing_here_asks_pip_for_opencv():
    now = untouched.installed()
    assert untouched.check(now, dict(now)) == []
    assert "numpy" in untouched.protected(now)


# --- every import has an install path in a ROS workspace ------------------------------------------

REPO = Path(__file__).resolve().parents[1]

#: Third-party import name -> where a ROS workspace gets it: a rosdep key of package.xml, a line
#: of requirements-ros.txt, or optional (the code runs without it).
SOURCES = {
    "numpy": ("rosdep", "python3-numpy"),
    "cv2": ("rosdep", "python3-opencv"),
    "scipy": ("rosdep", "python3-scipy"),
    "sklearn": ("rosdep", "python3-sklearn"),
    "skimage": ("rosdep", "python3-skimage"),
    "matplotlib": ("rosdep", "python3-matplotlib"),
    "PIL": ("rosdep", "python3-pil"),
    "yaml": ("rosdep", "python3-yaml"),
    "tqdm": ("rosdep", "python3-tqdm"),
    "rclpy": ("rosdep", "rclpy"),
    "rcl_interfaces": ("rosdep", "rcl_interfaces"),
    "sensor_msgs": ("rosdep", "sensor_msgs"),
    "std_msgs": ("rosdep", "std_msgs"),
    "std_srvs": ("rosdep", "std_srvs"),
    "diagnostic_msgs": ("rosdep", "diagnostic_msgs"),
    "lifecycle_msgs": ("rosdep", "lifecycle_msgs"),
    "cv_bridge": ("rosdep", "cv_bridge"),
    "ament_index_python": ("rosdep", "ament_index_python"),
    "launch": ("rosdep", "launch"),
    "launch_ros": ("rosdep", "launch_ros"),
    "torch": ("pip", "torch"),
    "torchvision": ("pip", "torchvision"),
    "open_clip": ("pip", "open_clip_torch"),
    "timm": ("pip", "timm"),
    "vision_msgs": ("optional", "~/label_info only"),
    "diffusers": ("optional", "CLIPer fgc extra"),
    "transformers": ("optional", "CLIPer fgc extra"),
    "builtin_interfaces": ("rosdep", "rclpy"),  # comes with rclpy
    "geometry_msgs": ("rosdep", "sensor_msgs"),  # a dependency of sensor_msgs
    "huggingface_hub": ("pip", "open_clip_torch"),  # a dependency of open_clip_torch
    "safetensors": ("pip", "open_clip_torch"),  # likewise
}


def third_party_imports() -> dict[str, str]:
    """Top-level names imported by the package and the launch file -> the first file doing so."""
    import ast

    found: dict[str, str] = {}
    files = sorted((REPO / "ovseg_ros").rglob("*.py")) + sorted((REPO / "launch").glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top and top not in sys.stdlib_module_names and top != "ovseg_ros":
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_import_has_a_workspace_install_path():
    package_xml = (REPO / "package.xml").read_text()
    requirements = (REPO / "requirements-ros.txt").read_text()
    pip_names = {
        line.split("#")[0].strip().split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for line in requirements.splitlines()
        if line.split("#")[0].strip()
    }
    for name, where in third_party_imports().items():
        assert name in SOURCES, f"{where} imports {name}: add its rosdep key or pip line"
        kind, source = SOURCES[name]
        if kind == "rosdep":
            assert f"<exec_depend>{source}</exec_depend>" in package_xml, (name, source)
        elif kind == "pip":
            assert source.lower() in pip_names, (name, source)
    # What the distribution provides is never pip-installed over it in a workspace.
    assert not pip_names & {"numpy", "opencv-python", "opencv-python-headless", "scipy"}
