"""Tests of the sample camera's command line: help, exit codes, bad sources, and Ctrl-C / SIGTERM
stopping a running camera cleanly."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest
from camerautil import solid, write_png
from rosutil import REPO, child_process, next_domain_id, ros_env

from ovseg_ros.ros import sample_camera as sc


def test_help_mentions_discovery(capsys):
    with pytest.raises(SystemExit) as exc:
        sc.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "ROS_AUTOMATIC_DISCOVERY_RANGE" in text and "LOCALHOST" in text
    for flag in ("--folder", "--video", "--webcam", "--once", "--rate", "--size", "--encoding"):
        assert flag in text


def test_main_rejects_bad_sources(tmp_path, capsys):
    assert sc.main(["--folder", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "error: folder" in err and "does not exist" in err
    assert sc.main(["--video", str(tmp_path / "nope.avi")]) == 2
    assert "error: video" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        sc.main(["--size", "big"])
    assert exc.value.code == 2


def test_main_exit_codes_without_a_node(monkeypatch, tmp_path, capsys):
    write_png(tmp_path / "a.png", solid(24, 32, (10, 20, 30)))
    monkeypatch.setenv("ROS_DOMAIN_ID", str(next_domain_id()))
    base = ["--folder", str(tmp_path), "--rate", "20", "--frames", "3", "--linger", "0.2"]
    assert sc.main([*base, "--out", "", "--require-output"]) == 1
    err = capsys.readouterr().err
    assert "published 3 frames, received 0 outputs" in err
    assert "no output arrived on /ovseg/labels" in err
    assert sc.main([*base, "--out", str(tmp_path / "stream"), "--once"]) == 0
    assert "stopped (" in capsys.readouterr().err
    assert (tmp_path / "stream").is_dir()


def read_until(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Read the child's output until ``text`` shows up (or timeout / end of output)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while text not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
    return seen


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_cleanly(tmp_path, how):
    import signal

    write_png(tmp_path / "a.png", solid(24, 32, (10, 20, 30)))
    cmd = [sys.executable, "-m", "ovseg_ros.ros.sample_camera", "--folder", str(tmp_path)]
    cmd += ["--size", "32x24", "--rate", "10", "--out", ""]
    env = ros_env(next_domain_id())
    with child_process(cmd, env, cwd=REPO) as proc:
        seen = read_until(proc, "waiting for /ovseg/labels", timeout=20.0)
        assert "waiting for /ovseg/labels" in seen, seen
        os.killpg(proc.pid, getattr(signal, how))
        out, _ = proc.communicate(timeout=15)
    text = seen + out
    assert proc.returncode == 0, text
    assert f"stopped (interrupted by {how})" in text and "published" in text
    assert "Traceback" not in text
