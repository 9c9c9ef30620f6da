"""`set_vocabulary`: set the node's vocabulary through its parameter service, print the answer.

    ros2 run ovseg_ros set_vocabulary door chair "red mug; coffee mug"

It calls `<node>/set_parameters` (the service every ROS 2 node has) with the new `vocabulary`
(and optionally `background_words` / `templates`), then waits until the node publishes the class map
of the new vocabulary on `<node>/vocabulary` and prints it with its version. A rejected change
prints the node's reason. Exit codes: 0 accepted and in use, 1 rejected, 2 node not found,
3 accepted but the new class map did not arrive within --timeout.

It respects the ROS environment of the shell (ROS_DOMAIN_ID, ROS_AUTOMATIC_DISCOVERY_RANGE) like
`ros2 param set` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

EXIT_ACCEPTED = 0
EXIT_REJECTED = 1
EXIT_NO_NODE = 2
EXIT_NOT_APPLIED = 3


def class_name(entry: str) -> str:
    """The display name of a vocabulary entry (its first synonym, whitespace collapsed)."""
    return " ".join(entry.split(";")[0].split())


def matches(class_map: dict[str, Any], entries: list[str]) -> bool:
    """Whether a published class map holds exactly the requested classes, in order."""
    names = [str(c.get("name", "")).casefold() for c in class_map.get("classes", [])]
    return names == [class_name(e).casefold() for e in entries]


def format_class_map(class_map: dict[str, Any]) -> str:
    """Human-readable class map: version and stamp, then one line per class (synonyms, mask)."""
    head = f"vocabulary v{class_map.get('version')} (unlabeled = {class_map.get('unlabeled')})"
    stamp = class_map.get("stamp")
    if isinstance(stamp, dict):
        head += (
            f", for label images stamped from {stamp.get('sec', 0)}."
            f"{int(stamp.get('nanosec', 0)):09d} s on"
        )
    lines = [head + ":"]
    for c in class_map.get("classes", []):
        synonyms = [s for s in c.get("synonyms", []) if s != c.get("name")]
        extra = f"  (also: {', '.join(synonyms)})" if synonyms else ""
        mask = f"  [masks/{c['mask']}]" if c.get("mask") else ""
        lines.append(f"  {c.get('id'):>3}  {c.get('name')}{extra}{mask}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="set_vocabulary",
        description="Set the vocabulary of a running ovseg node and print its answer.",
        epilog="Entries may hold synonyms separated by ';', e.g. \"red mug; coffee mug\".",
    )
    parser.add_argument("classes", nargs="+", help="class names, in id order")
    parser.add_argument("--node", default="/ovseg", help="the node's full name (default /ovseg)")
    parser.add_argument(
        "--background",
        nargs="*",
        default=None,
        metavar="WORD",
        help="also set background_words (give the flag with no words for none)",
    )
    parser.add_argument(
        "--templates", choices=("imagenet80", "seven", "single"), help="also set templates"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the node and for the new class map (default 120: text "
        "encoding of a large vocabulary on a CPU takes a while)",
    )
    parser.add_argument("--json", action="store_true", help="print the class map as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console script entry point."""
    import rclpy
    from rcl_interfaces.srv import SetParameters
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    args_in = sys.argv[1:] if argv is None else argv
    ros_args = rclpy.utilities.remove_ros_args(["set_vocabulary", *args_in])[1:]
    args = build_parser().parse_args(ros_args)
    target = args.node if args.node.startswith("/") else "/" + args.node

    rclpy.init(args=["set_vocabulary", *args_in])
    node = Node(f"set_vocabulary_{abs(hash((time.time(), id(args)))) % 10**8}")
    latest: dict[str, Any] = {}

    def on_vocabulary(msg: String) -> None:
        try:
            latest["map"] = json.loads(msg.data)
        except json.JSONDecodeError:
            pass

    latched = QoSProfile(
        depth=1,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL,
    )
    node.create_subscription(String, f"{target}/vocabulary", on_vocabulary, latched)
    client = node.create_client(SetParameters, f"{target}/set_parameters")

    def spin_until(predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            rclpy.spin_once(node, timeout_sec=0.05)
        return bool(predicate())

    try:
        if not client.wait_for_service(timeout_sec=min(args.timeout, 15.0)):
            print(
                f"no node {target} found (is it running, with the same ROS_DOMAIN_ID and "
                "ROS_AUTOMATIC_DISCOVERY_RANGE as this shell?)",
                file=sys.stderr,
            )
            return EXIT_NO_NODE
        # The class map in use now (transient local): its version tells a new one apart.
        spin_until(lambda: "map" in latest, 3.0)
        old_version = latest.get("map", {}).get("version", 0)

        params = [Parameter("vocabulary", Parameter.Type.STRING_ARRAY, list(args.classes))]
        if args.background is not None:
            params.append(
                Parameter("background_words", Parameter.Type.STRING_ARRAY, list(args.background))
            )
        if args.templates:
            params.append(Parameter("templates", Parameter.Type.STRING, args.templates))
        request = SetParameters.Request(parameters=[p.to_parameter_msg() for p in params])
        future = client.call_async(request)
        if not spin_until(future.done, args.timeout) or future.result() is None:
            print(f"{target} did not answer the set_parameters call", file=sys.stderr)
            return EXIT_NO_NODE
        results = future.result().results
        rejected = [r.reason for r in results if not r.successful]
        if rejected:
            print(f"rejected: {'; '.join(rejected)}")
            return EXIT_REJECTED

        def arrived() -> bool:
            cm = latest.get("map")
            return bool(cm) and cm.get("version", 0) > old_version and matches(cm, args.classes)

        print(f"accepted by {target}; waiting for the new class map...", flush=True)
        if not spin_until(arrived, args.timeout):
            print(
                f"accepted, but {target}/vocabulary did not publish the new class map within "
                f"{args.timeout:g} s (still encoding, or the change failed: see the node's log "
                "and /diagnostics)",
                file=sys.stderr,
            )
            return EXIT_NOT_APPLIED
        class_map = latest["map"]
        print(json.dumps(class_map, indent=2) if args.json else format_class_map(class_map))
        return EXIT_ACCEPTED
    except KeyboardInterrupt:
        return 130
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
