"""The machine a bench runs on: what it is, how much of its CPU other processes used, and the peak
memory of a block of work."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, torch version and GPU (when one is visible)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


class OtherCpuUse:
    """Share of the machine's CPU time that other processes used between start() and share().

    Other processes skew the figures; this says by how much the machine was shared. Linux only
    (/proc/stat); share() is None elsewhere.
    """

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float] | None:
        """(wall s, busy CPU s of the machine, CPU s of this process)."""
        try:
            with open("/proc/stat") as fh:
                values = [int(v) for v in fh.readline().split()[1:9]]
            hz = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, AttributeError):
            return None
        busy = sum(values) - values[3] - values[4]  # all but idle and iowait
        mine = os.times()
        return time.monotonic(), busy / hz, mine.user + mine.system

    def share(self) -> float | None:
        """Fraction (0..1) of all cores' time used by other processes since construction."""
        now = self._now()
        if now is None or self._start is None:
            return None
        wall = (now[0] - self._start[0]) * (os.cpu_count() or 1)
        others = (now[1] - self._start[1]) - (now[2] - self._start[2])
        return min(1.0, max(0.0, others / wall)) if wall > 0 else None


def format_machine(machine: dict[str, Any]) -> str:
    """One line describing the machine."""
    parts = [
        f"{machine['cpu']}, {machine['cores']} cores",
        f"{machine['memory_gib']} GiB RAM" if machine.get("memory_gib") else "",
        f"torch {machine['torch']} ({machine['torch_threads']} threads)",
        f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU",
        (
            f"other processes used {machine['other_processes_cpu_share']:.0%} of the CPU time "
            "during the run"
            if machine.get("other_processes_cpu_share") is not None
            else ""
        ),
    ]
    return ", ".join(p for p in parts if p)


def _read_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_rss_peak() -> bool:
    """Reset the process's RSS high-water mark (Linux: '5' > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _read_status_kib("VmHWM") is not None


@dataclass
class PeakMemory:
    """Peak memory during a `with` block: host RSS and, on CUDA, torch's allocated memory."""

    device: torch.device
    cpu_rss_mib: float = 0.0
    gpu_allocated_mib: float | None = None
    cpu_source: str = ""

    def __enter__(self) -> PeakMemory:
        self._reset = reset_rss_peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu_allocated_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _read_status_kib("VmHWM") if self._reset else None
        if hwm is not None:
            self.cpu_rss_mib = hwm / 1024
            self.cpu_source = "VmHWM (reset per row)"
        else:
            # ru_maxrss is KiB on Linux and bytes on macOS; it is the peak of the whole process.
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.cpu_rss_mib = peak / (2**20 if platform.system() == "Darwin" else 1024)
            self.cpu_source = "ru_maxrss (peak of the process so far, cannot be reset)"
