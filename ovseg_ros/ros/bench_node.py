"""Node benchmark: the ROS node against the bare engine, one frame at a time and as a stream.

One model (bench_node_session.py: the nodes, spinning in this process, and a peer process with
the cameras and the outputs' subscribers, bench_peer.py). Phases:

* alternating: for every frame the bare `Segmenter.segment` is timed, then the same frame goes
  through the node (published on `image` by a peer node, received back on each subscribed output),
  so that both see the same machine load. A frame is sent only after the previous one came back:
  per-frame latency without queueing. The difference of the medians is the node's overhead over
  the engine (decode, copies, overlay, masks, messages, DDS) in the same run. Each frame also
  goes through a relay node that answers with prebuilt messages of the outputs' sizes
  (bench_relay.py): the floor any rclpy node pays for that traffic; the overhead above it is the
  node's own work.
* streaming: the peer publishes frames at `rate` Hz for `duration` seconds regardless of the
  node, as a camera does. Reported: the input rate achieved, the output rate (and its ratio to
  the bare engine's rate, 1 / its median time), the end-to-end latency (input stamp -> arrival
  of each output), and the drops, with the node's own counters to say where they went.
* streaming to two cameras of one node: the same at the same rate per camera; the output rate of
  both together against one camera's (camera batching).

`--against REV` runs the same phases in two worker processes, REV's code and this checkout's,
in interleaved rounds, so the before/after ratios come from one run (run_node_against).

    .venv/bin/ovseg bench --node --pretrained none --frames 20 --duration 10
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..benchmarks.common import percentile
from ..benchmarks.machine import OtherCpuUse, format_machine, machine_info
from ..engine import SegmenterConfig
from .bench_node_session import DEFAULT_OUTPUTS, NodeSession


def _stats(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50": float("nan"), "p95": float("nan"), "mean": float("nan")}
    return {
        "p50": statistics.median(samples),
        "p95": percentile(samples, 95),
        "mean": statistics.fmean(samples),
    }


def alternating_figures(samples: dict[str, Any]) -> dict[str, Any]:
    """Medians and ratios of NodeSession.alternate samples."""
    engine, e2e = _stats(samples["engine"]), _stats(samples["end_to_end"])
    measured = bool(samples["engine"])
    overlay = _stats(samples.get("overlay", []))
    overhead = e2e["p50"] - engine["p50"] if measured else None
    besides = overhead - overlay["p50"] if overhead is not None and samples.get("overlay") else None
    floor = _stats(samples.get("relay", []))
    has_floor = bool(samples.get("relay"))
    return {
        "overlay_ms": overlay,
        "overhead_besides_overlay_ms_p50": besides,
        # DDS + rclpy alone for the same messages (the relay), and the node's work above that.
        "relay_floor_ms": floor if has_floor else None,
        "own_work_ms_p50": overhead - floor["p50"] if has_floor and measured else None,
        "own_work_besides_overlay_ms_p50": (
            besides - floor["p50"] if has_floor and besides is not None else None
        ),
        "frames": len(samples["engine"]),
        "engine_ms": engine,
        "engine_rate_hz": 1e3 / engine["p50"] if measured else 0.0,
        "node_end_to_end_ms": e2e,
        "node_per_output_ms": {n: _stats(v) for n, v in samples["outputs"].items()},
        "overhead_ratio_p50": e2e["p50"] / engine["p50"] if measured else None,
        "overhead_ms_p50": overhead,
    }


def stream_figures(raw: dict[str, Any], engine_rate_hz: float = 0.0) -> dict[str, Any]:
    """NodeSession.stream samples -> rates, drops and latency percentiles."""
    st = {k: v for k, v in raw.items() if k not in ("end_to_end", "outputs")}
    st["input_rate_hz"] = st["input_intervals"] / st["input_span_s"] if st["input_span_s"] else 0.0
    st["output_rate_hz"] = (
        st["output_intervals"] / st["output_span_s"] if st["output_span_s"] else 0.0
    )
    st["drop_fraction"] = st["drops"] / st["published"] if st["published"] else 0.0
    st["node_per_output_ms"] = {n: _stats(v) for n, v in raw["outputs"].items()}
    st["node_end_to_end_ms"] = _stats(raw["end_to_end"])
    if engine_rate_hz > 0:
        st["output_over_engine_rate"] = st["output_rate_hz"] / engine_rate_hz
    return st


def run_node_bench(
    cfg: SegmenterConfig,
    size: tuple[int, int] = (480, 640),
    frames: int = 10,
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
    backbone: Any = None,
    timeout: float = 120.0,
    duration: float = 0.0,
    rate: float = 30.0,
    progress: Callable[[str], None] | None = None,
    cameras: int = 2,
    stand_in_ms: float = 0.0,
    stand_in_batch_ms: float | None = None,
) -> dict[str, Any]:
    """Time `frames` frames through the engine and the node, alternating; then stream for
    `duration` seconds at `rate` Hz to one camera and (cameras > 1) to `cameras` cameras of one
    node (0 s = no streaming phase); see the module doc."""
    machine = machine_info()
    others = OtherCpuUse()
    session = NodeSession(
        cfg,
        size,
        outputs,
        backbone=backbone,
        timeout=timeout,
        stand_in_ms=stand_in_ms,
        stand_in_batch_ms=stand_in_batch_ms,
    )
    streams: list[dict[str, Any]] = []
    try:
        if progress:
            progress(f"node bench: {frames} frames one at a time (+1 warm-up)")
        alternating = alternating_figures(session.alternate(frames))
        for count in [1, cameras] if cameras > 1 else [1]:
            if duration <= 0:
                break
            if progress:
                progress(
                    f"node bench: streaming at {rate:g} Hz to {count} camera(s), {duration:g} s"
                )
            raw = session.stream(duration, rate, count)
            streams.append(stream_figures(raw, alternating["engine_rate_hz"]))
    finally:
        session.close()
    machine["other_processes_cpu_share"] = others.share()
    bb = session.backbone
    if len(streams) > 1 and streams[0]["output_rate_hz"] > 0:
        streams[1]["output_over_one_camera"] = (
            streams[1]["output_rate_hz"] / streams[0]["output_rate_hz"]
        )
    return {
        "machine": machine,
        "size": f"{size[1]}x{size[0]}",
        "model": f"{bb.name} ({bb.source}) on {bb.device}",
        "method": cfg.method,
        "stand_in_ms": stand_in_ms,
        "stand_in_batch_ms": session.stand_in_batch_ms,
        "outputs": list(outputs),
        **alternating,
        "stream": streams[0] if streams else None,
        "stream_cameras": streams[1] if len(streams) > 1 else None,
    }


def format_node_bench(result: dict[str, Any]) -> str:
    """Markdown tables of a run_node_bench result (alternating, then streaming)."""
    lines = [
        f"Machine: {format_machine(result['machine'])}",
        "",
        f"Node vs engine, {result['size']}, {result['model']}, method {result['method']}, "
        f"{result['frames']} frames (alternating, one at a time)"
        + _stand_in_note(result.get("stand_in_ms", 0.0), result.get("stand_in_batch_ms")),
        "",
        "| path | p50 ms | p95 ms | mean ms |",
        "|---|---|---|---|",
    ]
    rows = [("engine: Segmenter.segment", result["engine_ms"])]
    rows += [
        (f"node: input stamp -> ~/{name}", stats)
        for name, stats in result["node_per_output_ms"].items()
    ]
    rows.append(("node: input stamp -> last output", result["node_end_to_end_ms"]))
    for label, s in rows:
        lines.append(f"| {label} | {s['p50']:.1f} | {s['p95']:.1f} | {s['mean']:.1f} |")
    if result["overhead_ratio_p50"] is not None:
        lines += [
            "",
            f"Node overhead over the engine: x{result['overhead_ratio_p50']:.3f} "
            f"({result['overhead_ms_p50']:+.1f} ms per frame, medians of the same run)",
        ]
    if result.get("overhead_besides_overlay_ms_p50") is not None:
        lines.append(
            f"Of that, the overlay with its legend (drawn alone, same frames): "
            f"{result['overlay_ms']['p50']:.1f} ms; the rest (decode, hand-offs, other "
            f"outputs, DDS both ways): {result['overhead_besides_overlay_ms_p50']:+.1f} ms"
        )
    if result.get("own_work_ms_p50") is not None:
        lines.append(
            f"DDS and rclpy alone for the same messages (a relay node answering each frame with "
            f"prebuilt outputs, same run): {result['relay_floor_ms']['p50']:.1f} ms p50; the "
            f"node's own work above that floor: {result['own_work_ms_p50']:+.1f} ms"
            + (
                f", {result['own_work_besides_overlay_ms_p50']:+.1f} ms besides the overlay"
                if result.get("own_work_besides_overlay_ms_p50") is not None
                else ""
            )
        )
    if result.get("engine_rate_hz"):
        lines.append(f"Bare engine rate: {result['engine_rate_hz']:.2f} Hz (1 / median)")
    for key in ("stream", "stream_cameras"):
        if result.get(key):
            lines += ["", *format_stream(result[key])]
    return "\n".join(lines)


def _stand_in_note(ms: float, batch_ms: float | None = None) -> str:
    if ms <= 0:
        return ""
    batch = "" if batch_ms is None else f" (+{batch_ms:g} ms per other camera's frame in a pass)"
    return (
        f"; the engine is a stand-in that waits {ms:g} ms per pass{batch} without using the CPU "
        "(as a GPU does) and returns the real result: the rest is the node's own work"
    )


def format_stream(st: dict[str, Any]) -> list[str]:
    """Lines of one streaming phase: rates, drops, latency per output, the node's counters."""
    cams = st.get("cameras", 1)
    where = f"{cams} cameras" if cams > 1 else "one camera"
    lines = [
        f"Streaming to {where}, {st['rate_hz']:g} Hz for {st['duration_s']:g} s: "
        f"{st['published']} frames published ({st['input_rate_hz']:.1f} Hz achieved), "
        f"{st['outputs_complete']} came out on every output ({st['output_rate_hz']:.2f} Hz), "
        f"{st['drops']} dropped ({st['drop_fraction']:.0%})",
    ]
    ratios = []
    if "output_over_engine_rate" in st:
        ratios.append(f"output rate / bare engine rate = {st['output_over_engine_rate']:.2f}")
    if "output_over_one_camera" in st:
        ratios.append(f"output rate / one camera's = {st['output_over_one_camera']:.2f}")
    if ratios:
        lines.append("; ".join(ratios))
    lines += [
        "",
        "| stream: input stamp -> | frames | p50 ms | p95 ms | mean ms |",
        "|---|---|---|---|---|",
    ]
    for name, s in st["node_per_output_ms"].items():
        lines.append(
            f"| ~/{name} | {st['per_output_count'][name]} | {s['p50']:.1f} | "
            f"{s['p95']:.1f} | {s['mean']:.1f} |"
        )
    s = st["node_end_to_end_ms"]
    lines.append(
        f"| last output | {st['outputs_complete']} | {s['p50']:.1f} | {s['p95']:.1f} "
        f"| {s['mean']:.1f} |"
    )
    c = st["node_counters"]
    if c is not None:
        lost = st["published"] - c["received"]
        lines += [
            "",
            f"Node counters in the stream: received {c['received']} (lost on the way "
            f"{lost}), replaced by a newer frame before inference {c['dropped']}, "
            f"processed {c['processed']}, published {c['published']}, failed {c['failed']}"
            + ("" if st["drained"] else " (the node had not settled when the bench ended)"),
        ]
        if st.get("batches"):
            lines.append(
                f"Forward passes that served more than one camera's frame: {st['batches']}"
            )
    return lines


def write_node_outputs(
    result: dict[str, Any], out_dir: Path, command: str = "", date: str = ""
) -> dict[str, Path]:
    """Write node.json and node.md into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = date or time.strftime("%Y-%m-%d")
    paths = {"json": out_dir / "node.json", "md": out_dir / "node.md"}
    data = {"command": command, "date": date, **result}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    head = [f"# ovseg bench --node, {date}", ""] + ([f"`{command}`", ""] if command else [])
    paths["md"].write_text("\n".join(head) + format_node_bench(result) + "\n")
    return paths


#: Runs bench_node_session.py (this checkout's file) under the code on PYTHONPATH.
_WORKER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


def _start_worker(root: Path, spec: dict[str, Any], domain: int) -> Any:
    """A worker process driving the node of the checkout at `root` (see bench_node_session),
    on ROS domain `domain`: the two workers' cameras and nodes have the same names and topics,
    so on one domain each node would also get the other's frames."""
    import os
    import subprocess
    import sys

    from . import bench_node_session

    env = {**os.environ, "PYTHONPATH": str(root), "ROS_DOMAIN_ID": str(domain)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, bench_node_session.__file__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=root,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    if not proc.stdout.readline().startswith('{"ready"'):
        proc.kill()
        raise ValueError(f"the node bench worker for {root} did not start")
    return proc


def _ask(proc: Any, **command: Any) -> dict[str, Any]:
    proc.stdin.write(json.dumps(command) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a node bench worker ended during {command['phase']}")
    return json.loads(line)


def _merge(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Samples of two rounds of one phase together (lists appended, counts added)."""
    if total is None:
        return part
    out = dict(total)
    for key, value in part.items():
        if key in ("rate_hz", "cameras"):
            continue  # the same in every round
        if isinstance(value, bool):
            out[key] = total[key] and value
        elif isinstance(value, list):
            out[key] = total[key] + value
        elif isinstance(value, dict):
            out[key] = _merge(total[key], value)
        elif isinstance(value, int | float):
            out[key] = total[key] + value
    return out


def run_node_against(
    repo: Path,
    revision: str,
    config: dict[str, Any],
    size: tuple[int, int],
    frames: int,
    duration: float,
    rate: float,
    rounds: int = 3,
    cameras: int = 2,
    progress: Callable[[str], None] | None = None,
    stand_in_ms: float = 0.0,
    stand_in_batch_ms: float | None = None,
) -> dict[str, Any]:
    """The node bench of REV's code and of this checkout, in `rounds` interleaved rounds.

    Each worker process runs this checkout's bench_node_session.py over its own code and model
    (`config`: the SegmenterConfig fields given on the command line). Every phase is split in
    `rounds` parts that alternate between the two, so machine noise falls on both alike.
    """
    import os
    import subprocess
    import tempfile

    from ..benchmarks.revision import _worktree

    here = Path(__file__).resolve().parents[2]
    spec = {
        "config": config,
        "size": list(size),
        "outputs": list(DEFAULT_OUTPUTS),
        "stand_in_ms": stand_in_ms,
        "stand_in_batch_ms": stand_in_batch_ms,
    }
    labels = [revision, "this checkout"]
    phases: list[tuple[str, dict[str, Any]]] = [("alternate", {"frames": max(1, frames // rounds)})]
    if duration > 0:
        for count in [1, cameras] if cameras > 1 else [1]:
            phases.append(
                ("stream", {"duration": duration / rounds, "rate": rate, "cameras": count})
            )
    samples: dict[tuple[str, int], list[dict[str, Any] | None]] = {}
    with tempfile.TemporaryDirectory(prefix="ovseg-rev-") as tmp:
        old_root = _worktree(repo, revision, Path(tmp) / "rev")
        procs = []
        try:
            base = int(os.environ.get("ROS_DOMAIN_ID", 100 + os.getpid() % 100))
            procs = [
                _start_worker(root, spec, (base + w) % 233)
                for w, root in enumerate((old_root, here))
            ]
            for i, (phase, args) in enumerate(phases):
                total: list[dict[str, Any] | None] = [None, None]
                for r in range(rounds):
                    for w, proc in enumerate(procs):
                        if progress:
                            progress(f"{labels[w]}: {phase} {args}, round {r + 1}/{rounds}")
                        total[w] = _merge(total[w], _ask(proc, phase=phase, **args))
                samples[(phase, i)] = total
        finally:
            for proc in procs:
                proc.stdin.close()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            subprocess.run(
                ["git", "-C", str(repo), "worktree", "remove", "--force", str(old_root)],
                capture_output=True,
            )
    rows = []
    for w, label in enumerate(labels):
        alternating = alternating_figures(samples[("alternate", 0)][w])
        streams = [
            stream_figures(samples[key][w], alternating["engine_rate_hz"])
            for key in samples
            if key[0] == "stream"
        ]
        if len(streams) > 1 and streams[0]["output_rate_hz"] > 0:
            streams[1]["output_over_one_camera"] = (
                streams[1]["output_rate_hz"] / streams[0]["output_rate_hz"]
            )
        rows.append({"label": label, **alternating, "streams": streams})
    return {
        "revision": revision,
        "size": f"{size[1]}x{size[0]}",
        "rounds": rounds,
        "stand_in_ms": stand_in_ms,
        "stand_in_batch_ms": (stand_in_ms / 4 if stand_in_batch_ms is None else stand_in_batch_ms),
        "rows": rows,
    }


def format_node_against(result: dict[str, Any]) -> str:
    """Markdown: the two checkouts' node figures side by side, and after / before."""
    rows = result["rows"]
    before, after = rows
    lines = [
        f"Node bench, this checkout against {result['revision']}, {result['size']}, "
        f"{result['rounds']} interleaved rounds per phase (one run)"
        + _stand_in_note(result.get("stand_in_ms", 0.0), result.get("stand_in_batch_ms")),
        "",
        f"| figure | {before['label']} | this checkout | after / before |",
        "|---|---|---|---|",
    ]

    def row(name: str, a: float, b: float, fmt: str = ".1f") -> None:
        ratio = b / a if a else float("nan")
        lines.append(f"| {name} | {a:{fmt}} | {b:{fmt}} | {ratio:.2f} |")

    row("engine p50 ms", before["engine_ms"]["p50"], after["engine_ms"]["p50"])
    row("node, one at a time: p50 ms", *(r["node_end_to_end_ms"]["p50"] for r in (before, after)))
    row("node overhead p50 ms", before["overhead_ms_p50"], after["overhead_ms_p50"])
    row("overlay alone p50 ms", before["overlay_ms"]["p50"], after["overlay_ms"]["p50"])
    row(
        "node overhead besides the overlay, ms",
        before["overhead_besides_overlay_ms_p50"],
        after["overhead_besides_overlay_ms_p50"],
    )
    if before.get("relay_floor_ms") and after.get("relay_floor_ms"):
        row("DDS + rclpy floor (relay) p50 ms", *(r["relay_floor_ms"]["p50"] for r in rows))
        row(
            "node's own work above the floor, besides the overlay, ms",
            *(r["own_work_besides_overlay_ms_p50"] for r in rows),
        )
    for i, st in enumerate(before["streams"]):
        other = after["streams"][i]
        what = f"{st['cameras']} camera{'s' if st['cameras'] > 1 else ''}"
        row(f"stream, {what}: output Hz", st["output_rate_hz"], other["output_rate_hz"], ".2f")
        row(
            f"stream, {what}: output / engine rate",
            st.get("output_over_engine_rate", 0.0),
            other.get("output_over_engine_rate", 0.0),
            ".2f",
        )
        for q in ("p50", "p95"):
            row(
                f"stream, {what}: latency {q} ms",
                st["node_end_to_end_ms"][q],
                other["node_end_to_end_ms"][q],
            )
        if "output_over_one_camera" in st:
            row(
                f"stream, {what}: / one camera's rate",
                st["output_over_one_camera"],
                other.get("output_over_one_camera", 0.0),
                ".2f",
            )
    return "\n".join(lines)
