"""`ovseg demo`: the node and a sample camera together, on this host, without a ROS distribution.

What `make run` starts: `ovseg_node` with config/ovseg.yaml and `sample_camera` streaming the sample
photos of scikit-image (or a folder, video or webcam) into it; the camera prints one line per second
(input fps, output fps, latency, classes seen) and writes the node's overlays to a folder.

Both processes get ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST (nothing leaves this machine), a
ROS_DOMAIN_ID of their own unless one is exported, and the shipped Fast DDS profile
(config/fastdds.xml) so 640x480 best-effort frames are not lost. When the pretrained weights cannot
be loaded (offline, nothing cached) and --fallback-random is given, the node is started again with
random weights and a loud warning, so the pipeline can still be seen working.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PACKAGE = "ovseg_ros"


def share_dir() -> Path:
    """Where config/ lives: the ROS share folder, the venv's share folder, or the source tree."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)))
    except Exception:  # noqa: BLE001 - not in a ROS workspace (no ament_index, or not indexed)
        pass
    candidates.append(Path(sys.prefix) / "share" / PACKAGE)
    candidates.append(Path(__file__).resolve().parents[2])  # editable install / source tree
    for path in candidates:
        if (path / "config" / "ovseg.yaml").is_file():
            return path
    raise FileNotFoundError(
        "config/ovseg.yaml not found in " + ", ".join(str(p) for p in candidates)
    )


def demo_env(domain_id: int | None, share: Path) -> dict[str, str]:
    """Environment for both processes: this host only, one domain, the large-frame profile."""
    env = dict(os.environ)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    elif "ROS_DOMAIN_ID" not in env:
        env["ROS_DOMAIN_ID"] = str(100 + os.getpid() % 100)
    env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(share / "config" / "fastdds.xml"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _executable(name: str) -> list[str]:
    """A console script of this package: next to the interpreter, else on PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return [str(local)]
    found = shutil.which(name)
    if found:
        return [found]
    module = {"ovseg_node": "node", "sample_camera": "sample_camera"}[name]
    return [sys.executable, "-m", f"ovseg_ros.ros.{module}"]


def node_command(args: argparse.Namespace, share: Path, pretrained: str) -> list[str]:
    """The ovseg_node command line for the demo's settings."""
    cmd = _executable("ovseg_node") + ["--ros-args", "--params-file", str(args.params_file or "")]
    if not args.params_file:
        cmd[-1] = str(share / "config" / "ovseg.yaml")
    overrides = {"model.pretrained": pretrained}
    if args.model:
        overrides["model.name"] = args.model
    if args.method:
        overrides["method"] = args.method
    if args.device:
        overrides["device"] = args.device
    for key, value in overrides.items():
        cmd += ["-p", f"{key}:={value}"]
    if args.depth:
        cmd += ["-p", "depth.enabled:=true"]
    if args.vocabulary:
        quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in args.vocabulary)
        cmd += ["-p", f"vocabulary:=[{quoted}]"]
    return cmd


def camera_command(args: argparse.Namespace) -> list[str]:
    """The sample_camera command line (publisher + live monitor)."""
    cmd = _executable("sample_camera") + ["--rate", str(args.rate), "--out", args.out]
    if args.duration:
        cmd += ["--duration", str(args.duration)]
    if args.source:
        kind, _, value = args.source.partition(":")
        cmd += [f"--{kind}", value]
    if args.depth:
        cmd += ["--depth"]
    cmd += ["--require-output"]
    return cmd


def _stop(proc: subprocess.Popen | None, timeout: float = 20.0) -> int | None:
    """SIGINT, wait, then SIGKILL; the exit code (None if it was never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="ovseg demo", description=__doc__)
    parser.add_argument(
        "--duration", type=float, default=0.0, help="stop after S seconds [0 = Ctrl-C]"
    )
    parser.add_argument("--rate", type=float, default=2.0, help="camera frames per second [2]")
    parser.add_argument("--out", default="out/stream", help="folder for the overlays [out/stream]")
    parser.add_argument(
        "--source",
        help="folder:DIR, video:FILE or webcam:INDEX instead of the scikit-image sample photos",
    )
    parser.add_argument("--model", help="model.name (default: the params file's)")
    parser.add_argument("--pretrained", default="openai", help="model.pretrained [openai]")
    parser.add_argument("--method", help="method (default: the params file's)")
    parser.add_argument("--device", help="device (default: the params file's)")
    parser.add_argument("--vocabulary", nargs="+", help="class names (default: the params file's)")
    parser.add_argument("--params-file", help="node parameters [config/ovseg.yaml]")
    parser.add_argument(
        "--depth",
        action="store_true",
        help="the camera also publishes a synthetic registered depth (a floor plane) and the "
        "node publishes ~/points (depth.enabled)",
    )
    parser.add_argument("--domain-id", type=int, help="ROS_DOMAIN_ID for both processes")
    parser.add_argument(
        "--fallback-random",
        action="store_true",
        help="if the pretrained weights cannot be loaded, run with random weights (meaningless "
        "labels) so the pipeline can still be seen working",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Start node and camera, wait for the camera to finish (or Ctrl-C), stop both."""
    from .node import EXIT_MODEL_LOAD

    share = share_dir()
    env = demo_env(args.domain_id, share)
    print(
        f"ovseg demo: ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}, discovery on this host only, "
        f"Fast DDS profile {env['FASTDDS_DEFAULT_PROFILES_FILE']}",
        flush=True,
    )
    node = camera = None
    pretrained = args.pretrained
    try:
        node = subprocess.Popen(node_command(args, share, pretrained), env=env)
        camera = subprocess.Popen(camera_command(args), env=env)
        while camera.poll() is None:
            code = node.poll()
            if code is None:
                time.sleep(0.2)
                continue
            if code == EXIT_MODEL_LOAD and args.fallback_random and pretrained != "none":
                pretrained = "none"
                print(
                    "\n" + "!" * 78 + "\n! The pretrained weights could not be loaded (see "
                    "above). Continuing with RANDOM\n! weights so the pipeline can be seen "
                    "working: the labels are MEANINGLESS.\n" + "!" * 78 + "\n",
                    flush=True,
                )
                node = subprocess.Popen(node_command(args, share, pretrained), env=env)
                continue
            print(f"ovseg demo: the node stopped (exit code {code})", file=sys.stderr, flush=True)
            return code or 1
        return camera.returncode
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(camera)
        code = _stop(node)
        if code not in (None, 0, -signal.SIGINT):
            print(f"ovseg demo: the node exited with code {code}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
