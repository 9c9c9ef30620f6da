"""Latest-frame slots and the inference thread: drops, fairness, pause, rate limit, shutdown."""

import threading
import time

import pytest

from ovseg_ros.ros.worker import Frame, InferenceWorker, LatestFrameSlots


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


def test_worker_processes_frames_and_survives_exceptions():
    slots = LatestFrameSlots(["cam"])
    done = []
    finished = threading.Event()

    def process(f):
        if f.image == 1:
            raise RuntimeError("bad frame")
        done.append(f.image)
        finished.set()

    worker = InferenceWorker(slots, process)
    worker.start()
    try:
        slots.put(frame("cam", 1))
        deadline = time.monotonic() + 5
        while slots.stats["cam"].failed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        slots.put(frame("cam", 2))
        assert finished.wait(5)
    finally:
        assert worker.stop()
    assert done == [2]
    assert slots.stats["cam"].failed == 1 and slots.stats["cam"].processed == 1


def test_worker_drops_frames_under_overload_and_latency_stays_bounded():
    slots = LatestFrameSlots(["cam"])
    latencies = []

    def process(f):
        latencies.append(time.monotonic() - f.received)
        time.sleep(0.05)  # a slow model

    worker = InferenceWorker(slots, process)
    worker.start()
    try:
        for i in range(60):  # 200 Hz input for 0.3 s, 4x faster than the model
            slots.put(frame("cam", i))
            time.sleep(0.005)
    finally:
        assert worker.stop()
    stats = slots.stats["cam"]
    assert stats.dropped > 30
    assert stats.processed + stats.dropped <= stats.received
    # a frame waits at most one model run (plus scheduling), never a growing queue
    assert max(latencies) < 0.5


def test_pause_drops_waiting_frames_and_resume_continues():
    slots = LatestFrameSlots(["cam"])
    seen = []
    got = threading.Event()

    def process(f):
        seen.append(f.image)
        got.set()

    worker = InferenceWorker(slots, process)
    worker.set_enabled(False)
    worker.start()
    try:
        slots.put(frame("cam", 1))
        time.sleep(0.3)
        assert seen == []
        worker.set_enabled(False)  # pausing again clears what arrived meanwhile
        assert slots.stats["cam"].dropped == 1
        worker.set_enabled(True)
        slots.put(frame("cam", 2))
        assert got.wait(5)
    finally:
        assert worker.stop()
    assert seen == [2]


def test_max_rate_spaces_frame_starts():
    slots = LatestFrameSlots(["cam"])
    starts = []
    enough = threading.Event()

    def process(f):
        starts.append(time.monotonic())
        if len(starts) >= 3:
            enough.set()

    worker = InferenceWorker(slots, process, max_rate_hz=10.0)
    worker.start()
    feeder_stop = threading.Event()

    def feed():
        i = 0
        while not feeder_stop.is_set():
            slots.put(frame("cam", i))
            i += 1
            time.sleep(0.005)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        assert enough.wait(5)
    finally:
        feeder_stop.set()
        feeder.join()
        assert worker.stop()
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= 0.09


def test_stop_waits_for_the_frame_in_flight():
    slots = LatestFrameSlots(["cam"])
    started, finished = threading.Event(), threading.Event()

    def process(f):
        started.set()
        time.sleep(0.2)
        finished.set()

    worker = InferenceWorker(slots, process)
    worker.start()
    slots.put(frame("cam", 0))
    assert started.wait(5)
    assert worker.stop(timeout=5)
    assert finished.is_set()
    with pytest.raises(RuntimeError):
        worker.start()
