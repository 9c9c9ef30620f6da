"""Per-class mask topics: unique, stable names, and publishers made only on the executor thread.

A class's mask is published on ``~/[<camera>/]masks/<slug>``. The slug of a plain name (lower-case
letters, digits and single spaces, case ignored) is the name with underscores: "Red mug" ->
``red_mug``. Any other name gets its cleaned form plus six hex digits of a hash of the name:
"red-mug" -> ``red_mug_<hash>``, "red_mug_1" -> ``red_mug_1_<hash>``. So a name always gets the
same topic whatever else is in the vocabulary, and two names never share one; the class map on
``~/vocabulary`` carries each class's slug.

Publishers are created and destroyed only by ``MaskTopics.sync`` (an executor callback), never from
the inference or reconfiguration threads: rclpy raises InvalidHandle when an entity it is waiting
on is destroyed from another thread. The frame path takes a snapshot under the lock and publishes
under it; sync removes a publisher from the map under the same lock before destroying it, so a
destroyed publisher is never used. The first ``advertised`` classes of a vocabulary get their
topics at once; any other class's topic is created when something subscribes to it (found in the
ROS graph on the next sync) and removed when its class leaves the vocabulary or when it has had no
subscriber for a while, so thousands of classes never mean thousands of DDS writers.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

#: Publishers created or destroyed per sync call, so the executor keeps serving frames meanwhile.
SYNC_BATCH = 32
#: Most mask publishers of one camera, whatever the vocabulary and the subscribers.
MAX_MASK_TOPICS = 1024
#: Seconds a subscriber-made (not advertised) mask topic lives on without subscribers.
IDLE_SECONDS = 10.0

_PLAIN = re.compile(r"[a-z][a-z0-9]*( [a-z0-9]+)*")


def topic_slug(name: str) -> str:
    """A class name made topic-safe: lower case, [a-z0-9_], not starting with a digit."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not slug:
        slug = "class"
    if slug[0].isdigit():
        slug = "c_" + slug
    return slug


def _hashed(name: str) -> str:
    digest = hashlib.sha1(" ".join(name.lower().split()).encode()).hexdigest()[:6]
    return f"{topic_slug(name)}_{digest}"


def mask_slugs(names: Sequence[str]) -> list[str]:
    """One slug per class name: unique within the list, the same for a name in any list."""
    slugs = []
    for name in names:
        lowered = " ".join(name.lower().split())
        slugs.append(lowered.replace(" ", "_") if _PLAIN.fullmatch(lowered) else _hashed(name))
    # Hash collisions (or a plain name that spells another's hash) are astronomically rare; the
    # class id keeps the slugs unique even then.
    seen: dict[str, int] = {}
    for i, slug in enumerate(slugs):
        if slug in seen:
            slugs[i] = f"{slug}_{i}"
        seen[slugs[i]] = i
    return slugs


class MaskTopics:
    """The mask publishers of every camera for the class map in force, kept in step with it.

    `create(camera, slug)` and `destroy(publisher)` make and drop a publisher (the node's
    create_publisher / destroy_publisher); `subscribed(camera)` lists the slugs under the camera's
    masks/ namespace that some node in the graph subscribes to. Only `sync` calls them.
    """

    def __init__(
        self,
        cameras: Sequence[str],
        create: Callable[[str, str], Any],
        destroy: Callable[[Any], None],
        subscribed: Callable[[str], set[str]],
    ) -> None:
        """No topics until a class map is set and sync runs."""
        self._create = create
        self._destroy = destroy
        self._subscribed = subscribed
        self._lock = threading.Lock()
        self._pubs: dict[str, dict[str, Any]] = {c: {} for c in cameras}
        self._idle_since: dict[tuple[str, str], float] = {}
        self._slugs: list[str] = []
        self._ids: dict[str, int] = {}
        self._advertised = 0
        self._enabled = True

    def set_classes(self, slugs: Sequence[str], advertised: int, enabled: bool) -> None:
        """The class map in force (its slugs), how many to advertise, whether masks are on."""
        with self._lock:
            self._slugs = list(slugs)
            self._ids = {s: i for i, s in enumerate(self._slugs)}
            self._advertised = max(0, advertised)
            self._enabled = enabled

    def targets(self, camera: str, slugs_of_frame: dict[str, int]) -> list[tuple[int, Any]]:
        """(class id in the frame's class map, publisher) of the masks someone listens to."""
        out = []
        with self._lock:  # sync destroys publishers only after taking them out under this lock
            for slug, pub in self._pubs[camera].items():
                cid = slugs_of_frame.get(slug)
                if cid is not None and pub.get_subscription_count() > 0:
                    out.append((cid, pub))
        return out

    def listened(self, camera: str) -> bool:
        """Whether any mask topic of the camera has a subscriber now."""
        with self._lock:
            return any(p.get_subscription_count() > 0 for p in self._pubs[camera].values())

    def publish(self, camera: str, messages: list[tuple[Any, Any]]) -> int:
        """Publish (publisher, message) pairs whose publisher is still in the map; how many.

        The messages are built by the caller beforehand: only the liveness check and the publish
        calls hold the lock that sync (the executor thread) needs.
        """
        sent = 0
        with self._lock:
            live = self._pubs[camera]
            for pub, msg in messages:
                if live.get(self._slug_of(pub)) is pub:
                    pub.publish(msg)
                    sent += 1
        return sent

    @staticmethod
    def _slug_of(pub: Any) -> str:
        return pub.topic_name.rsplit("/", 1)[-1]

    def count(self, camera: str) -> int:
        """Mask publishers of a camera now."""
        with self._lock:
            return len(self._pubs[camera])

    def sync(self) -> bool:
        """Create and destroy up to SYNC_BATCH publishers; True when more work remains."""
        budget = SYNC_BATCH
        now = time.monotonic()
        with self._lock:
            slugs, ids, advertised, enabled = (
                self._slugs,
                self._ids,
                self._advertised,
                self._enabled,
            )
        for camera in list(self._pubs):
            wanted: list[str] = []
            if enabled:
                wanted = slugs[:advertised]
                extra = sorted(
                    (s for s in self._subscribed(camera) if s in ids and ids[s] >= advertised),
                    key=ids.__getitem__,
                )
                wanted = (wanted + extra)[:MAX_MASK_TOPICS]
            wanted_set = set(wanted)
            with self._lock:
                current = dict(self._pubs[camera])
            # Drop publishers of classes that left, or subscriber-made ones idle for a while.
            stale = []
            for slug, pub in current.items():
                key = (camera, slug)
                if slug not in ids or not enabled:
                    stale.append(slug)
                    continue
                if ids[slug] < advertised:
                    self._idle_since.pop(key, None)
                    continue
                if slug in wanted_set or pub.get_subscription_count() > 0:
                    self._idle_since.pop(key, None)
                    continue
                if now - self._idle_since.setdefault(key, now) > IDLE_SECONDS:
                    stale.append(slug)
            for slug in stale[:budget]:
                with self._lock:
                    pub = self._pubs[camera].pop(slug)
                self._idle_since.pop((camera, slug), None)
                self._destroy(pub)
                budget -= 1
            if budget <= 0:
                return True
            missing = [s for s in wanted if s not in current]
            room = MAX_MASK_TOPICS - (len(current) - min(len(stale), SYNC_BATCH))
            for slug in missing[: max(0, min(budget, room))]:
                pub = self._create(camera, slug)
                with self._lock:
                    self._pubs[camera][slug] = pub
                budget -= 1
            if budget <= 0:
                return True
        return False

    def close(self) -> None:
        """Destroy every publisher (node shutdown, executor no longer spinning)."""
        with self._lock:
            pubs = [p for cam in self._pubs.values() for p in cam.values()]
            for cam in self._pubs.values():
                cam.clear()
        for pub in pubs:
            self._destroy(pub)
