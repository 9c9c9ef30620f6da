"""Independent references for positional-table resampling, written from the formulas.

Plain float64 loops over output positions, no F.interpolate: the tests compare the engine's
tables with these.

- bicubic_scale: what F.interpolate(..., scale_factor=s, mode='bicubic') samples when the
  scale is used as given (the official codes' +0.1 call): output i reads the source at
  x = (i + 0.5) / s - 0.5 with Keys' cubic kernel (a = -0.75), taps clamped to the border.
- bilinear_size: bilinear by size (align_corners=False): x = (i + 0.5) * n_in / n_out - 0.5,
  clamped at 0, the upper tap clamped to the border.
"""

import math

import torch

A = -0.75  # Keys' cubic convolution parameter (torch's bicubic)


def cubic_weights(t: float) -> list[float]:
    """The four tap weights at offsets -1, 0, 1, 2 for a fractional position t in [0, 1)."""

    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _cubic_1d(n_in: int, n_out: int, scale: float) -> torch.Tensor:
    """(n_out, n_in) matrix of the 1-D bicubic resampling with a given scale factor."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        x = (i + 0.5) / scale - 0.5
        base = math.floor(x)
        for k, w in zip(range(-1, 3), cubic_weights(x - base), strict=True):
            m[i, min(max(base + k, 0), n_in - 1)] += w
    return m


def _linear_1d(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of the 1-D linear resampling by size."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = math.floor(x)
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (x - lo)
        m[i, hi] += x - lo
    return m


def bicubic_scale(grid: torch.Tensor, size: tuple[int, int], scale: tuple[float, float]):
    """(gh, gw, D) table -> (h, w, D) float64 by bicubic sampling with the given scale."""
    gh, gw, _ = grid.shape
    ry = _cubic_1d(gh, size[0], scale[0])
    rx = _cubic_1d(gw, size[1], scale[1])
    return torch.einsum("yi,xj,ijd->yxd", ry, rx, grid.double())


def official_table(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The official codes' table: scale factor (h + 0.1) / gh, (w + 0.1) / gw."""
    gh, gw, _ = grid.shape
    return bicubic_scale(grid, size, ((size[0] + 0.1) / gh, (size[1] + 0.1) / gw))


def bilinear_size(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(gh, gw, D) table -> (h, w, D) float64, bilinear by size."""
    gh, gw, _ = grid.shape
    return torch.einsum(
        "yi,xj,ijd->yxd", _linear_1d(gh, size[0]), _linear_1d(gw, size[1]), grid.double()
    )
