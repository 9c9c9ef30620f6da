"""The DDS environment of the sample camera, set before rclpy starts.

``configure_environment`` keeps discovery on this host unless the user chose otherwise and points
Fast DDS at the package's profile (``find_fastdds_profile``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["configure_environment", "find_fastdds_profile"]

_OLD_DISTROS = ("foxy", "galactic", "humble")


def find_fastdds_profile() -> Path | None:
    """config/fastdds.xml of this package: installed share folder, or the source tree."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("ovseg_ros")) / "config")
    except Exception:  # not installed through ament, or ament_index_python missing
        pass
    candidates.append(Path(sys.prefix) / "share" / "ovseg_ros" / "config")
    candidates.append(Path(__file__).resolve().parents[3] / "config")
    for folder in candidates:
        if (folder / "fastdds.xml").is_file():
            return folder / "fastdds.xml"
    return None


def configure_environment(env: MutableMapping[str, str] | None = None) -> list[str]:
    """Keep DDS discovery on this host unless the user chose otherwise; use the Fast DDS profile.

    Sets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST (plus ROS_LOCALHOST_ONLY=1 when ROS_DISTRO is
    Humble or older) when neither variable is set, and FASTDDS_DEFAULT_PROFILES_FILE to the
    package's config/fastdds.xml (large shared-memory segment for camera frames) when it is unset
    and the RMW is Fast DDS. Must run before rclpy.init. Returns notes for the user.
    """
    env = os.environ if env is None else env
    notes = []
    if not env.get("ROS_AUTOMATIC_DISCOVERY_RANGE") and not env.get("ROS_LOCALHOST_ONLY"):
        env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        if env.get("ROS_DISTRO", "").lower() in _OLD_DISTROS:
            env["ROS_LOCALHOST_ONLY"] = "1"
        notes.append(
            "ROS_AUTOMATIC_DISCOVERY_RANGE was unset: using LOCALHOST (DDS stays on this host; "
            "export it, e.g. SUBNET, to talk to other machines)"
        )
    rmw = env.get("RMW_IMPLEMENTATION", "") or "rmw_fastrtps_cpp"
    if not env.get("FASTDDS_DEFAULT_PROFILES_FILE") and "fastrtps" in rmw:
        profile = find_fastdds_profile()
        if profile is not None:
            env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
            notes.append(f"FASTDDS_DEFAULT_PROFILES_FILE was unset: using {profile}")
    return notes
