"""`sample_camera`: a stand-in camera for the ovseg node, and a monitor of what comes back.

It publishes frames on ``image`` (plus ``camera_info`` and, with ``--compressed``,
``image/compressed``) from the sample photos of scikit-image, a folder of images, a video file or
a webcam, and listens to the node's ``labels``, ``overlay`` and ``vocabulary`` outputs. Once per
second it prints one line: input and output rates, end-to-end latency (receive time minus the
output's header stamp, which the node copies from the input frame) and the classes in the last
label image. Overlays are saved as PNG files.

This module is the command line (arguments, signals, exit codes); the pieces live in
``ovseg_ros.ros.camera``: ``sources`` (FrameSource), ``messages`` (frame_to_msg and friends),
``monitor`` (Stats, OverlayWriter), ``node`` (SampleCameraNode) and ``environment``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from .camera import PROG
from .camera.environment import configure_environment
from .camera.messages import ENCODINGS
from .camera.node import CameraOptions, SampleCameraNode
from .camera.sources import DEFAULT_SIZE, FrameSource, SourceError, parse_size

try:  # Humble has ExternalShutdownException too; the fallback only guards older releases.
    from rclpy.executors import ExternalShutdownException
except ImportError:  # pragma: no cover
    ExternalShutdownException = KeyboardInterrupt  # type: ignore[misc,assignment]

__all__ = ["StopSignals", "build_parser", "main", "open_source"]


def _size_arg(text: str) -> tuple[int, int] | None:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "A stand-in camera for the ovseg node: publishes frames on 'image' (and "
            "'camera_info', optionally 'image/compressed') and prints, once per second, what "
            "comes back from the node: rates, end-to-end latency and the classes it sees."
        ),
        epilog=(
            "environment:\n"
            "  ROS_AUTOMATIC_DISCOVERY_RANGE  set to LOCALHOST when unset (and ROS_LOCALHOST_ONLY\n"
            "                                 is unset too), so DDS traffic stays on this host;\n"
            "                                 export your own (e.g. SUBNET) on a robot\n"
            "  FASTDDS_DEFAULT_PROFILES_FILE  set to the package's config/fastdds.xml when unset\n"
            "                                 (camera-sized best-effort frames over shared\n"
            "                                 memory); give the node the same profile\n"
            "  ROS arguments go after --ros-args, e.g. --ros-args -r image:=/cam/image\n"
            "\n"
            "example: sample_camera --rate 2 --duration 30 --require-output"
        ),
    )
    src = parser.add_argument_group("source (default: the sample photos of skimage.data)")
    kind = src.add_mutually_exclusive_group()
    kind.add_argument("--folder", metavar="DIR", help="publish the images of DIR, sorted by name")
    kind.add_argument("--video", metavar="FILE", help="publish the frames of a video file")
    kind.add_argument(
        "--webcam", metavar="INDEX", type=_int_at_least(0), help="publish a cv2.VideoCapture device"
    )
    src.add_argument(
        "--once", action="store_true", help="stop at the end of the photos/folder/video (no loop)"
    )
    pub = parser.add_argument_group("publishing")
    pub.add_argument("--rate", type=_positive_float, default=2.0, help="frames per second [2.0]")
    pub.add_argument(
        "--size",
        type=_size_arg,
        default=DEFAULT_SIZE,
        metavar="WxH",
        help="frame size: resize keeping the aspect, then centre-crop; 'native' keeps each "
        "frame's own size [640x480]",
    )
    pub.add_argument("--encoding", choices=ENCODINGS, default="rgb8", help="[rgb8]")
    pub.add_argument(
        "--compressed", action="store_true", help="also publish image/compressed (JPEG)"
    )
    pub.add_argument(
        "--jpeg-quality",
        type=_int_at_least(1),
        default=90,
        metavar="Q",
        help="JPEG quality of image/compressed, 1-100 [90]",
    )
    pub.add_argument(
        "--qos",
        choices=("sensor_data", "reliable"),
        default="sensor_data",
        help="sensor_data: best effort, keep last 1, like camera drivers; reliable [sensor_data]",
    )
    pub.add_argument("--frame-id", default="camera", help="header frame_id [camera]")
    pub.add_argument(
        "--depth",
        action="store_true",
        help="also publish 'depth' (16UC1 millimetres, registered to the image: a floor 1 m "
        "below the camera, which looks 30 degrees down) and 'depth/camera_info', and watch the "
        "node's ~/points (run the node with depth.enabled: true)",
    )
    pub.add_argument(
        "--hfov",
        type=_positive_float,
        default=60.0,
        metavar="DEG",
        help="horizontal field of view of the camera_info pinhole model [60]",
    )
    mon = parser.add_argument_group("monitor")
    mon.add_argument(
        "--node", default="/ovseg", help="the segmentation node whose outputs to watch [/ovseg]"
    )
    mon.add_argument(
        "--out",
        default="out/stream",
        metavar="DIR",
        help="save received overlays here as PNG, plus latest_overlay.png; '' disables "
        "[out/stream]",
    )
    mon.add_argument(
        "--save-every",
        type=_int_at_least(1),
        default=1,
        metavar="N",
        help="keep every N-th overlay (latest_overlay.png is always refreshed) [1]",
    )
    stop = parser.add_argument_group("stopping (default: run until Ctrl-C)")
    stop.add_argument("--duration", type=_positive_float, metavar="S", help="stop after S seconds")
    stop.add_argument(
        "--frames", type=_int_at_least(1), metavar="N", help="stop after N published frames"
    )
    stop.add_argument(
        "--linger",
        type=_non_negative_float,
        default=3.0,
        metavar="S",
        help="after the last frame (--frames, --once), wait up to S seconds for its output [3]",
    )
    stop.add_argument(
        "--require-output",
        action="store_true",
        help="exit 1 when no output came back from the node (for scripted demos)",
    )
    return parser


def open_source(args: argparse.Namespace) -> FrameSource:
    """The FrameSource the arguments ask for (SourceError when it cannot be opened)."""
    loop = not args.once
    if args.folder is not None:
        return FrameSource.folder(args.folder, args.size, loop)
    if args.video is not None:
        return FrameSource.video(args.video, args.size, loop)
    if args.webcam is not None:
        return FrameSource.webcam(args.webcam, args.size)
    return FrameSource.samples(args.size, loop)


def _cleanup(node: Node | None, executor: Any, context: Context) -> None:
    for step in (
        (lambda: executor.shutdown(timeout_sec=1.0)) if executor is not None else None,
        node.destroy_node if node is not None else None,
        context.try_shutdown,
    ):
        if step is None:
            continue
        try:
            step()
        except (Exception, KeyboardInterrupt):  # already shut down by a signal: nothing to do
            pass


class StopSignals:
    """Turns SIGINT / SIGTERM into a flag the spin loop checks (a second SIGINT raises
    KeyboardInterrupt). A signal ignored at start (nohup, background jobs) stays ignored; the
    previous handlers come back on exit. Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        #: False once the loop is left: further signals are only recorded (clean shutdown).
        self.hurry = True
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT and self.hurry:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous = signal.getsignal(sig)
                if previous is signal.SIG_IGN:
                    continue
                signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread
                continue
            self._previous[sig] = previous
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, previous in self._previous.items():
            try:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            except (ValueError, OSError):
                pass
        self._previous.clear()


def _init_rclpy(args: list[str], context: Context) -> None:
    """rclpy.init without rclpy's own signal handlers (StopSignals stops the loop instead)."""
    try:
        from rclpy.signals import SignalHandlerOptions

        rclpy.init(args=args, context=context, signal_handler_options=SignalHandlerOptions.NO)
    except (ImportError, TypeError):  # pragma: no cover - releases without the option
        rclpy.init(args=args, context=context)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sample camera; 0 on success, 1 with --require-output and no output, 2 on errors."""
    from rclpy.utilities import remove_ros_args

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(remove_ros_args(args=argv))

    def say(text: str) -> None:
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)

    if args.encoding.startswith("yuv") and not hasattr(cv2, "COLOR_RGB2YUV_UYVY"):
        say(f"error: encoding {args.encoding} needs OpenCV 4.7 or newer")
        return 2
    for note in configure_environment():
        say(note)
    try:
        source = open_source(args)
    except SourceError as exc:
        say(f"error: {exc}")
        return 2
    options = CameraOptions(
        rate=args.rate,
        encoding=args.encoding,
        compressed=args.compressed,
        jpeg_quality=args.jpeg_quality,
        qos=args.qos,
        frame_id=args.frame_id,
        hfov_deg=args.hfov,
        monitor_node=args.node,
        out_dir=args.out,
        save_every=args.save_every,
        max_frames=args.frames or 0,
        duration=args.duration or 0.0,
        linger=args.linger,
        depth=args.depth,
    )
    with StopSignals() as stop:
        return _run(args, [PROG, *argv], source, options, stop, say)


def _run(
    args: argparse.Namespace,
    ros_argv: list[str],
    source: FrameSource,
    options: CameraOptions,
    stop: StopSignals,
    say: Callable[[str], None],
) -> int:
    """main() once the source is open: init rclpy, spin until done, clean up, summarise."""
    context = Context()
    node: SampleCameraNode | None = None
    executor = None
    interrupted = None
    try:
        _init_rclpy(ros_argv, context)
        try:
            node = SampleCameraNode(source, options, context=context)
        except SourceError as exc:  # the output folder
            say(f"error: {exc}")
            return 2
        say(
            f"publishing {source.describe()} on {node.image_pub.topic_name} at "
            f"{options.rate:g} Hz ({options.encoding}, {options.qos}); watching "
            f"{node.labels_topic}" + (f"; overlays -> {options.out_dir}" if options.out_dir else "")
        )
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        while not node.finished and stop.received is None and context.ok():
            executor.spin_once(timeout_sec=0.1)
        interrupted = stop.received
    except KeyboardInterrupt:
        interrupted = "SIGINT"
    except ExternalShutdownException:
        interrupted = "shutdown"
    finally:
        stop.hurry = False  # from here on a signal is only recorded: the shutdown stays clean
        try:
            source.close()
            _cleanup(node, executor, context)
        except KeyboardInterrupt:  # the signal came just before `hurry` was cleared
            pass
    if node is None:
        return 0 if interrupted else 2
    if interrupted or not node.finished:
        reason = f"interrupted by {interrupted}" if interrupted else "context shut down"
    else:
        reason = node.finish_reason
    say(f"stopped ({reason}): {node.stats.summary()}")
    if node.error is not None:
        say(f"error: {node.error}")
        return 2
    if args.require_output and node.stats.outputs == 0:
        say(f"error: no output arrived on {node.labels_topic} (is the node running?)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
