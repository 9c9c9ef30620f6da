"""`ovseg`: the command line (`ovseg segment | methods | eval | bench | demo`).

Each sub-command lives with its code: commands/segment.py, commands/bench.py,
evaluation/cli.py, ros/demo.py; the engine's flags they share are commands/config.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .commands.bench import add_bench_parser
from .commands.segment import add_segment_parser
from .engine import ModelLoadError, describe_methods
from .evaluation.cli import add_eval_parser


def cmd_methods(args: argparse.Namespace) -> int:
    """Print every registered method with its summary and default hyper-parameters."""
    for m in describe_methods():
        params = ", ".join(f"{k}={v}" for k, v in m["params"].items())
        print(f"{m['name']:<10} {m['summary']}\n{'':<10} {params}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `ovseg` argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="ovseg", description="Training-free open-vocabulary segmentation with CLIP."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_segment_parser(sub)
    add_bench_parser(sub)
    meth = sub.add_parser("methods", help="list the methods and their hyper-parameters")
    meth.set_defaults(func=cmd_methods)
    from .ros import demo  # light: the node and rclpy are imported when the demo runs

    demo_parser = sub.add_parser(
        "demo",
        help="run the ROS node with a sample camera on this host (what `make run` starts)",
        description=(demo.__doc__ or "").split("\n\n")[1],
    )
    demo.build_parser(demo_parser)
    demo_parser.set_defaults(func=demo.run)
    add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ovseg` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s"
    )
    logging.getLogger().handlers[0].setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
