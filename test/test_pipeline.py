"""The frame pipeline (pipeline.py): overlapping stages, bounded hand-offs, batching, counters.

The stages are plain callables here (no ROS, no model): a frame's payload is a small numpy array
whose shape stands for the camera's image size and whose first value is a sequence number.
"""

import threading
import time

import numpy as np
import pytest

from ovseg_ros.ros.pipeline import Decoded, FramePipeline
from ovseg_ros.ros.worker import Frame, LatestFrameSlots


def frame(camera, n, shape=(2, 2, 3)):
    image = np.full(shape, n, dtype=np.int64)
    return Frame(camera=camera, image=image, header=n)


def decode_all(f):
    return Decoded(f, f.image)


def segment_each(images):
    return [int(image.flat[0]) for image in images]


class Pipe:
    """A pipeline with recording stages; stop() is checked on exit."""

    def __init__(
        self, cameras=("cam",), decode=decode_all, segment=segment_each, publish=None, **kwargs
    ):
        self.slots = LatestFrameSlots(list(cameras))
        self.published = []
        self.lock = threading.Lock()

        def record(item, result):
            with self.lock:
                self.published.append((item.camera, result))

        self.pipeline = FramePipeline(self.slots, decode, segment, publish or record, **kwargs)

    def __enter__(self):
        self.pipeline.start()
        return self

    def __exit__(self, *exc):
        assert self.pipeline.stop(timeout=5)

    def put(self, *frames):
        for f in frames:
            self.slots.put(f)

    def wait(self, predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def stats(self, camera="cam"):
        return self.slots.stats[camera]


def test_frames_go_through_decode_segment_and_publish():
    with Pipe() as p:
        p.put(frame("cam", 7))
        assert p.wait(lambda: p.published == [("cam", 7)])
        assert p.wait(p.pipeline.idle)
    s = p.stats()
    assert (s.received, s.processed, s.dropped, s.failed) == (1, 1, 0, 0)


@pytest.mark.parametrize("stage", ["decode", "segment", "publish"])
def test_an_exception_in_any_stage_is_counted_and_the_next_frame_still_goes_through(stage):
    def decode(f):
        if stage == "decode" and f.header == 1:
            raise RuntimeError("bad frame")
        return Decoded(f, f.image)

    def segment(images):
        if stage == "segment" and images[0].flat[0] == 1:
            raise RuntimeError("bad model input")
        return segment_each(images)

    published = []

    def publish(item, result):
        if stage == "publish" and result == 1:
            raise RuntimeError("bad output")
        published.append(result)

    with Pipe(decode=decode, segment=segment, publish=publish) as p:
        p.put(frame("cam", 1))
        assert p.wait(lambda: p.stats().failed == 1)
        p.put(frame("cam", 2))
        assert p.wait(lambda: published == [2])
        assert p.wait(p.pipeline.idle)
    assert p.stats().processed == 1


def test_a_frame_that_needs_no_work_counts_as_processed_and_is_not_segmented():
    calls = []

    def segment(images):
        calls.append(len(images))
        return segment_each(images)

    with Pipe(decode=lambda f: None, segment=segment) as p:
        p.put(frame("cam", 1))
        assert p.wait(lambda: p.stats().processed == 1)
    assert calls == [] and p.published == []


def test_the_stages_overlap():
    """Frame 1 is published while frame 2 is segmented and frame 3 decoded (deadlock if serial)."""
    second_segmenting = threading.Event()
    third_decoded = threading.Event()
    order = []

    def decode(f):
        if f.header == 3:
            third_decoded.set()
        return Decoded(f, f.image)

    def segment(images):
        n = int(images[0].flat[0])
        order.append(f"segment {n}")
        if n == 2:
            second_segmenting.set()
            assert third_decoded.wait(5), "frame 3 was not decoded while frame 2 was segmented"
        return [n]

    def publish(item, n):
        if n == 1:
            assert second_segmenting.wait(5), "frame 2 was not segmented while 1 was published"
        order.append(f"publish {n}")

    with Pipe(decode=decode, segment=segment, publish=publish) as p:
        p.put(frame("cam", 1))
        assert p.wait(lambda: "segment 1" in order)
        p.put(frame("cam", 2))
        assert p.wait(second_segmenting.is_set)
        p.put(frame("cam", 3))
        assert p.wait(lambda: "publish 3" in order)
    assert p.stats().failed == 0
    assert [e for e in order if e.startswith("publish")] == ["publish 1", "publish 2", "publish 3"]


def test_inference_never_runs_more_than_one_batch_ahead_of_publishing():
    segmented, published = [], []
    gate = threading.Event()

    def segment(images):
        segmented.append(int(images[0].flat[0]))
        return segment_each(images)

    def publish(item, n):
        gate.wait(5)  # a slow publisher
        published.append(n)

    with Pipe(segment=segment, publish=publish) as p:
        for i in range(30):
            p.put(frame("cam", i))
            time.sleep(0.005)
        # One frame being published, one handed over, one segmented and waiting: no more.
        assert len(segmented) <= 3
        gate.set()
        assert p.wait(lambda: p.pipeline.idle() and len(published) == len(segmented))
    assert published == sorted(published)  # in the order they were segmented
    s = p.stats()
    assert s.processed + s.dropped == s.received == 30


def test_overload_drops_frames_and_latency_stays_bounded():
    latencies = []

    def segment(images):
        time.sleep(0.05)  # a slow model
        return segment_each(images)

    def publish(item, n):
        latencies.append(time.monotonic() - item.frame.received)

    with Pipe(segment=segment, publish=publish) as p:
        for i in range(60):  # 200 Hz for 0.3 s, 4x faster than the model
            p.put(frame("cam", i))
            time.sleep(0.005)
        assert p.wait(p.pipeline.idle)
    s = p.stats()
    assert s.dropped > 30
    assert s.processed + s.dropped == s.received
    assert max(latencies) < 0.5  # a frame waits about one model run, never a growing queue


def test_cameras_of_one_size_share_a_pass_and_other_sizes_get_their_own():
    batches = []
    release = threading.Event()

    def segment(images):
        release.wait(5)
        batches.append(sorted(int(i.flat[0]) for i in images))
        return segment_each(images)

    with Pipe(cameras=("a", "b", "c"), segment=segment) as p:
        p.put(frame("a", 0))  # taken alone: the pipeline was idle
        assert p.wait(lambda: not p.slots.stats["a"].received or p.pipeline.busy.is_set())
        time.sleep(0.05)
        p.put(frame("a", 1), frame("b", 2), frame("c", 3, shape=(4, 4, 3)))
        assert p.wait(
            lambda: (
                len(p.pipeline._decoded) == 3
                and all(p.pipeline._decoded[c] is not None for c in "abc")
            )
        )
        release.set()
        assert p.wait(lambda: len(p.published) == 4)
    assert batches[0] == [0]
    assert sorted(batches[1:]) == [[1, 2], [3]]
    assert p.pipeline.batches == 1
    assert sorted(p.published) == [("a", 0), ("a", 1), ("b", 2), ("c", 3)]


def test_batching_off_serves_cameras_one_at_a_time_in_turn():
    sizes = []
    release = threading.Event()

    def segment(images):
        release.wait(5)
        sizes.append(len(images))
        return segment_each(images)

    with Pipe(cameras=("a", "b"), segment=segment, batch=False) as p:
        p.put(frame("a", 0))
        time.sleep(0.05)
        p.put(frame("a", 1), frame("b", 2))
        assert p.wait(lambda: all(p.pipeline._decoded[c] is not None for c in "ab"))
        release.set()
        assert p.wait(lambda: len(p.published) == 3)
    assert sizes == [1, 1, 1]
    # After camera a's frame 0, camera b is next in turn.
    assert [c for c, _ in p.published] == ["a", "b", "a"]


def test_inference_takes_a_newer_frame_over_the_one_decoded_ahead():
    release = threading.Event()
    seen, decoded = [], []

    def decode(f):
        decoded.append(f.header)
        return Decoded(f, f.image)

    def segment(images):
        release.wait(5)
        seen.append(int(images[0].flat[0]))
        return segment_each(images)

    with Pipe(decode=decode, segment=segment) as p:
        p.put(frame("cam", 0))
        assert p.wait(lambda: p.pipeline._decoded["cam"] is None and p.pipeline.busy.is_set())
        p.put(frame("cam", 1))  # decoded ahead: the slot was empty
        assert p.wait(lambda: (d := p.pipeline._decoded["cam"]) is not None and d.frame.header == 1)
        for i in (2, 3):  # wait raw, the decoded slot being full
            p.put(frame("cam", i))
        time.sleep(0.1)
        assert decoded == [0, 1]
        release.set()
        assert p.wait(lambda: len(seen) == 2 and p.pipeline.idle())
    assert seen == [0, 3]  # inference starts on the newest frame
    assert decoded == [0, 1, 3]  # frame 2 was replaced raw, never decoded
    s = p.stats()
    assert (s.received, s.processed, s.dropped) == (4, 2, 2)


def test_a_camera_faster_than_the_model_costs_at_most_two_decodes_per_pass():
    decodes, passes = [], []

    def decode(f):
        decodes.append(f.header)
        return Decoded(f, f.image)

    def segment(images):
        passes.append(int(images[0].flat[0]))
        time.sleep(0.05)  # a slow model
        return segment_each(images)

    with Pipe(decode=decode, segment=segment) as p:
        for i in range(60):  # 200 Hz, ten frames per pass
            p.put(frame("cam", i))
            time.sleep(0.005)
        assert p.wait(p.pipeline.idle)
    assert len(decodes) <= 2 * len(passes) + 2
    s = p.stats()
    assert s.processed + s.dropped == s.received == 60


def test_pause_drops_raw_and_decoded_frames_and_resume_continues():
    with Pipe() as p:
        p.pipeline.set_enabled(False)
        p.put(frame("cam", 1))
        time.sleep(0.3)
        assert p.published == []
        p.pipeline.set_enabled(False)  # pausing again clears what arrived meanwhile
        assert p.stats().dropped == 1
        assert p.pipeline.idle()
        p.pipeline.set_enabled(True)
        p.put(frame("cam", 2))
        assert p.wait(lambda: p.published == [("cam", 2)])


def test_max_rate_spaces_the_passes():
    starts = []

    def segment(images):
        starts.append(time.monotonic())
        return segment_each(images)

    with Pipe(segment=segment, max_rate_hz=10.0) as p:
        for i in range(80):
            p.put(frame("cam", i))
            time.sleep(0.005)
            if len(starts) >= 3:
                break
        assert p.wait(lambda: len(starts) >= 3)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= 0.09


def test_stop_finishes_the_frames_in_hand():
    segmenting, published = threading.Event(), []

    def segment(images):
        segmenting.set()
        time.sleep(0.2)
        return segment_each(images)

    p = Pipe(segment=segment, publish=lambda item, n: published.append(n))
    p.pipeline.start()
    p.put(frame("cam", 5))
    assert segmenting.wait(5)
    assert p.pipeline.stop(timeout=5)
    assert published == [5] and p.pipeline.idle()
    with pytest.raises(RuntimeError):
        p.pipeline.start()


def test_each_frame_carries_the_time_of_its_forward_pass():
    """The node's 'inference ms' adds decode, this and its outputs, not the hand-off waits."""
    times = []

    def segment(images):
        time.sleep(0.05)
        return segment_each(images)

    def publish(item, n):
        times.append(item.segment_ms)

    with Pipe(segment=segment, publish=publish) as p:
        p.put(frame("cam", 1))
        assert p.wait(lambda: len(times) == 1)
    assert 50.0 <= times[0] < 500.0


def test_a_frame_decoded_after_a_newer_one_went_into_inference_is_dropped():
    """Inference takes decoded frame 1 and, looking for a newer raw frame, finds frame 3, while
    the decode thread (woken by the emptied slot) is still decoding frame 2: frame 2, decoded
    last, must not be published after frame 3."""
    gate, in_decode = threading.Event(), threading.Event()
    segmenting, release = threading.Event(), threading.Event()

    def decode(f):
        if f.header == 2:
            in_decode.set()
            gate.wait(5)
        return Decoded(f, f.image)

    def segment(images):
        if images[0].flat[0] == 0:
            segmenting.set()
            release.wait(5)
        return segment_each(images)

    with Pipe(decode=decode, segment=segment) as p:
        take_camera = p.slots.take_camera

        def newer_frame_race(camera):
            # Between taking decoded frame 1 and looking for a newer raw frame: frame 2 arrives
            # and the decode thread takes it; then frame 3 arrives.
            p.slots.take_camera = take_camera
            p.put(frame("cam", 2))
            assert in_decode.wait(5)
            p.put(frame("cam", 3))
            return take_camera(camera)

        p.put(frame("cam", 0))
        assert segmenting.wait(5)  # frame 0 in the model
        p.put(frame("cam", 1))
        assert p.wait(lambda: p.pipeline._decoded["cam"] is not None)  # decoded ahead
        p.slots.take_camera = newer_frame_race
        release.set()
        assert p.wait(lambda: [r for _, r in p.published] == [0, 3])
        gate.set()
        assert p.wait(lambda: p.stats().dropped == 2)  # frame 1 (replaced), frame 2 (late)
        assert p.wait(p.pipeline.idle)
        time.sleep(0.05)
    assert [r for _, r in p.published] == [0, 3]
    s = p.stats()
    assert (s.received, s.processed, s.dropped, s.failed) == (4, 2, 2, 0)
