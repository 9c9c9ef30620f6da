"""`ovseg bench`: its flags and what it runs: the engine matrix, step breakdown and text timings
(benchmarks/), the ROS node against the bare engine (--node, ros/bench_node.py) or this checkout
against a git revision (--against, benchmarks/revision.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..engine.config import parameter_fields
from .config import add_config_arguments, config_from_args


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `bench` sub-command to the `ovseg` parser."""
    bench = subparsers.add_parser(
        "bench",
        help="time the methods, the frame's steps and the text encoder (or the node) here",
        description="Engine: one row per method x size x mode x variant (device, precision, "
        "quantize, compile, threads; impossible combinations are skipped with a note), then the "
        "steps of one frame and the text encoder. --node: the ROS node against the bare engine "
        "(one frame at a time) and under a stream of frames. --out DIR also writes JSON, "
        "Markdown and a PNG plot.",
    )
    bench.add_argument(
        "--sizes",
        "--size",
        nargs="+",
        default=["640x480"],
        metavar="WxH",
        help="input frame sizes [640x480]",
    )
    bench.add_argument(
        "--methods",
        nargs="*",
        metavar="NAME",
        help="methods to time, or 'all' [pearl naclip sclip clearclip maskclip clip]",
    )
    bench.add_argument(
        "--modes", nargs="+", default=["whole"], choices=["whole", "slide"], help="[whole]"
    )
    bench.add_argument(
        "--devices",
        nargs="+",
        metavar="DEV",
        help="devices (cpu, cuda, cuda:N, auto; an absent one is skipped) [--device]",
    )
    bench.add_argument(
        "--precisions",
        nargs="+",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="precisions (invalid pairs such as fp16 on the CPU are skipped) [--precision]",
    )
    bench.add_argument(
        "--quantize",
        dest="bench_quantize",
        nargs="+",
        choices=["none", "int8"],
        help="quantisation variants [--model-quantize]",
    )
    bench.add_argument(
        "--compile",
        dest="bench_compile",
        nargs="+",
        choices=["none", "default", "reduce-overhead", "max-autotune"],
        help="torch.compile variants [--model-compile]",
    )
    bench.add_argument(
        "--threads",
        dest="bench_threads",
        nargs="+",
        type=int,
        metavar="N",
        help="torch CPU thread counts, 0 = torch's default [--cpu-threads]",
    )
    bench.add_argument("--repeats", type=int, default=5, help="timed frames per row [5]")
    bench.add_argument("--warmup", type=int, default=1, help="untimed frames per row [1]")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random frames [0]")
    bench.add_argument(
        "--agreement-frames",
        type=int,
        default=3,
        help="sample photos for the label agreement against fp32 eager (0 = off) [3]",
    )
    bench.add_argument(
        "--steps-size",
        default="640x480",
        metavar="WxH",
        help="frame size of the per-step breakdown, or 'none' [640x480]",
    )
    bench.add_argument(
        "--text-templates",
        default="seven",
        choices=["none", "single", "seven", "imagenet80"],
        help="template set of the text-encoding timing, 20 classes [seven]",
    )
    bench.add_argument("--out", help="also write bench.json, bench.md, bench.png here")
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    bench.add_argument(
        "--node",
        action="store_true",
        help="time the ROS node end to end against the bare engine instead (same run)",
    )
    bench.add_argument(
        "--frames", type=int, default=10, help="--node: frames sent one at a time [10]"
    )
    bench.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="--node: seconds of streaming at --rate (0 = no streaming phase) [10]",
    )
    bench.add_argument("--rate", type=float, default=30.0, help="--node: stream rate in Hz [30]")
    bench.add_argument(
        "--cameras",
        type=int,
        default=2,
        help="--node: cameras of one node in a second streaming phase, each at --rate "
        "(1 = no such phase) [2]",
    )
    bench.add_argument(
        "--stand-in-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="--node: replace the model by a stand-in that waits MS ms per pass without using "
        "the CPU, as a GPU does, and returns the real result (computed beforehand): measures "
        "the node's own work on a machine without a GPU [0 = the real model]",
    )
    bench.add_argument(
        "--stand-in-batch-ms",
        type=float,
        default=None,
        metavar="MS",
        help="--node --stand-in-ms: what each further camera's frame adds to a pass (the node "
        "batches cameras on a GPU, and so with the stand-in) [a quarter of --stand-in-ms]",
    )
    bench.add_argument(
        "--against",
        metavar="REV",
        help="time this checkout against git revision REV (e.g. a release tag) in one run: "
        "worker processes take frames in turn; segment + overlay per frame, --repeats rounds "
        "(with --node: the node bench's phases, in --repeats interleaved rounds)",
    )
    bench.add_argument(
        "--variants",
        nargs="*",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="--against: configs of this checkout to time too, e.g. precision=bf16 quantize=int8",
    )
    add_config_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return bench


def cmd_bench(args: argparse.Namespace) -> int:
    """Engine matrix, step breakdown and text timings (or the node bench with --node)."""
    import shlex
    import time

    from ..benchmarks.common import parse_size
    from ..benchmarks.engine_bench import run_engine_bench
    from ..benchmarks.matrix import DEFAULT_METHODS
    from ..benchmarks.report import format_engine_bench, write_outputs
    from ..engine import available_methods

    cfg = config_from_args(args)
    sizes = [parse_size(s) for s in args.sizes]
    # The command line as typed (recorded in bench.md / bench.json); empty when called from Python.
    typed = Path(sys.argv[0]).name in ("ovseg", "cli.py", "__main__.py")
    command = "ovseg " + shlex.join(sys.argv[1:]) if typed else ""
    date = time.strftime("%Y-%m-%d")
    progress = None if args.quiet else (lambda text: print(f"... {text}", file=sys.stderr))
    if args.against:
        # Only the flags given: the other revision may not know every field of this one.
        given = {k: v for k, v in vars(args).items() if k in {f.name for f in parameter_fields()}}
        if cfg.method_params:
            given["method_params"] = cfg.method_params
        repo = Path(__file__).resolve().parents[2]
        if args.node:
            from ..ros.bench_node import format_node_against, run_node_against

            result = run_node_against(
                repo,
                args.against,
                given,
                sizes[0],
                args.frames,
                args.duration,
                args.rate,
                rounds=max(1, args.repeats),
                cameras=args.cameras,
                progress=progress,
                stand_in_ms=args.stand_in_ms,
                stand_in_batch_ms=args.stand_in_batch_ms,
            )
            print(format_node_against(result))
            return 0
        from ..benchmarks.revision import format_against, run_against

        result = run_against(repo, args.against, given, args.variants, sizes[0], args.repeats)
        print(format_against(result))
        return 0
    if args.node:
        from ..ros.bench_node import format_node_bench, run_node_bench, write_node_outputs

        result = run_node_bench(
            cfg,
            sizes[0],
            args.frames,
            duration=args.duration,
            rate=args.rate,
            progress=progress,
            cameras=args.cameras,
            stand_in_ms=args.stand_in_ms,
            stand_in_batch_ms=args.stand_in_batch_ms,
        )
        print(format_node_bench(result))
        if args.out:
            for path in write_node_outputs(result, Path(args.out), command, date).values():
                print(f"wrote {path}", file=sys.stderr)
        return 0
    if not args.methods:
        methods = list(DEFAULT_METHODS)
    elif args.methods == ["all"]:
        methods = available_methods()
    else:
        methods = args.methods
    bench = run_engine_bench(
        cfg,
        methods,
        args.modes,
        sizes,
        args.repeats,
        None if args.text_templates == "none" else args.text_templates,
        devices=args.devices,
        precisions=args.precisions,
        quantize=args.bench_quantize,
        compile_modes=args.bench_compile,
        threads=args.bench_threads,
        warmup=args.warmup,
        seed=args.seed,
        agreement_frames=args.agreement_frames,
        steps_size=None if args.steps_size == "none" else parse_size(args.steps_size),
        progress=progress,
    )
    print(format_engine_bench(bench))
    if args.out:
        for path in write_outputs(bench, Path(args.out), command, date).values():
            print(f"wrote {path}", file=sys.stderr)
    return 0
