"""Which class map a label image uses: a rule by stamps that a client cannot get wrong.

Every class map the node announces (``~/vocabulary``, ``~/label_info``) carries a stamp S: in the
JSON's ``"stamp"`` and in LabelInfo's header. The node guarantees:

* every labelled output stamped at or after S uses that class map or a newer one, and every output
  stamped before S uses an older one (an output that would break this is discarded, and counted);
* S of successive class maps never decreases (several maps may share one S: the newest wins).

So a client keeps the last few class maps and, for each label image, takes the one with the
greatest stamp not after the image's stamp (ties: the higher version) — whatever order the
messages are handled in. ``ClassMapHistory`` does exactly that. S is one nanosecond after the
newest stamp the node has published (0 before the first output), so maps apply from the next frame
on, in the cameras' own clock.

Two exceptions, both documented: frames with an unset stamp (0) cannot be paired by stamp and take
the newest class map; and when the input stamps jump back in time (a bag restarting, simulation
reset), after ``JUMP_FRAMES`` consecutive frames more than ``JUMP_SECONDS`` older than S, the node
announces the current class map again with the new, lower stamp; a client that receives a class
map stamped before the previous one starts its history again from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: A frame this much older than the class map's stamp may mean that time went back.
JUMP_SECONDS = 1.0
#: Consecutive such frames that make it a time jump rather than one late frame.
JUMP_FRAMES = 3
#: Class maps a ClassMapHistory keeps.
HISTORY = 8

# Outcomes of ClassMapStamps.admit().
PUBLISH = "publish"
OLDER_MAP = "older_map"  # labelled with a class map older than the one announced
BEFORE_MAP = "before_map"  # labelled with the newest map but stamped before it was announced


def stamp_ns(header: Any) -> int:
    """A header stamp in integer nanoseconds (0 when unset)."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def stamp_from_dict(data: Any) -> int:
    """The nanoseconds of a JSON {"sec", "nanosec"} stamp; 0 when it is missing or malformed."""
    if not isinstance(data, dict):
        return 0
    try:
        return int(data.get("sec", 0)) * 1_000_000_000 + int(data.get("nanosec", 0))
    except (TypeError, ValueError):
        return 0


def stamp_dict(ns: int) -> dict[str, int]:
    """{"sec", "nanosec"} of a stamp in nanoseconds (the JSON form of builtin_interfaces/Time)."""
    return {"sec": ns // 1_000_000_000, "nanosec": ns % 1_000_000_000}


@dataclass
class Announcement:
    """A class map as announced: its version and stamp S (ns)."""

    version: int
    stamp: int


class ClassMapStamps:
    """The node's side of the rule: stamps of announced maps, and which outputs may go out.

    Not thread-safe on its own: the node calls it under its output lock.
    """

    def __init__(self) -> None:
        """Nothing announced, nothing published."""
        self.current: Announcement | None = None
        self.newest_published = 0  # greatest stamp published since the last reset (ns)
        self._behind = 0  # consecutive frames far older than the current stamp

    def announce(self, version: int) -> Announcement:
        """Stamp a new class map: one ns after the newest published output (0 if none)."""
        stamp = self.newest_published + 1 if self.newest_published else 0
        if self.current is not None:
            stamp = max(stamp, self.current.stamp)
        self.current = Announcement(version, stamp)
        return self.current

    def admit(self, version: int, stamp: int) -> tuple[str, Announcement | None]:
        """Whether an output of class map `version` stamped `stamp` (ns) may be published.

        Returns (outcome, announcement): the announcement is a re-announcement of the current map
        with a lower stamp after a jump back in time, to be published before the output.
        """
        current = self.current
        if current is None or version < current.version:
            return OLDER_MAP, None
        if stamp == 0:
            return PUBLISH, None  # unstamped frames cannot be paired by stamp
        if stamp >= current.stamp:
            self._behind = 0
            self.newest_published = max(self.newest_published, stamp)
            return PUBLISH, None
        if current.stamp - stamp <= JUMP_SECONDS * 1e9:
            return BEFORE_MAP, None
        self._behind += 1
        if self._behind < JUMP_FRAMES:
            return BEFORE_MAP, None
        # Time went back: the current map applies from this stamp on, in the new epoch.
        self._behind = 0
        self.current = Announcement(current.version, stamp)
        self.newest_published = stamp
        return PUBLISH, self.current


def classmap_json(vocab_dict: dict[str, Any], stamp: int, slugs: list[str]) -> str:
    """The ``~/vocabulary`` payload: the vocabulary's dict, its stamp and each class's mask slug."""
    data = dict(vocab_dict)
    data["stamp"] = stamp_dict(stamp)
    data["classes"] = [
        {**entry, "mask": slug} for entry, slug in zip(data["classes"], slugs, strict=True)
    ]
    return json.dumps(data, separators=(",", ":"))


class ClassMapHistory:
    """The client's side: the last class maps received, and the one a label image uses."""

    def __init__(self, size: int = HISTORY) -> None:
        """An empty history keeping at most `size` maps."""
        self.size = size
        self._maps: list[tuple[int, int, Any]] = []  # (stamp ns, version, map), oldest first

    def add(self, stamp: int, version: int, classmap: Any) -> None:
        """Take a class map; one stamped before the newest kept one starts the history anew."""
        if self._maps and stamp < self._maps[-1][0]:
            self._maps.clear()  # the node's input time jumped back
        self._maps.append((stamp, version, classmap))
        self._maps.sort(key=lambda m: (m[0], m[1]))
        del self._maps[: -self.size]

    def lookup(self, stamp: int) -> Any | None:
        """The map of an output stamped `stamp` (ns): greatest stamp <= it, then highest version.

        Unstamped outputs (0) take the newest map. None when no kept map is old enough.
        """
        if not self._maps:
            return None
        if stamp == 0:
            return self._maps[-1][2]
        chosen = None
        for map_stamp, _, classmap in self._maps:
            if map_stamp <= stamp:
                chosen = classmap
        return chosen

    @property
    def newest(self) -> Any | None:
        """The most recent class map, or None."""
        return self._maps[-1][2] if self._maps else None
