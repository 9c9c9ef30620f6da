"""`ovseg_node`: start the node, spin it, and stop it cleanly on any sequence of signals.

`ros2 launch` stops a node with SIGINT, then SIGTERM after 5 s, then SIGKILL. The rules here:

* a stop signal never raises inside the running node: the handler only records the request and the
  main loop, which spins with a short timeout, notices it within 0.1 s; a second or third signal
  changes nothing (no KeyboardInterrupt in an rclpy callback or message conversion, where it would
  turn into a RuntimeError or an abort);
* during start-up (model loading, the first vocabulary) the first signal interrupts it at once, and
  a vocabulary being encoded in the background is cancelled at its next batch of prompts;
* the worker finishes the frame in hand, the node and the context shut down, and the process exits
  0 through os._exit, without interpreter teardown: teardown with a thread still in native code
  aborted ("terminate called without an active exception"), and during teardown the signal
  handlers are the defaults again, so a SIGTERM then killed the process. If a thread is still
  inside torch after `STOP_SECONDS` (a frame at a huge size, a model load), the process exits
  anyway before the 5 s SIGTERM of launch. Either way: exit code 0, one log line, no traceback.

A missing or malformed parameter file, or any argument rclpy cannot start with, is one sentence and
exit code 2.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: Seconds from the first stop signal to the forced exit (launch escalates to SIGTERM after 5).
STOP_SECONDS = 4.0
#: Seconds the threads get to finish the frame in hand and the text batch in hand.
JOIN_SECONDS = 3.0

EXIT_OK = 0
EXIT_BAD_ARGUMENTS = 2


class StopRequest:
    """What SIGINT / SIGTERM do: remember the request, start the exit deadline, raise only once."""

    def __init__(self) -> None:
        """Nothing requested yet; `starting` True makes the first signal interrupt start-up."""
        self.event = threading.Event()
        self.starting = True
        self.signals = 0
        self._watchdog: threading.Thread | None = None

    def install(self) -> None:
        """Handle SIGINT and SIGTERM in this (main) thread."""
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.event.is_set()

    def handle(self, signum: int, frame: Any) -> None:
        """The signal handler (also callable directly in tests)."""
        self.signals += 1
        if self.event.is_set():
            return  # a second or third signal: the stop is under way, with its deadline
        self.event.set()
        self._watchdog = threading.Thread(target=self._deadline, name="ovseg-stop", daemon=True)
        self._watchdog.start()
        if self.starting:
            # Start-up runs in this thread (model loading, text encoding): leave it now.
            raise KeyboardInterrupt

    def _deadline(self) -> None:
        time.sleep(STOP_SECONDS)
        _hard_exit(EXIT_OK, f"still stopping after {STOP_SECONDS:.0f} s; exiting now")


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()


def _hard_exit(code: int, why: str = "") -> None:
    """Leave without interpreter teardown (threads may still be inside native code)."""
    if why:
        try:
            sys.stderr.write(f"[ovseg_node] {why}\n")
        except (OSError, ValueError):
            pass
    _flush()
    os._exit(code)


def params_files(args: list[str]) -> list[str]:
    """The files named by --params-file in ROS arguments (both `--params-file F` spellings)."""
    files = []
    for i, arg in enumerate(args):
        if arg == "--params-file" and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--params-file="):
            files.append(arg.split("=", 1)[1])
    return files


def check_params_file(path: str) -> str:
    """'' when `path` is a readable YAML mapping, else one sentence saying what is wrong."""
    import yaml

    file = Path(path)
    if not file.exists():
        return f"parameter file {path!r} does not exist"
    if file.is_dir():
        return f"parameter file {path!r} is a directory, not a YAML file"
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read parameter file {path!r}: {exc.__class__.__name__}: {exc}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        return f"parameter file {path!r} is not valid YAML{where}: {problem}"
    if not isinstance(data, dict):
        return (
            f"parameter file {path!r} holds no mapping; it needs `<node name or /**>: "
            "ros__parameters: {...}` (see the package's config/ovseg.yaml)"
        )
    for name, section in data.items():
        if not _holds_parameters(section):
            return (
                f"parameter file {path!r}: the entry {str(name)[:60]!r} has no ros__parameters "
                "mapping (see the package's config/ovseg.yaml)"
            )
    return ""


def _holds_parameters(section: object, depth: int = 0) -> bool:
    """Whether a node entry (or a namespace of them, as rcl allows) has ros__parameters."""
    if not isinstance(section, dict) or depth > 16:
        return False
    if "ros__parameters" in section:
        return isinstance(section["ros__parameters"], dict)
    return bool(section) and all(_holds_parameters(v, depth + 1) for v in section.values())


def _threads_alive() -> bool:
    """Whether a thread other than this one and the stop watchdog is still running."""
    me = threading.current_thread()
    return any(
        t is not me and t.name != "ovseg-stop" and t.is_alive() for t in threading.enumerate()
    )


def main(args: list[str] | None = None) -> None:
    """Console script `ovseg_node`: run() and leave with its exit code, skipping teardown.

    Interpreter teardown resets the signal handlers to their defaults and takes a while (torch,
    rclpy); a SIGTERM from launch landing then would kill the process with -15. So the process
    leaves through os._exit once everything is shut down and the output flushed.
    """
    _hard_exit(run(args))


def main_lifecycle(args: list[str] | None = None) -> None:
    """Console script `ovseg_lifecycle_node`: the managed node (lifecycle.py), same exit rules."""
    _hard_exit(run(args, managed=True))


def run(args: list[str] | None = None, managed: bool = False) -> int:
    """Run the node until a stop signal; the exit code (non-zero if it cannot start).

    Exit codes: 0 stopped (also when stopped during start-up), 2 bad arguments or parameters,
    3 model could not be loaded. `managed`: the lifecycle node, which also ends when it reaches
    the finalized state (the shutdown transition); with lifecycle.autostart it configures and
    activates itself first (a failure then exits as the plain node's start-up does).
    """
    stop = StopRequest()
    stop.install()  # first: a signal during the imports below must not print a traceback
    argv = list(sys.argv if args is None else args)
    code = EXIT_OK
    node = None
    try:
        import rclpy
        from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions

        from .node import OvsegNode, StartupError

        logger = rclpy.logging.get_logger("ovseg")
        for path in params_files(argv):
            problem = check_params_file(path)
            if problem:
                logger.fatal(problem)
                return EXIT_BAD_ARGUMENTS
        try:
            rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        except Exception as exc:  # noqa: BLE001 - rcl's argument and file errors come as many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.fatal(f"cannot start with these ROS arguments: {first[:300]}")
            return EXIT_BAD_ARGUMENTS
        try:
            if managed:
                node = _start_managed(lambda: stop.requested)
            else:
                node = OvsegNode(cancel=lambda: stop.requested)
        except StartupError as exc:
            logger.fatal(str(exc))
            code = exc.exit_code
        stop.starting = False
    except BaseException:  # noqa: BLE001 - a stop signal during start-up, wherever it landed
        if not stop.requested:
            raise
        sys.stderr.write("[ovseg_node] stopped during start-up\n")
        node = None
        try:
            import rclpy

            rclpy.try_shutdown()
        except BaseException:  # noqa: BLE001 - best effort on the way out
            pass
        _hard_exit(EXIT_OK)
    if node is not None:
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            while not stop.requested and rclpy.ok():
                executor.spin_once(timeout_sec=0.1)
                if managed and node.state == "finalized":
                    break
        except ExternalShutdownException:
            pass
        node.get_logger().info("shutting down")
        stopped = node.shutdown(JOIN_SECONDS)
        if stopped:
            node.destroy_node()
        executor.shutdown(timeout_sec=0.5)
    rclpy.try_shutdown()
    if _threads_alive():
        sys.stderr.write("[ovseg_node] a worker thread did not stop in time; not waiting for it\n")
    return code


def _start_managed(cancel: Any) -> Any:
    """The lifecycle node; configured and activated here when lifecycle.autostart is true."""
    from .lifecycle import SUCCESS, OvsegLifecycleNode
    from .node_params import StartupError

    node = OvsegLifecycleNode(cancel=cancel)
    if not node.lifecycle_options().autostart:
        node.get_logger().info(
            "unconfigured; waiting for a lifecycle manager (or `ros2 lifecycle set "
            f"{node.get_fully_qualified_name()} configure`, then activate)"
        )
        return node
    for transition in (node.trigger_configure, node.trigger_activate):
        if transition() != SUCCESS:
            why, code = node.last_error or "see the log above", node.last_exit_code
            node.trigger_shutdown()
            node.destroy_node()
            if why == "stopped while loading":
                raise KeyboardInterrupt  # a stop signal: leave as during the plain start-up
            raise StartupError(f"lifecycle autostart failed: {why}", code or EXIT_BAD_ARGUMENTS)
    return node


if __name__ == "__main__":
    main()
