"""Latest-frame slots: drops, fairness, clearing (the threads over them: test_pipeline.py)."""

import threading
import time

import pytest

from ovseg_ros.ros.worker import Frame, LatestFrameSlots


def frame(camera, n):
    """A frame whose payload is just a sequence number."""
    return Frame(camera=camera, image=n, header=None)


def test_newer_frame_replaces_unprocessed_one_and_counts_a_drop():
    slots = LatestFrameSlots(["cam"])
    assert slots.put(frame("cam", 1)) is False
    assert slots.put(frame("cam", 2)) is True
    assert slots.put(frame("cam", 3)) is True
    assert slots.take(0).image == 3  # latest frame wins
    assert slots.take(0) is None
    assert slots.stats["cam"].received == 3 and slots.stats["cam"].dropped == 2


def test_cameras_are_served_in_turn():
    slots = LatestFrameSlots(["a", "b", "c"])
    order = []
    for _ in range(3):
        for cam in ("a", "b", "c"):
            slots.put(frame(cam, 0))
        for _ in range(3):
            order.append(slots.take(0).camera)
    assert order == ["a", "b", "c"] * 3
    # a busy camera cannot starve a quiet one
    slots.put(frame("a", 1))
    assert slots.take(0).camera == "a"
    slots.put(frame("a", 2))
    slots.put(frame("c", 1))
    assert [slots.take(0).camera, slots.take(0).camera] == ["c", "a"]


def test_take_times_out_and_close_wakes_waiters():
    slots = LatestFrameSlots(["cam"])
    start = time.monotonic()
    assert slots.take(0.05) is None
    assert time.monotonic() - start >= 0.04
    got = []
    waiter = threading.Thread(target=lambda: got.append(slots.take(None)))
    waiter.start()
    slots.close()
    waiter.join(2)
    assert not waiter.is_alive() and got == [None]


def test_unknown_camera_and_empty_camera_list_are_rejected():
    with pytest.raises(ValueError):
        LatestFrameSlots([])
    with pytest.raises(KeyError):
        LatestFrameSlots(["a"]).put(frame("b", 0))
