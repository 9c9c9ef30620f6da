"""Mask topics: unique, stable slugs, and MaskTopics' bookkeeping with stand-in publishers.

The node's own use (topics appearing, following the vocabulary, created on subscription) is tested
in test_node.py with real rclpy; here the rules are checked without ROS.
"""

import re
import threading

import pytest

from ovseg_ros.ros import masks as M
from ovseg_ros.ros.masks import MaskTopics, mask_slugs, topic_slug

TOPIC_PART = re.compile(r"[a-z][a-z0-9_]*")


def test_topic_slugs_are_topic_safe():
    assert topic_slug("Red Mug") == "red_mug"
    assert topic_slug("potted-plant (big)") == "potted_plant_big"
    assert topic_slug("3d printer") == "c_3d_printer"
    assert topic_slug("???") == "class"


def test_plain_names_keep_their_readable_topic():
    assert mask_slugs(["door", "Red Mug", "potted plant", "tv2"]) == [
        "door",
        "red_mug",
        "potted_plant",
        "tv2",
    ]


def test_look_alike_names_never_share_a_topic():
    # The case: "red mug", "red-mug" and "red_mug_1" gave two publishers on one topic.
    names = ["red mug", "red-mug", "red_mug_1", "red  mug!", "3d printer", "c 3d printer"]
    slugs = mask_slugs(names)
    assert len(set(slugs)) == len(slugs), slugs
    assert slugs[0] == "red_mug"
    for slug in slugs:
        assert TOPIC_PART.fullmatch(slug), slug


def test_a_name_keeps_its_topic_whatever_else_is_in_the_vocabulary():
    alone = mask_slugs(["red-mug"])[0]
    with_others = mask_slugs(["red mug", "door", "red-mug", "red_mug_1"])[2]
    assert alone == with_others and alone.startswith("red_mug_")
    assert mask_slugs(["Red-Mug"]) == mask_slugs(["red-mug"])  # case does not matter


def test_slugs_stay_unique_even_when_a_plain_name_spells_a_hash():
    hashed = mask_slugs(["red-mug"])[0]  # red_mug_<6 hex>
    impostor = hashed.replace("_", " ")  # a plain name that spells the same topic
    slugs = mask_slugs(["red-mug", impostor])
    assert len(set(slugs)) == 2


def test_thousands_of_names_get_unique_slugs():
    names = [f"thing-{i}" for i in range(5000)] + [f"thing {i}" for i in range(5000)]
    slugs = mask_slugs(names)
    assert len(set(slugs)) == len(slugs)


class FakePub:
    """A stand-in publisher: a topic, a subscriber count, what was published, destroyed or not."""

    def __init__(self, topic: str) -> None:
        self.topic_name = topic
        self.subscribers = 0
        self.sent = []
        self.destroyed = False

    def get_subscription_count(self) -> int:
        assert not self.destroyed, "used after destroy"
        return self.subscribers

    def publish(self, msg) -> None:
        assert not self.destroyed, "published after destroy"
        self.sent.append(msg)


class Graph:
    """create / destroy / subscribed callbacks for MaskTopics, recording what happened."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.destroyed: list[str] = []
        self.subscribers: dict[str, set[str]] = {}
        self.live: dict[str, FakePub] = {}

    def create(self, camera: str, slug: str) -> FakePub:
        topic = f"/ovseg/{camera + '/' if camera else ''}masks/{slug}"
        assert topic not in self.live, f"two publishers on {topic}"
        pub = FakePub(topic)
        self.live[topic] = pub
        self.created.append(slug)
        return pub

    def destroy(self, pub: FakePub) -> None:
        pub.destroyed = True
        del self.live[pub.topic_name]
        self.destroyed.append(pub.topic_name.rsplit("/", 1)[-1])

    def subscribed(self, camera: str) -> set[str]:
        return self.subscribers.get(camera, set())

    def topics(self, camera: str = "") -> set[str]:
        prefix = f"/ovseg/{camera + '/' if camera else ''}masks/"
        return {t[len(prefix) :] for t in self.live if t.startswith(prefix)}


def synced(topics: MaskTopics) -> None:
    while topics.sync():
        pass


def make(cameras=("",)):
    graph = Graph()
    return graph, MaskTopics(list(cameras), graph.create, graph.destroy, graph.subscribed)


def test_topics_follow_the_class_map_and_every_old_one_goes():
    graph, topics = make()
    topics.set_classes(mask_slugs(["door", "chair", "red mug"]), advertised=64, enabled=True)
    synced(topics)
    assert graph.topics() == {"door", "chair", "red_mug"}
    topics.set_classes(mask_slugs(["door", "window"]), advertised=64, enabled=True)
    synced(topics)
    assert graph.topics() == {"door", "window"}
    assert sorted(graph.destroyed) == ["chair", "red_mug"]
    assert graph.created.count("door") == 1  # kept, not re-created


def test_alternating_vocabularies_leak_no_publisher():
    # The issue: one publisher leaked per change with colliding slugs.
    graph, topics = make()
    a = ["red mug", "red-mug", "red_mug_1"] + [f"class {i}" for i in range(20)]
    b = ["red mug", "door"]
    for _ in range(5):
        topics.set_classes(mask_slugs(a), advertised=64, enabled=True)
        synced(topics)
        assert len(graph.live) == len(a)
        topics.set_classes(mask_slugs(b), advertised=64, enabled=True)
        synced(topics)
        assert graph.topics() == {"red_mug", "door"}
    assert len(graph.created) - len(graph.destroyed) == 2


def test_only_the_first_classes_are_advertised_others_on_subscription():
    graph, topics = make()
    names = [f"class {i}" for i in range(10_000)]
    slugs = mask_slugs(names)
    topics.set_classes(slugs, advertised=8, enabled=True)
    synced(topics)
    assert graph.topics() == set(slugs[:8])
    graph.subscribers[""] = {slugs[5000], "not_a_class"}
    synced(topics)
    assert graph.topics() == set(slugs[:8]) | {slugs[5000]}
    # The subscriber leaves: the topic stays a while, then goes.
    graph.subscribers[""] = set()
    synced(topics)
    assert slugs[5000] in graph.topics()
    topics._idle_since = {k: v - M.IDLE_SECONDS - 1 for k, v in topics._idle_since.items()}
    synced(topics)
    assert graph.topics() == set(slugs[:8])


def test_sync_works_in_batches():
    graph, topics = make()
    topics.set_classes(mask_slugs([f"class {i}" for i in range(100)]), 100, True)
    assert topics.sync() is True  # more to do
    assert len(graph.live) == M.SYNC_BATCH
    synced(topics)
    assert len(graph.live) == 100


def test_disabling_masks_removes_every_topic():
    graph, topics = make(cameras=("front", "rear"))
    topics.set_classes(["door", "chair"], 64, True)
    synced(topics)
    assert graph.topics("front") == graph.topics("rear") == {"door", "chair"}
    topics.set_classes(["door", "chair"], 64, False)
    synced(topics)
    assert not graph.live


def test_published_masks_use_the_frames_class_ids():
    graph, topics = make()
    topics.set_classes(["door", "chair"], 64, True)
    synced(topics)
    graph.live["/ovseg/masks/chair"].subscribers = 1
    assert topics.listened("")
    # A frame of a class map where chair is class 0 and door is absent.
    targets = topics.targets("", {"chair": 0, "sofa": 1})
    assert [cid for cid, _ in targets] == [0]
    assert topics.publish("", [(pub, f"mask of {cid}") for cid, pub in targets]) == 1
    assert graph.live["/ovseg/masks/chair"].sent == ["mask of 0"]


def test_a_publisher_removed_between_targets_and_publish_is_skipped():
    graph, topics = make()
    topics.set_classes(["door"], 64, True)
    synced(topics)
    graph.live["/ovseg/masks/door"].subscribers = 1
    targets = topics.targets("", {"door": 0})
    topics.set_classes(["window"], 64, True)
    synced(topics)  # door's publisher destroyed (FakePub asserts if used afterwards)
    assert topics.publish("", [(pub, "mask") for _, pub in targets]) == 0


def test_sync_and_the_frame_path_in_parallel_never_use_a_destroyed_publisher():
    graph, topics = make()
    vocabularies = [[f"a {i}" for i in range(40)], [f"b {i}" for i in range(3)], ["a 1", "b 1"]]
    stop = threading.Event()
    errors = []

    def frames() -> None:
        while not stop.is_set():
            try:
                for pub in list(graph.live.values()):
                    pub.subscribers = 1
                ids = {s: i for i, s in enumerate(mask_slugs(vocabularies[0]))}
                targets = topics.targets("", ids)
                topics.publish("", [(pub, cid) for cid, pub in targets])
                topics.listened("")
            except (AssertionError, RuntimeError) as exc:  # dict changed size is fine to retry
                if isinstance(exc, AssertionError):
                    errors.append(exc)

    thread = threading.Thread(target=frames)
    thread.start()
    try:
        for i in range(60):
            topics.set_classes(mask_slugs(vocabularies[i % 3]), 64, True)
            synced(topics)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("cap", [3])
def test_no_camera_gets_more_than_max_mask_topics(monkeypatch, cap):
    monkeypatch.setattr(M, "MAX_MASK_TOPICS", cap)
    graph, topics = make()
    slugs = mask_slugs([f"class {i}" for i in range(10)])
    topics.set_classes(slugs, 2, True)
    graph.subscribers[""] = set(slugs)
    synced(topics)
    assert len(graph.live) == cap
