"""The pairing rule between label images and class maps (classmap.py), without ROS.

The node side (ClassMapStamps) decides which outputs may go out and stamps each class map; the
client side (ClassMapHistory) picks a map by stamp. A simulation interleaves vocabulary changes,
frames of several cameras with jittered stamps, and a client that handles every class map before
the label images already queued (the order that mis-paired 12 of 11,028 frames before), and checks
that every published image is paired with the map it was labelled with.
"""

import json
import random

import pytest

from ovseg_ros.ros import classmap as C
from ovseg_ros.ros.classmap import ClassMapHistory, ClassMapStamps

S = 1_000_000_000  # one second in ns


def test_first_map_applies_from_the_start():
    stamps = ClassMapStamps()
    assert stamps.announce(1).stamp == 0
    assert stamps.admit(1, 5 * S) == (C.PUBLISH, None)


def test_a_new_map_is_stamped_just_after_the_newest_output():
    stamps = ClassMapStamps()
    stamps.announce(1)
    stamps.admit(1, 10 * S)
    stamps.admit(1, 12 * S)
    stamps.admit(1, 11 * S)  # another camera, a little behind
    assert stamps.announce(2).stamp == 12 * S + 1
    assert stamps.admit(1, 13 * S)[0] == C.OLDER_MAP  # labelled with the old map: discarded
    assert stamps.admit(2, 12 * S)[0] == C.BEFORE_MAP  # new map, but stamped before it applies
    assert stamps.admit(2, 12 * S + 1)[0] == C.PUBLISH


def test_maps_announced_back_to_back_share_a_stamp_and_never_go_back():
    stamps = ClassMapStamps()
    stamps.announce(1)
    stamps.admit(1, 10 * S)
    a, b = stamps.announce(2), stamps.announce(3)
    assert a.stamp == b.stamp == 10 * S + 1


def test_unstamped_frames_take_the_newest_map():
    stamps = ClassMapStamps()
    stamps.announce(1)
    stamps.admit(1, 10 * S)
    stamps.announce(2)
    assert stamps.admit(2, 0)[0] == C.PUBLISH
    assert stamps.admit(1, 0)[0] == C.OLDER_MAP
    history = ClassMapHistory()
    history.add(0, 1, "v1")
    history.add(10 * S + 1, 2, "v2")
    assert history.lookup(0) == "v2"


def test_one_late_frame_is_dropped_but_time_going_back_starts_a_new_epoch():
    stamps = ClassMapStamps()
    stamps.announce(1)
    stamps.admit(1, 100 * S)
    stamps.announce(2)  # stamp 100 s + 1 ns
    assert stamps.admit(2, 50 * S)[0] == C.BEFORE_MAP  # one late frame
    assert stamps.admit(2, 101 * S)[0] == C.PUBLISH  # the stream goes on: no jump
    outcomes = [stamps.admit(2, (3 + i) * S) for i in range(C.JUMP_FRAMES)]  # a bag restarts
    assert [o for o, _ in outcomes[:-1]] == [C.BEFORE_MAP] * (C.JUMP_FRAMES - 1)
    outcome, again = outcomes[-1]
    assert outcome == C.PUBLISH and again.version == 2 and again.stamp == (2 + C.JUMP_FRAMES) * S
    assert stamps.admit(2, 6 * S)[0] == C.PUBLISH
    # A client starts its history again from the re-announced, earlier map.
    history = ClassMapHistory()
    history.add(0, 1, "v1")
    history.add(100 * S + 1, 2, "v2")
    history.add(again.stamp, 2, "v2 again")
    assert history.lookup(6 * S) == "v2 again" and history.lookup(1 * S) is None


def test_history_keeps_the_last_maps_and_picks_by_stamp_then_version():
    history = ClassMapHistory(size=3)
    assert history.lookup(5) is None and history.newest is None
    history.add(0, 1, "v1")
    history.add(10, 2, "v2")
    history.add(10, 3, "v3")  # same stamp: the newer version wins
    assert history.lookup(9) == "v1" and history.lookup(10) == "v3" and history.lookup(99) == "v3"
    history.add(20, 4, "v4")
    assert history.lookup(5) is None  # v1 fell out of the history of 3
    assert history.newest == "v4"


def test_classmap_json_carries_stamp_and_mask_topics():
    vocab = {"version": 2, "unlabeled": 255, "classes": [{"id": 0, "name": "red-mug"}]}
    data = json.loads(C.classmap_json(vocab, 3 * S + 7, ["red_mug_abcdef"]))
    assert data["stamp"] == {"sec": 3, "nanosec": 7}
    assert data["classes"][0]["mask"] == "red_mug_abcdef"
    assert "mask" not in vocab["classes"][0]  # the caller's dict is left as it was


@pytest.mark.parametrize("seed", range(20))
def test_no_client_order_mispairs_under_churn(seed):
    """Random churn; the client drains class maps before queued labels, yet pairs every one."""
    rng = random.Random(seed)
    stamps = ClassMapStamps()
    version = 1
    sent_maps = [(stamps.announce(version).stamp, version)]
    in_flight: list[tuple[int, int]] = []  # (version labelled with, stamp) being segmented
    published: list[tuple[int, int]] = []  # (stamp, version) in publish order
    clock = {cam: 10 * S for cam in ("front", "rear", "arm")}
    for _ in range(2000):
        event = rng.random()
        if event < 0.08:  # a vocabulary change is swapped in and announced
            version += 1
            sent_maps.append((stamps.announce(version).stamp, version))
        elif event < 0.6:  # a camera frame is segmented with the current vocabulary
            cam = rng.choice(list(clock))
            clock[cam] += rng.randint(1, 60_000_000)
            in_flight.append((version if rng.random() < 0.9 else max(1, version - 1), clock[cam]))
        elif in_flight:  # a result reaches the publish step (out of order across cameras)
            labelled, stamp = in_flight.pop(rng.randrange(len(in_flight)))
            outcome, again = stamps.admit(labelled, stamp)
            assert again is None  # no time jump in this simulation
            if outcome == C.PUBLISH:
                published.append((stamp, labelled))
    # The client received every class map first (worst case), then the queued label images.
    history = ClassMapHistory(size=len(sent_maps))
    for stamp, v in sent_maps:
        history.add(stamp, v, v)
    assert published
    for stamp, labelled in published:
        assert history.lookup(stamp) == labelled, (stamp, labelled)
    # ...and with maps interleaved in publish order it is the same.
    assert [v for _, v in sent_maps] == sorted(v for _, v in sent_maps)
