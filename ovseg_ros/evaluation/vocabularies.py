"""Benchmark class files: classes in dataset id order, synonyms, and the background class.

File format (config/vocabularies/<name>.txt), one class per line in dataset label order::

    # comment; blank lines are skipped
    background: sky; wall; tree        <- the dataset's background class (optional, at most one)
    aeroplane                          <- one query, also the display name
    boat: ship                         <- display name "boat", query "ship"
    person; person in shirt            <- queries separated by ';' (the engine's synonym syntax)

A line is ``[name:] query; query; ...``; without ``name:`` the first query is the name. The class
named ``background`` holds the engine's background words: the engine's unlabeled prediction
(background words, probability threshold) is mapped to that class. Without a background class an
unlabeled prediction is a miss for the ground-truth class.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .metrics import IGNORE_INDEX

PACKAGE = "ovseg_ros"
BACKGROUND = "background"


@dataclass(frozen=True)
class EvalVocabulary:
    """Dataset classes in label order, each with its display name and text queries."""

    name: str
    source: str  # the file it came from, or "inline"
    names: tuple[str, ...]
    queries: tuple[tuple[str, ...], ...]
    background: int | None  # dataset id of the background class, if the dataset has one

    @property
    def num_classes(self) -> int:
        """Number of dataset classes (the background class included)."""
        return len(self.names)

    @property
    def background_words(self) -> list[str]:
        """Queries of the background class (the engine's background words); [] without one."""
        return [] if self.background is None else list(self.queries[self.background])

    def engine_ids(self) -> list[int]:
        """Dataset ids of the engine's classes in engine order (the background class is none)."""
        return [i for i in range(self.num_classes) if i != self.background]

    def engine_entries(self) -> list[str]:
        """The engine vocabulary: one 'query; synonym; ...' entry per non-background class."""
        return ["; ".join(self.queries[i]) for i in self.engine_ids()]

    def to_dataset(self, labels: np.ndarray, unlabeled: int) -> np.ndarray:
        """Map engine labels to dataset ids; unlabeled becomes the background id or 255 (a miss)."""
        lut = np.full(unlabeled + 1, IGNORE_INDEX, dtype=np.int32)
        lut[: self.num_classes - (self.background is not None)] = self.engine_ids()
        if self.background is not None:
            lut[unlabeled] = self.background
        return lut[labels]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready description."""
        return {
            "name": self.name,
            "source": self.source,
            "classes": [
                {"id": i, "name": n, "queries": list(q)}
                for i, (n, q) in enumerate(zip(self.names, self.queries, strict=True))
            ],
            "background_class": self.background,
        }


def parse_lines(lines: Sequence[str], name: str, source: str) -> EvalVocabulary:
    """Parse class-file lines (see the module docstring); ValueError names the bad line."""
    names: list[str] = []
    queries: list[tuple[str, ...]] = []
    background: int | None = None
    owner: dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        line = " ".join(raw.split())
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {lineno}"
        label, colon, rest = line.partition(":")
        display = label.strip() if colon else ""
        parts = [p.strip() for p in (rest if colon else line).split(";")]
        if colon and not display:
            raise ValueError(f"{where}: empty class name before ':'")
        is_background = (display or parts[0]).lower() == BACKGROUND
        parts = [p for p in parts if p] if is_background else parts
        if not is_background and (not parts or not all(parts)):
            raise ValueError(f"{where}: empty query in {line!r}")
        display = display or parts[0]
        if is_background:
            if background is not None:
                raise ValueError(
                    f"{where}: a second background class (first on class {background})"
                )
            background = len(names)
        else:
            # Background words may repeat a class query (the engine keeps it for the class);
            # two classes sharing a query could never be told apart.
            for q in parts:
                if owner.setdefault(q.lower(), len(names)) != len(names):
                    raise ValueError(
                        f"{where}: query {q!r} is also used by class {owner[q.lower()]} "
                        f"({names[owner[q.lower()]]!r})"
                    )
        names.append(display)
        queries.append(tuple(parts))
    if not names or len(names) == (background is not None):
        raise ValueError(f"{source}: no classes (one class per line, '#' for comments)")
    return EvalVocabulary(name, source, tuple(names), tuple(queries), background)


def vocabulary_dirs() -> list[Path]:
    """Where the shipped class files may be: source tree, ROS share folder, venv share folder."""
    # The source tree first: an editable install also copies the files into the venv's share
    # folder, and that copy goes stale when a class file is edited. An installed package has no
    # config/ two levels above this module, so there the share folders are used.
    roots = [Path(__file__).resolve().parents[2]]
    try:
        from ament_index_python.packages import get_package_share_directory

        roots.append(Path(get_package_share_directory(PACKAGE)))
    except Exception:  # noqa: BLE001 - not in a ROS workspace (no ament_index, or not indexed)
        pass
    roots.append(Path(sys.prefix) / "share" / PACKAGE)
    return [r / "config" / "vocabularies" for r in roots]


def available_vocabularies() -> list[str]:
    """Names of the shipped class files (e.g. voc21, ade20k)."""
    found = {p.stem for d in vocabulary_dirs() if d.is_dir() for p in d.glob("*.txt")}
    return sorted(found)


def find_vocabulary(name: str) -> Path:
    """The shipped class file called name; ValueError lists the known names."""
    for folder in vocabulary_dirs():
        path = folder / f"{name}.txt"
        if path.is_file():
            return path
    raise ValueError(
        f"no vocabulary called {name!r}; known: {', '.join(available_vocabularies()) or 'none'} "
        f"(looked in {', '.join(str(d) for d in vocabulary_dirs())}), or give a class file path"
    )


def load_vocabulary(spec: str | Path) -> EvalVocabulary:
    """Load a class file by shipped name ('voc21') or by path; ValueError if it cannot be."""
    path = Path(spec).expanduser()
    if not path.is_file():
        if path.suffix or len(path.parts) > 1:
            raise ValueError(f"vocabulary file {path} not found")
        path = find_vocabulary(str(spec))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read vocabulary file {path}: {exc}") from exc
    return parse_lines(text.splitlines(), path.stem, str(path))


def resolve_vocabulary(values: Sequence[str]) -> EvalVocabulary:
    """--vocabulary values: one shipped name or file path, or else the class lines themselves."""
    if len(values) == 1 and (Path(values[0]).is_file() or not any(c in values[0] for c in ";:")):
        return load_vocabulary(values[0])
    return parse_lines(list(values), "inline", "inline")
