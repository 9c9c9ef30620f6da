"""Tests of the sample camera's frame sources: sizes, resizing, photos, folders, videos, webcams."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from camerautil import solid, write_png

from ovseg_ros.ros.camera.sources import FrameSource, SourceError, fit_frame, parse_size

# --- sizes and resizing --------------------------------------------------------------------


def test_parse_size():
    assert parse_size("640x480") == (640, 480)
    assert parse_size(" 32X24 ") == (32, 24)
    assert parse_size("native") is None
    for bad in ("640", "640x", "x480", "-1x5", "0x10", "axb", "640x480x3", "99999x10"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_fit_frame_keeps_aspect_and_crops_the_centre():
    # Three vertical bands (red, green, blue), 300x100: a 100x100 frame is the green middle.
    image = np.concatenate(
        [solid(100, 100, (255, 0, 0)), solid(100, 100, (0, 255, 0)), solid(100, 100, (0, 0, 255))],
        axis=1,
    )
    out = fit_frame(image, (100, 100))
    assert out.shape == (100, 100, 3) and out.flags.c_contiguous
    assert (out == (0, 255, 0)).all()
    # Enlarging a 30x10 strip to 60x60 scales by 6 (180x60), then keeps the green middle.
    small = np.ascontiguousarray(image[::10, ::10])
    assert (fit_frame(small, (60, 60))[:, 10:50] == (0, 255, 0)).all()
    # Same aspect: a plain resize. None: unchanged.
    assert fit_frame(image, (150, 50)).shape == (50, 150, 3)
    assert fit_frame(image, None) is not None and fit_frame(image, None).shape == image.shape


# --- frame sources -------------------------------------------------------------------------


def test_samples_source_loops_and_stops_with_once():
    frames = FrameSource.samples(size=(64, 48), loop=True)
    first = [frames.read() for _ in range(6)]
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in first)
    assert not np.array_equal(first[0], first[1])
    np.testing.assert_array_equal(first[5], first[0])  # 5 photos, then again from the start
    once = list(FrameSource.samples(size=(64, 48), loop=False))
    assert len(once) == 5
    native = list(FrameSource.samples(size=None, loop=False))
    assert native[0].shape == (512, 512, 3)  # the astronaut at its own size
    assert "5 sample photos" in FrameSource.samples(size=(64, 48)).describe()


def test_folder_source_sorted_rgb_and_skips_broken_files(tmp_path):
    write_png(tmp_path / "b.png", solid(30, 40, (0, 255, 0)))
    write_png(tmp_path / "a.png", solid(30, 40, (255, 0, 0)))
    write_png(tmp_path / "c.PNG", solid(60, 80, (0, 0, 255)))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"definitely not a jpeg")
    warnings = []
    source = FrameSource.folder(tmp_path, size=(20, 15), loop=False, warn=warnings.append)
    frames = list(source)
    assert [tuple(f[0, 0]) for f in frames] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert all(f.shape == (15, 20, 3) for f in frames)
    assert len(warnings) == 1 and "broken.jpg" in warnings[0]
    assert source.read() is None
    looping = FrameSource.folder(tmp_path, size=None, loop=True, warn=warnings.append)
    colours = [tuple(looping.read()[0, 0]) for _ in range(4)]
    assert colours == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 0)]
    assert len(warnings) == 2  # one warning per source for the broken file, not one per pass


def test_folder_source_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist") as err:
        FrameSource.folder(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(err.value)
    with pytest.raises(SourceError, match="has no images"):
        FrameSource.folder(tmp_path)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="none of the 1 images"):
        FrameSource.folder(tmp_path, warn=lambda _text: None)
    with pytest.raises(SourceError, match="is not a folder"):
        FrameSource.folder(tmp_path / "x.png")


def write_video(path: Path, colours: list[tuple[int, int, int]], size=(64, 48)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened()
    for rgb in colours:
        writer.write(cv2.cvtColor(solid(size[1], size[0], rgb), cv2.COLOR_RGB2BGR))
    writer.release()


def test_video_source(tmp_path):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    path = tmp_path / "clip.avi"
    write_video(path, colours)
    frames = list(FrameSource.video(path, size=(32, 24), loop=False))
    assert len(frames) == 4
    for frame, colour in zip(frames, colours, strict=True):
        assert frame.shape == (24, 32, 3)
        assert np.abs(frame.reshape(-1, 3).mean(0) - colour).max() < 12  # JPEG-compressed
    looping = FrameSource.video(path, size=None, loop=True)
    got = [looping.read() for _ in range(6)]
    assert got[0].shape == (48, 64, 3)
    np.testing.assert_array_equal(got[4], got[0])  # rewound after the last frame
    np.testing.assert_array_equal(got[5], got[1])
    looping.close()


def test_video_and_webcam_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        FrameSource.video(tmp_path / "missing.avi")
    text = tmp_path / "clip.avi"
    text.write_text("this is not a video")
    with pytest.raises(SourceError, match="clip.avi"):
        FrameSource.video(text)
    if not Path("/dev/video63").exists():
        with pytest.raises(SourceError, match="webcam 63"):
            FrameSource.webcam(63)
