"""The semantic point cloud `~/points`: depth back-projected through the pinhole model, per pixel.

Each point is the label pixel (u, v) lifted to z = depth(u, v) metres along the camera's ray:
x = (u - cx) / fx * z, y = (v - cy) / fy * z, in the camera's optical frame (x right, y down, z
forward), with K from camera_info scaled to the label image's size (about pixel centres, as
node.scaled_camera_info). Distortion is not applied: the depth is taken to be registered to a
rectified or nearly distortion-free colour image (ZED's registered depth is rectified; RealSense
colour distortion is a fraction of a pixel), so points off-centre of a strongly distorted lens
are off by the lens's distortion.

The record layout (little-endian, 20 bytes, the order RViz and PCL readers expect first):

    x, y, z     float32 at 0, 4, 8      NaN where the depth is invalid (0, NaN, inf, > max_range)
    rgb         float32 at 12           0x00RRGGBB of the class's overlay colour (viz.class_colors),
                                        grey for unlabeled; RViz colours by it
    label       uint16 at 16            class id, the unlabeled value of ~/labels (255 or 65535)
    confidence  uint8 at 18             0-255, as ~/confidence

No rclpy here beyond the message types, so the arithmetic is tested without ROS.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Any

import numpy as np
from sensor_msgs.msg import PointCloud2, PointField

from ..viz import class_colors
from .encode import header_copy

#: Bytes per point (x, y, z, rgb: 4 floats; label uint16; confidence uint8; one pad byte).
POINT_STEP = 20
#: (name, offset, PointField datatype) of every field, in record order.
FIELDS = (
    ("x", 0, PointField.FLOAT32),
    ("y", 4, PointField.FLOAT32),
    ("z", 8, PointField.FLOAT32),
    ("rgb", 12, PointField.FLOAT32),
    ("label", 16, PointField.UINT16),
    ("confidence", 18, PointField.UINT8),
)
#: The record as a numpy structured dtype (readers and tests).
POINT_DTYPE = np.dtype(
    {
        "names": [f[0] for f in FIELDS],
        "formats": ["<f4", "<f4", "<f4", "<f4", "<u2", "u1"],
        "offsets": [f[1] for f in FIELDS],
        "itemsize": POINT_STEP,
    }
)
#: Bytes of records filled at a time (a block of rows that stays in the CPU cache).
CHUNK_BYTES = 1 << 20
#: Colour of unlabeled points in the rgb field.
UNLABELED_RGB = (128, 128, 128)


def point_fields() -> list[PointField]:
    """The PointField list of ~/points."""
    return [PointField(name=n, offset=o, datatype=t, count=1) for n, o, t in FIELDS]


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole focal lengths and principal point, in pixels of one image size."""

    fx: float
    fy: float
    cx: float
    cy: float


def intrinsics_for(k: Any, info_size: tuple[int, int], size: tuple[int, int]) -> Intrinsics:
    """K (row-major 3x3) of an image of info_size (w, h), scaled to an image of size (w, h).

    Scaled about pixel centres (x' = (x + 0.5) * s - 0.5). An info_size of (0, 0) means K is
    already that of `size`. ValueError when the focal lengths are not positive (an empty K).
    """
    fx, cx, fy, cy = float(k[0]), float(k[2]), float(k[4]), float(k[5])
    if not (fx > 0 and fy > 0):
        raise ValueError(f"camera_info K has no focal length (fx={fx:g}, fy={fy:g})")
    (iw, ih), (w, h) = info_size, size
    if iw and ih and (iw, ih) != (w, h):
        sx, sy = w / iw, h / ih
        fx, cx = fx * sx, (cx + 0.5) * sx - 0.5
        fy, cy = fy * sy, (cy + 0.5) * sy - 0.5
    return Intrinsics(fx, fy, cx, cy)


def grid_size(width: int, height: int, stride: int) -> tuple[int, int]:
    """(width, height) of the cloud of a width x height label image at `stride`."""
    return -(-width // stride), -(-height // stride)


@dataclass(frozen=True)
class Rays:
    """Per-column x / z and per-row y / z of the cloud's grid (the rays are separable)."""

    x: np.ndarray  # (w',) float32: (u - cx) / fx at u = 0, stride, 2 * stride...
    y: np.ndarray  # (h',) float32


def make_rays(intr: Intrinsics, width: int, height: int, stride: int) -> Rays:
    """The ray slopes of every stride-th column and row of a width x height image."""
    u = np.arange(0, width, stride, dtype=np.float64)
    v = np.arange(0, height, stride, dtype=np.float64)
    return Rays(
        x=((u - intr.cx) / intr.fx).astype(np.float32),
        y=((v - intr.cy) / intr.fy).astype(np.float32),
    )


def rgb_table(num_classes: int, label_dtype: np.dtype) -> np.ndarray:
    """uint32 0x00RRGGBB per label value: class colours of the overlay, grey for the rest."""
    size = 256 if np.dtype(label_dtype) == np.uint8 else 65536
    colors = np.asarray(class_colors(max(num_classes, 1)), dtype=np.uint32)
    colors = colors[: min(num_classes, size)]
    grey = (UNLABELED_RGB[0] << 16) | (UNLABELED_RGB[1] << 8) | UNLABELED_RGB[2]
    table = np.full(size, grey, dtype=np.uint32)
    table[: len(colors)] = (colors[:, 0] << 16) | (colors[:, 1] << 8) | colors[:, 2]
    return table


class CloudBuilder:
    """Builds ~/points for one camera, reusing its rays and colour table while nothing changes."""

    def __init__(self) -> None:
        """Empty caches."""
        self._rays_key: tuple | None = None
        self._rays: Rays | None = None
        self._table_key: tuple | None = None
        self._table: np.ndarray | None = None
        self._out: np.ndarray | None = None
        self._data: array.array | None = None
        self._rgb: np.ndarray | None = None

    def rays(self, intr: Intrinsics, width: int, height: int, stride: int) -> Rays:
        """The ray grid for these intrinsics and size (made once while they stay the same)."""
        key = (intr, width, height, stride)
        if key != self._rays_key:
            self._rays, self._rays_key = make_rays(intr, width, height, stride), key
        return self._rays

    def table(self, num_classes: int, label_dtype: np.dtype) -> np.ndarray:
        """The rgb table for this class count (made once per vocabulary size)."""
        key = (num_classes, np.dtype(label_dtype).str)
        if key != self._table_key:
            self._table, self._table_key = rgb_table(num_classes, label_dtype), key
        return self._table

    def points(
        self,
        depth: np.ndarray,
        labels: np.ndarray,
        confidence: np.ndarray,
        intr: Intrinsics,
        num_classes: int,
        stride: int = 1,
    ) -> np.ndarray:
        """The (h', w') records of POINT_DTYPE, as uint8 bytes of shape (h', w' * POINT_STEP).

        The returned array is the builder's buffer, overwritten by the next call.

        `depth` is metres (NaN = invalid) already on the cloud's grid (h', w'); `labels` and
        `confidence` (uint8 0-255) are at the full label size and are taken every stride-th
        pixel; `intr` is for the full label size.
        """
        height, width = labels.shape
        rays = self.rays(intr, width, height, stride)
        h, w = len(rays.y), len(rays.x)
        if depth.shape != (h, w):
            raise ValueError(f"depth grid {depth.shape} is not the cloud grid {(h, w)}")
        if stride > 1:
            labels, confidence = labels[::stride, ::stride], confidence[::stride, ::stride]
        out, rgb = self._buffers(h, w)
        z = depth if depth.dtype == np.float32 else depth.astype(np.float32)
        table = self.table(num_classes, labels.dtype)
        # Row blocks of about CHUNK_BYTES, so that the seven passes over a block stay in the cache
        # (one pass per field over a whole 720p cloud, 18 MB, was three times slower per point).
        step = max(1, CHUNK_BYTES // (w * POINT_STEP))
        for r0 in range(0, h, step):
            r1 = min(h, r0 + step)
            rows = out[r0:r1]
            zb = z[r0:r1]
            np.multiply(zb, rays.x[None, :], out=rows[..., 0])
            np.multiply(zb, rays.y[r0:r1, None], out=rows[..., 1])
            rows[..., 2] = zb
            # A contiguous lookup then one strided copy is twice as fast as a strided lookup.
            scratch = rgb[r0:r1]
            np.take(table, labels[r0:r1], out=scratch, mode="clip")
            rows.view(np.uint32)[..., 3] = scratch
            rows.view(np.uint16)[..., 8] = labels[r0:r1]  # bytes 16-17
            tail = rows.view(np.uint8)
            tail[..., 18] = confidence[r0:r1]
            tail[..., 19] = 0
        if not np.little_endian:  # pragma: no cover - the fields are declared little-endian
            for i in range(4):
                out[..., i].byteswap(inplace=True)
            out.view(np.uint16)[..., 8].byteswap(inplace=True)
        return out.view(np.uint8).reshape(h, w * POINT_STEP)

    def _buffers(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """The record buffer (a view of self._data) and the rgb scratch of an h x w grid.

        Reused from frame to frame: a fresh 6 MB buffer per frame costs more in page faults than
        the arithmetic. message() hands self._data to PointCloud2.data, whose setter copies it
        (or, with ROS_PYTHON_CHECK_FIELDS, keeps it: then a new buffer is made next time).
        """
        if self._data is None or self._out is None or self._out.shape[:2] != (h, w):
            self._data = array.array("B", bytes(h * w * POINT_STEP))
            self._out = np.frombuffer(self._data, dtype=np.float32).reshape(h, w, POINT_STEP // 4)
            self._rgb = np.empty((h, w), dtype=np.uint32)
        return self._out, self._rgb

    def message(
        self,
        header: Any,
        depth: np.ndarray,
        labels: np.ndarray,
        confidence: np.ndarray,
        intr: Intrinsics,
        num_classes: int,
        stride: int = 1,
    ) -> PointCloud2:
        """The organised PointCloud2 (see points()) with the colour frame's header."""
        data = self.points(depth, labels, confidence, intr, num_classes, stride)
        msg = PointCloud2()
        msg.header = header_copy(header)
        msg.height, msg.width = data.shape[0], data.shape[1] // POINT_STEP
        msg.fields = point_fields()
        msg.is_bigendian = False
        msg.point_step = POINT_STEP
        msg.row_step = data.shape[1]
        msg.is_dense = False  # invalid depth gives NaN points
        msg.data = self._data
        if msg.data is self._data:  # kept, not copied: the message owns this buffer now
            self._data = self._out = None
        return msg


def cloud_to_array(msg: PointCloud2) -> np.ndarray:
    """A ~/points message as an (height, width) array of POINT_DTYPE (tests and clients)."""
    raw = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(msg.height, msg.row_step)
    rows = raw[:, : msg.width * msg.point_step]
    return np.ascontiguousarray(rows).view(POINT_DTYPE).reshape(msg.height, msg.width)
