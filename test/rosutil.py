"""Helpers for tests that start ROS: discovery on this host only, a domain id per test, waiting
for conditions instead of sleeping, and processes that are always stopped.

Importing this module sets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and the project's Fast DDS
profile (config/fastdds.xml) in os.environ, before any rclpy context exists, so every in-process
participant and every child process started with ros_env() stays on the loopback interface and can
exchange camera-sized best-effort frames.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FASTDDS_PROFILE = REPO / "config" / "fastdds.xml"
PARAMS_FILE = REPO / "config" / "ovseg.yaml"

_LOCAL = {
    "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
    "FASTDDS_DEFAULT_PROFILES_FILE": str(FASTDDS_PROFILE),
    "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
}
os.environ.update(_LOCAL)
os.environ.pop("ROS_LOCALHOST_ONLY", None)  # deprecated on Kilted; the range above replaces it

# Domain ids 1..200 (ports stay valid); start from the pid so parallel pytest runs on one machine
# rarely share a domain, then give every test its own.
_domains = itertools.count((os.getpid() * 7) % 160)


def next_domain_id() -> int:
    """A fresh ROS_DOMAIN_ID for one test."""
    return 1 + next(_domains) % 200


def ros_env(domain_id: int, **extra: str) -> dict[str, str]:
    """Environment for a child process: this host only, the given domain, the Fast DDS profile."""
    env = dict(os.environ)
    env.update(_LOCAL)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@contextmanager
def ros_context(domain_id: int | None = None) -> Iterator[object]:
    """An rclpy context of its own (own domain id), shut down on exit."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, domain_id=next_domain_id() if domain_id is None else domain_id)
    try:
        yield context
    finally:
        context.try_shutdown()


def spin_until(executor, predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Spin the executor until predicate() is true; False if timeout seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        executor.spin_once(timeout_sec=step)
    return bool(predicate())


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll predicate() (something another thread makes true) until it holds or timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def python_executable(name: str) -> list[str]:
    """Command that runs a console script of this package from the interpreter running the tests."""
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    raise FileNotFoundError(f"console script {name!r} not installed next to {sys.executable}")


@contextmanager
def child_process(cmd: list[str], env: dict[str, str], **kwargs) -> Iterator[subprocess.Popen]:
    """Start a process (own process group) and always stop it: SIGINT, then SIGKILL."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGINT the process group, wait, escalate to SIGKILL; return the exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode
