"""Check that a workspace install left the distribution's Python packages as they were.

    python test/distro/untouched.py snapshot BEFORE.json  # before installing requirements-ros
    python test/distro/untouched.py check BEFORE.json     # after it: exit 1 with the reasons

`make test-jazzy` runs it around the install of requirements-ros.txt into a venv that holds the
Python side of ROS 2 Jazzy (test/distro/jazzy.txt). Two things are checked:

- every package the distribution provides (numpy, OpenCV, SciPy, scikit-learn, scikit-image,
  matplotlib, Pillow, PyYAML, the ros-* packages) has the version it had before;
- no installed package requires a pip build of OpenCV. On a real distribution `python3-opencv`
  comes from apt without pip metadata, so pip would install `opencv-python` beside it (and shadow
  it, cv_bridge's CV_8UC3 mismatch) for any package that asks; the simulated distribution here
  has pip metadata for OpenCV and would hide such a request, hence this explicit check.
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

# Distributions a ROS 2 machine gets from apt (rosdep keys in package.xml) that a workspace install
# must not replace. The ros-* wheels stand for the distribution's own ROS packages.
PROTECTED = (
    "numpy",
    "opencv-python",
    "opencv-python-headless",
    "opencv-contrib-python",
    "opencv-contrib-python-headless",
    "scipy",
    "scikit-learn",
    "scikit-image",
    "matplotlib",
    "pillow",
    "pyyaml",
)
OPENCV = re.compile(r"^opencv(-contrib)?-python(-headless)?$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Every installed distribution by normalised name -> version."""
    return {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}


def protected(versions: dict[str, str]) -> dict[str, str]:
    """The distro-provided subset of `versions`."""
    return {n: v for n, v in versions.items() if n in PROTECTED or n.startswith("ros-")}


def opencv_requesters() -> list[str]:
    """'package: requirement' for every installed package that asks pip for OpenCV."""
    found = []
    for dist in metadata.distributions():
        for req in dist.requires or []:
            name = re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0]
            if OPENCV.match(_norm(name)) and "extra ==" not in req:
                found.append(f"{dist.metadata['Name']}: {req}")
    return sorted(found)


def check(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The problems, one sentence each (empty when the distribution is untouched)."""
    problems = []
    for name, version in sorted(protected(before).items()):
        now = after.get(name)
        if now != version:
            problems.append(f"{name} changed from {version} to {now or 'nothing'}")
    for name in sorted(protected(after)):
        if name not in before and OPENCV.match(name):
            problems.append(f"{name} {after[name]} was installed beside the distribution's OpenCV")
    problems += [f"asks pip for OpenCV: {r}" for r in opencv_requesters()]
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("snapshot", "check"):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] == "snapshot":
        path.write_text(json.dumps(installed(), indent=1, sort_keys=True))
        print(f"distribution snapshot: {len(protected(installed()))} protected packages")
        return 0
    problems = check(json.loads(path.read_text()), installed())
    for line in problems:
        print(f"distribution changed: {line}", file=sys.stderr)
    if not problems:
        kept = protected(installed())
        print(
            f"distribution untouched: numpy {kept.get('numpy')}, opencv-python-headless "
            f"{kept.get('opencv-python-headless')} and {len(kept) - 2} more as they were"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
