"""Issue 10, as a process: stop signals, parameter files, peak memory and churn of `ovseg_node`.

`ros2 launch` stops a node with SIGINT, then SIGTERM after 5 s; a user presses Ctrl-C twice. Every
sequence must end the process with code 0 within 5 s of the first signal and print no traceback,
even while a 10,000-class vocabulary is being encoded. Each test starts the real console script in
its own process group and domain (rosutil), streams like a camera, and always stops what it started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter
from rosutil import child_process, next_domain_id, python_executable, ros_env
from sensor_msgs.msg import Image
from test_node_process import (
    RELIABLE,
    CameraStream,
    Inbox,
    NodeProcess,
    node_command,
    ovseg_process,
    ros_client,
    sample,
    wait,
)

pytestmark = pytest.mark.ros

STOP_LIMIT = 5.0  # seconds from the first signal to the exit, as ros2 launch allows
BAD_SIGNS = ("Traceback", "terminate called", "InvalidHandle", "Aborted", "core dumped")


def big_vocabulary_file(tmp_path: Path, classes: int, templates: str = "imagenet80") -> Path:
    """A parameter file with `classes` class names (too long for the command line)."""
    path = tmp_path / "big.yaml"
    params = {"vocabulary": [f"class number {i}" for i in range(classes)], "templates": templates}
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    return path


def signal_and_time(node: NodeProcess, signals: list[int], gap: float = 0.2) -> tuple[int, float]:
    """Send the signals `gap` s apart; the exit code and seconds from the first to the exit."""
    start = time.monotonic()
    for i, sig in enumerate(signals):
        if node.proc.poll() is not None:
            break
        os.killpg(node.proc.pid, sig)
        if i + 1 < len(signals):
            time.sleep(gap)
    try:
        code = node.proc.wait(15)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - start


def assert_clean(output: str) -> None:
    for sign in BAD_SIGNS:
        assert sign not in output, f"{sign!r} in the node's output:\n{output[-3000:]}"


def set_parameters(node, executor, *params: Parameter) -> list:
    client = node.create_client(SetParameters, "/ovseg/set_parameters")
    assert client.wait_for_service(timeout_sec=30)
    future = client.call_async(
        SetParameters.Request(parameters=[p.to_parameter_msg() for p in params])
    )
    wait(executor, future.done, 30, "set_parameters")
    return future.result().results


# --- item 2: stop signals ---------------------------------------------------------------------


SEQUENCES = {
    "SIGINT": [signal.SIGINT],
    "SIGTERM": [signal.SIGTERM],
    "double Ctrl-C": [signal.SIGINT, signal.SIGINT],
    "SIGINT then SIGTERM": [signal.SIGINT, signal.SIGTERM],
    "three in a row": [signal.SIGINT, signal.SIGINT, signal.SIGTERM],
}


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_any_signal_sequence_during_inference_exits_0_quickly(name):
    domain = next_domain_id()
    with (
        ovseg_process(domain, "input.short_side:=224") as ovseg,
        ros_client(domain) as (
            node,
            executor,
        ),
    ):
        labels = Inbox(node, Image, "/ovseg/labels", RELIABLE, keep=False)
        camera = CameraStream(node, sample("astronaut", 640, 480), RELIABLE, rate_hz=30.0)
        wait(executor, lambda: labels.count >= 3, 60, "labels", ovseg)
        code, took = signal_and_time(ovseg, SEQUENCES[name], gap=0.05)
        camera.stop()
        output = ovseg.finish()
    assert code == 0, output[-3000:]
    assert took < STOP_LIMIT, f"{took:.1f} s"
    assert_clean(output)


@pytest.mark.parametrize("name", ["SIGINT", "SIGINT then SIGTERM"])
def test_stop_during_a_10000_class_vocabulary_build_cancels_it(name):
    domain = next_domain_id()
    with ovseg_process(domain) as ovseg, ros_client(domain) as (node, executor):
        results = set_parameters(
            node,
            executor,
            Parameter("templates", value="imagenet80"),
            Parameter("vocabulary", value=[f"class number {i}" for i in range(10_000)]),
        )
        assert all(r.successful for r in results), [r.reason for r in results]
        wait(
            executor,
            lambda: "encoding a vocabulary of 10000 classes" in ovseg.output(),
            30,
            "the build to start",
            ovseg,
        )
        time.sleep(1.0)
        code, took = signal_and_time(ovseg, SEQUENCES[name], gap=1.0)
        output = ovseg.finish()
    assert code == 0, output[-3000:]
    assert took < STOP_LIMIT, f"{took:.1f} s"
    assert_clean(output)
    finished = [ln for ln in output.splitlines() if "in use" in ln and "10000 classes" in ln]
    assert not finished  # cancelled, not finished


def test_stop_during_start_up_encoding_exits_0(tmp_path):
    domain = next_domain_id()
    params = big_vocabulary_file(tmp_path, 10_000)
    cmd = node_command() + ["--params-file", str(params)]
    with child_process(cmd, ros_env(domain)) as proc:
        ovseg = NodeProcess(proc)
        deadline = time.monotonic() + 60
        while "encoding text prompts" not in ovseg.output() and time.monotonic() < deadline:
            assert proc.poll() is None, ovseg.output()
            time.sleep(0.1)
        code, took = signal_and_time(ovseg, [signal.SIGINT, signal.SIGINT], gap=0.3)
        output = ovseg.finish()
    assert code == 0, output[-3000:]
    assert took < STOP_LIMIT, f"{took:.1f} s"
    assert_clean(output)


# --- item 3: parameter files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "does not exist"),
        ("vocabulary: [door\n  - : :", "not valid YAML"),
        ("- just\n- a list\n", "holds no mapping"),
        ("ovseg:\n  vocabulary: [door]\n", "no ros__parameters"),
    ],
)
def test_a_bad_parameter_file_is_one_sentence_and_exit_2(tmp_path, content, says):
    path = tmp_path / "params.yaml"
    if content is not None:
        path.write_text(content)
    cmd = python_executable("ovseg_node") + ["--ros-args", "--params-file", str(path)]
    result = subprocess.run(
        cmd, env=ros_env(next_domain_id()), capture_output=True, text=True, timeout=60
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert says in output and str(path) in output
    assert len(output.splitlines()) == 1, output
    assert_clean(output)


def test_unknown_parameters_are_named_with_a_guess():
    domain = next_domain_id()
    with ovseg_process(domain, "vocabluary:=[door]", "input.shortside:=224") as ovseg:
        deadline = time.monotonic() + 60
        while "segmenting" not in ovseg.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        output = ovseg.output()
    assert "unknown parameter 'vocabluary'" in output and "did you mean 'vocabulary'" in output
    assert "did you mean 'input.short_side'" in output


# --- item 1: vocabulary churn ------------------------------------------------------------------


def test_alternating_300_and_3_classes_while_streaming_does_not_crash():
    """Mask topics come and go by the hundred while frames stream and masks are subscribed."""
    domain = next_domain_id()
    with (
        ovseg_process(domain, "input.short_side:=112") as ovseg,
        ros_client(domain) as (
            node,
            executor,
        ),
    ):
        labels = Inbox(node, Image, "/ovseg/labels", RELIABLE, keep=False)
        masks = [
            Inbox(node, Image, f"/ovseg/masks/class_{i}", RELIABLE, keep=False) for i in (0, 1)
        ]
        camera = CameraStream(node, sample("coffee", 320, 240), RELIABLE, rate_hz=20.0)
        wait(executor, lambda: labels.count >= 2, 60, "labels", ovseg)
        big = [f"class {i}" for i in range(300)]
        small = ["class 0", "class 1", "door"]
        for i in range(10):
            results = set_parameters(
                node, executor, Parameter("vocabulary", value=big if i % 2 == 0 else small)
            )
            assert results[0].successful
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                executor.spin_once(timeout_sec=0.02)
            assert ovseg.proc.poll() is None, ovseg.output()[-3000:]
        count = labels.count
        wait(executor, lambda: labels.count >= count + 5, 60, "labels after the churn", ovseg)
        assert all(m.count > 0 for m in masks)
        camera.stop()
        code = ovseg.stop()
        output = ovseg.output()
    assert code == 0
    assert_clean(output)


# --- item 4: memory ---------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024


def test_peak_memory_with_10000_classes_on_a_640x480_frame(tmp_path):
    """Class probabilities at full size would be 10,000 x 640 x 480 floats (12 GB).

    OVSEG_MEMORY_MODEL=ViT-B-16 measures the real architecture (about 4 minutes on 2 cores; the
    figure is printed, run pytest with -s to see it).
    """
    domain = next_domain_id()
    model = os.environ.get("OVSEG_MEMORY_MODEL", "ovseg-tiny")
    params = big_vocabulary_file(tmp_path, 10_000, templates="single")
    cmd = node_command(f"model.name:={model}") + [
        "--params-file",
        str(params),
        "-p",
        "background_words:=[sky]",
    ]
    with child_process(cmd, ros_env(domain)) as proc, ros_client(domain) as (node, executor):
        ovseg = NodeProcess(proc)
        labels = Inbox(node, Image, "/ovseg/labels", RELIABLE)
        camera = CameraStream(node, sample("astronaut", 640, 480), RELIABLE, rate_hz=2.0)
        wait(executor, lambda: labels.count >= 1, 600, "a labelled 640x480 frame", ovseg)
        peak = peak_rss_mb(proc.pid)
        camera.stop()
        out = labels.last
    print(f"\n{model}, 10,000 classes, 640x480: peak RSS of ovseg_node {peak:.0f} MB")
    assert (out.width, out.height, out.encoding) == (640, 480, "mono16")
    # Without chunking it would be 12 GB. Measured (BENCHMARKS.md): ovseg-tiny 1575 MB, ViT-B/16
    # 2171 MB with PEARL (the default; NACLIP 1.8 GB): the bounds leave ~20% for noise.
    limit = 2048 if model == "ovseg-tiny" else 2600
    assert peak < limit, f"peak RSS {peak:.0f} MB"


def test_an_unknown_method_fails_before_the_model_is_loaded():
    cmd = node_command("method:=bogus")
    start = time.monotonic()
    result = subprocess.run(
        cmd, env=ros_env(next_domain_id()), capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "unknown method 'bogus'" in output and "naclip" in output
    assert "loading" not in output  # refused from the parameters alone, no model built
    assert time.monotonic() - start < 30
    assert_clean(output)
