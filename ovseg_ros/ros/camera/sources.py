"""Frame sources of the sample camera: the sample photos, a folder, a video file or a webcam.

``FrameSource`` iterates HxWx3 uint8 RGB frames of one source, resized by ``fit_frame`` to the
size ``parse_size`` reads from the command line; ``SourceError`` says why a source cannot be
opened or read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import PROG

__all__ = ["DEFAULT_SIZE", "FrameSource", "SourceError", "fit_frame", "parse_size"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

DEFAULT_SIZE = (640, 480)


class SourceError(RuntimeError):
    """A frame source that cannot be opened or read; the message says which and why."""


def parse_size(text: str) -> tuple[int, int] | None:
    """'640x480' -> (640, 480); 'native' -> None (frames keep their own size)."""
    value = text.strip().lower()
    if value == "native":
        return None
    parts = value.split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size must be WIDTHxHEIGHT (e.g. 640x480) or 'native', got {text!r}")
    width, height = int(parts[0]), int(parts[1])
    if not (1 <= width <= 16384 and 1 <= height <= 16384):
        raise ValueError(f"size {width}x{height} is out of range (1 to 16384 pixels a side)")
    return width, height


def fit_frame(rgb: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize keeping the aspect ratio until the frame covers ``size`` (w, h), then centre-crop.

    ``None`` returns the frame as it is (contiguous).
    """
    if size is None:
        return np.ascontiguousarray(rgb)
    width, height = size
    in_h, in_w = rgb.shape[:2]
    scale = max(width / in_w, height / in_h)
    new_w = max(width, round(in_w * scale))
    new_h = max(height, round(in_h * scale))
    if (new_w, new_h) != (in_w, in_h):
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=interp)
    x0 = (new_w - width) // 2
    y0 = (new_h - height) // 2
    return np.ascontiguousarray(rgb[y0 : y0 + height, x0 : x0 + width])


def _bgr_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class FrameSource:
    """Iterates HxWx3 uint8 RGB frames of one source, resized by ``fit_frame``.

    Kinds: ``samples`` (the photos bundled with scikit-image), ``folder`` (image files of a
    folder, sorted by name), ``video`` (a file OpenCV can read) and ``webcam`` (a
    cv2.VideoCapture device index). Samples, folders and videos start again at the end when
    ``loop`` is true; a webcam never ends. The source is opened (and checked) by the
    constructor: SourceError says what is wrong. ``warn`` receives messages about skipped files.
    """

    KINDS = ("samples", "folder", "video", "webcam")

    def __init__(
        self,
        kind: str = "samples",
        target: str | int | Path | None = None,
        *,
        size: tuple[int, int] | None = DEFAULT_SIZE,
        loop: bool = True,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown source kind {kind!r}; one of {', '.join(self.KINDS)}")
        self.kind = kind
        self.size = size
        self.loop = loop
        self._warn = warn or (lambda text: print(f"{PROG}: {text}", file=sys.stderr))
        self._index = 0
        self._cap: Any = None
        self._pending: np.ndarray | None = None
        self._frames: list[np.ndarray] = []
        self._files: list[Path] = []
        self._bad_files: set[Path] = set()
        self._exhausted = False
        self.frames_read = 0
        if kind == "samples":
            self._open_samples()
        elif kind == "folder":
            self.path = Path(str(target))
            self._open_folder()
        elif kind == "video":
            self.path = Path(str(target))
            self._open_video()
        else:
            self.device = int(target or 0)
            self._open_webcam()

    # Constructors by kind, for readability at the call site.
    @classmethod
    def samples(cls, size=DEFAULT_SIZE, loop: bool = True, **kwargs) -> FrameSource:
        return cls("samples", None, size=size, loop=loop, **kwargs)

    @classmethod
    def folder(cls, path, size=DEFAULT_SIZE, loop: bool = True, **kwargs) -> FrameSource:
        return cls("folder", path, size=size, loop=loop, **kwargs)

    @classmethod
    def video(cls, path, size=DEFAULT_SIZE, loop: bool = True, **kwargs) -> FrameSource:
        return cls("video", path, size=size, loop=loop, **kwargs)

    @classmethod
    def webcam(cls, index: int = 0, size=DEFAULT_SIZE, **kwargs) -> FrameSource:
        return cls("webcam", index, size=size, loop=True, **kwargs)

    def describe(self) -> str:
        """A short human description, for the start-up message."""
        size = "native size" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        if self.kind == "samples":
            what = f"{len(self._frames)} sample photos of skimage.data"
        elif self.kind == "folder":
            what = f"{len(self._files)} images of folder {self.path}"
        elif self.kind == "video":
            what = f"video {self.path}"
        else:
            what = f"webcam {self.device}"
        once = "" if self.kind == "webcam" else (", looping" if self.loop else ", once")
        return f"{what} ({size}{once})"

    # --- opening ---------------------------------------------------------------------------

    def _open_samples(self) -> None:
        # Imported here: ovseg_ros.samples pulls in the engine (and torch), which only this
        # source needs.
        from ...samples import sample_images

        self._frames = [fit_frame(rgb, self.size) for _name, rgb in sample_images()]

    def _open_folder(self) -> None:
        path = self.path
        if not path.exists():
            raise SourceError(f"folder '{path}' does not exist")
        if not path.is_dir():
            raise SourceError(f"'{path}' is not a folder (use --video for a video file)")
        try:
            entries = sorted(path.iterdir())
        except OSError as exc:
            raise SourceError(f"cannot read folder '{path}': {exc.strerror or exc}") from exc
        self._files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        if not self._files:
            raise SourceError(
                f"folder '{path}' has no images (looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        first = self._next_folder_frame()
        if first is None:
            raise SourceError(f"none of the {len(self._files)} images in '{path}' can be read")
        self._pending = first

    def _open_video(self) -> None:
        path = self.path
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a file"
            raise SourceError(f"video '{path}' {what}")
        if not os.access(path, os.R_OK):
            raise SourceError(f"video '{path}' is not readable (permission denied)")
        self._cap = cv2.VideoCapture(str(path))
        if not self._cap.isOpened():
            self._release()
            raise SourceError(
                f"cannot open video '{path}': OpenCV cannot decode it (not a video, or a codec "
                f"this OpenCV build lacks)"
            )
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self._release()
            raise SourceError(f"video '{path}' has no readable frames")
        self._pending = _bgr_to_rgb(frame)

    def _open_webcam(self) -> None:
        self._cap = cv2.VideoCapture(self.device)
        if not self._cap.isOpened():
            self._release()
            raise SourceError(
                f"cannot open webcam {self.device} (no camera with that index, or it is busy or "
                f"not permitted; on Linux check /dev/video{self.device})"
            )
        # Keep at most one queued frame, so a slow --rate still sends recent pictures.
        self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self._release()
            raise SourceError(f"webcam {self.device} opened but delivers no frames")
        self._pending = _bgr_to_rgb(frame)

    # --- reading ---------------------------------------------------------------------------

    def _next_folder_frame(self) -> np.ndarray | None:
        """The next readable image of the folder (wrapping once at most), or None."""
        tried = 0
        while tried < len(self._files):
            if self._index >= len(self._files):
                if not self.loop and self.frames_read > 0:
                    return None
                self._index = 0
            path = self._files[self._index]
            self._index += 1
            tried += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                if path not in self._bad_files:
                    self._bad_files.add(path)
                    self._warn(f"skipping '{path}': not a readable image")
                continue
            return _bgr_to_rgb(image)
        return None

    def _next_raw(self) -> np.ndarray | None:
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return frame
        if self.kind == "samples":
            if self._index >= len(self._frames):
                if not self.loop:
                    return None
                self._index = 0
            frame = self._frames[self._index]
            self._index += 1
            return frame
        if self.kind == "folder":
            if not self.loop and self._index >= len(self._files):
                return None
            return self._next_folder_frame()
        ok, frame = self._cap.read()
        if ok and frame is not None:
            return _bgr_to_rgb(frame)
        if self.kind == "webcam":
            raise SourceError(f"webcam {self.device} stopped delivering frames")
        if not self.loop:
            return None
        # End of the video: rewind (or reopen when the backend cannot seek).
        self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self._release()
            self._cap = cv2.VideoCapture(str(self.path))
            ok, frame = self._cap.read()
        if not ok or frame is None:
            raise SourceError(f"video '{self.path}' cannot be read again from the start")
        return _bgr_to_rgb(frame)

    def read(self) -> np.ndarray | None:
        """The next frame (HxWx3 uint8 RGB at the requested size), or None at the end."""
        if self._exhausted:
            return None
        frame = self._next_raw()
        if frame is None:
            self._exhausted = True
            return None
        self.frames_read += 1
        if self.kind == "samples":
            return frame  # resized once when opened
        return fit_frame(frame, self.size)

    def __iter__(self) -> Iterator[np.ndarray]:
        while (frame := self.read()) is not None:
            yield frame

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def close(self) -> None:
        self._release()

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
