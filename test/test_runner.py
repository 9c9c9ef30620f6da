"""`ovseg_node`'s runner without ROS: parameter-file checks and what a stop signal does."""

from __future__ import annotations

import pytest

from ovseg_ros.ros import runner
from ovseg_ros.ros.runner import StopRequest, check_params_file, params_files


def test_params_files_are_found_in_both_spellings():
    args = ["x", "--ros-args", "--params-file", "a.yaml", "-p", "b:=1", "--params-file=c.yaml"]
    assert params_files(args) == ["a.yaml", "c.yaml"]


@pytest.mark.parametrize(
    "text",
    [
        "/**:\n  ros__parameters:\n    vocabulary: [door]\n",
        "ovseg:\n  ros__parameters:\n    method: sclip\n",
        "/robot:\n  ovseg:\n    ros__parameters:\n      method: sclip\n",  # a namespace (rcl)
    ],
)
def test_valid_parameter_files_pass(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert check_params_file(str(path)) == ""


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (None, "does not exist"),
        ("a: [b\n", "not valid YAML at line"),
        ("just text", "holds no mapping"),
        ("ovseg:\n  method: sclip\n", "has no ros__parameters"),
        ("/robot:\n  ovseg:\n    method: sclip\n", "has no ros__parameters"),
    ],
)
def test_bad_parameter_files_get_one_sentence(tmp_path, text, says):
    path = tmp_path / "p.yaml"
    if text is not None:
        path.write_text(text)
    problem = check_params_file(str(path))
    assert says in problem and str(path) in problem and "\n" not in problem


def test_a_folder_is_not_a_parameter_file(tmp_path):
    assert "is a directory" in check_params_file(str(tmp_path))


def test_the_first_signal_interrupts_start_up_once_later_ones_do_nothing(monkeypatch):
    monkeypatch.setattr(runner, "STOP_SECONDS", 3600.0)  # no forced exit inside the test
    stop = StopRequest()
    with pytest.raises(KeyboardInterrupt):
        stop.handle(2, None)
    assert stop.requested
    stop.handle(15, None)  # SIGTERM after SIGINT: nothing raised
    stop.handle(2, None)
    assert stop.signals == 3


def test_after_start_up_a_signal_never_raises(monkeypatch):
    monkeypatch.setattr(runner, "STOP_SECONDS", 3600.0)
    stop = StopRequest()
    stop.starting = False
    stop.handle(2, None)  # would be inside an rclpy callback: must not raise
    stop.handle(2, None)
    assert stop.requested and stop.signals == 2
