"""`ovseg demo` (what `make run` starts): the node and the sample camera as real processes."""

import subprocess

import pytest
from rosutil import next_domain_id, python_executable, ros_env

pytestmark = pytest.mark.ros


def _demo(tmp_path, *extra: str, duration: float = 12) -> subprocess.CompletedProcess:
    cmd = python_executable("ovseg") + [
        "demo",
        "--model",
        "ovseg-tiny",
        "--duration",
        str(duration),
        "--rate",
        "4",
        "--out",
        str(tmp_path / "stream"),
        "--domain-id",
        str(next_domain_id()),
        *extra,
    ]
    env = ros_env(0)
    env.pop("ROS_DOMAIN_ID")  # the demo sets its own from --domain-id
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def test_demo_runs_the_node_on_the_sample_stream(tmp_path):
    run = _demo(tmp_path, "--pretrained", "none")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "in 4.0 fps | out" in out or "| out " in out
    assert "vocab v1" in out
    saved = sorted((tmp_path / "stream").glob("overlay_*.png"))
    assert saved and (tmp_path / "stream" / "latest_overlay.png").is_file()
    assert "Traceback" not in out


def test_demo_falls_back_to_random_weights_when_the_weights_cannot_load(tmp_path):
    # ovseg-tiny has no pretrained tag 'openai': the node exits with its model-load code (3) and
    # the demo starts it again with random weights, saying so loudly.
    run = _demo(tmp_path, "--pretrained", "openai", "--fallback-random", duration=25)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "RANDOM" in out and "MEANINGLESS" in out
    assert sorted((tmp_path / "stream").glob("overlay_*.png"))


def test_demo_without_fallback_reports_the_load_failure(tmp_path):
    run = _demo(tmp_path, "--pretrained", "openai")
    out = run.stdout + run.stderr
    assert run.returncode == 3, out[-3000:]
    assert "the node stopped (exit code 3)" in out
