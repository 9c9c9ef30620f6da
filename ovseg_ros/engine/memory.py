"""Giving memory back: to the GPU allocator's pool and, on Linux, to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from typing import Any

import torch

_libc: Any = None


def _malloc_trim() -> bool:
    """glibc's malloc_trim(0): return freed heap pages to the system (False where unavailable)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(_libc.malloc_trim(0))
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return False


def free_memory(device: torch.device | str | None = None) -> None:
    """Collect garbage, empty the CUDA cache (on a CUDA device), trim the C heap.

    Freed tensors go back to PyTorch's caching allocator on a GPU and to the C heap on the CPU;
    neither returns them to the system by itself, so a node that drops its model or its frame
    buffers calls this for the memory to show up as free (nvidia-smi, RSS).
    """
    gc.collect()
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    _malloc_trim()
