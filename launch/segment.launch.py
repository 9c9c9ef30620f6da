"""Start the ovseg_ros open-vocabulary segmentation node, and RViz with rviz:=true.

    ros2 launch ovseg_ros segment.launch.py image:=/camera/color/image_raw \\
        vocabulary:="[door, chair]" method:=naclip device:=auto rviz:=true

`ros2 launch ovseg_ros segment.launch.py --show-args` lists the arguments. The node gets the
parameter file (`params_file`, by default the installed config/ovseg.yaml) plus overrides for the
arguments that are not empty (`vocabulary`, `method`, `device`). Every process started here gets
FASTDDS_DEFAULT_PROFILES_FILE = share/ovseg_ros/config/fastdds.xml unless the environment already
names a profile: without it, best-effort camera frames larger than about 512 KB are lost by Fast
DDS's default transports.

The plain functions below hold all the logic (argument table, parameter overrides, remappings,
environment) and need neither `launch` nor `launch_ros`, which are imported only inside
generate_launch_description() and the setup function, so the test suite checks this file on
machines without a ROS distribution (test/test_launch.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

PACKAGE = "ovseg_ros"
EXECUTABLE = "ovseg_node"
NODE_NAME = "ovseg"

#: Files this launch file uses, relative to the package's share directory (see setup.py).
PARAMS_FILE = "config/ovseg.yaml"
RVIZ_FILE = "config/ovseg.rviz"
FASTDDS_FILE = "config/fastdds.xml"

FASTDDS_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"

#: The topics that config/ovseg.rviz displays; remapped into `namespace` for RViz.
RVIZ_TOPICS = ("/ovseg/overlay", "/ovseg/labels")

#: Launch arguments as (name, default, description). A default of None is a file of the installed
#: package and is filled in by launch_arguments().
ARGUMENTS = (
    (
        "image",
        "/camera/color/image_raw",
        "sensor_msgs/Image topic of the camera. The node's `image` input is remapped to it and "
        "`image/compressed` to <image>/compressed (used when input.transport is compressed).",
    ),
    (
        "camera_info",
        "/camera/color/camera_info",
        "sensor_msgs/CameraInfo topic of the camera (optional: when it is published, the node "
        "republishes it on ~/camera_info with the header of each output frame).",
    ),
    (
        "namespace",
        "",
        "ROS namespace of the node; empty = the root namespace, so its outputs are /ovseg/...; "
        "with namespace:=robot1 they are /robot1/ovseg/... (RViz follows).",
    ),
    (
        "params_file",
        None,
        "YAML parameter file of the node (all parameters: model, device, method, vocabulary, "
        "QoS...). Default: the package's installed config/ovseg.yaml.",
    ),
    (
        "vocabulary",
        "",
        "Classes to segment, as a YAML list of strings that replaces the parameter file's, e.g. "
        "\"[door, chair, 'red mug; coffee mug']\" (';' separates synonyms of one class). "
        "Empty: keep the parameter file's vocabulary.",
    ),
    (
        "method",
        "",
        "Segmentation method, a name of the engine's registry (see `ovseg methods`), e.g. "
        "naclip. Empty: keep the parameter file's method.",
    ),
    (
        "device",
        "",
        "Inference device: auto (CUDA if available, else CPU), cpu, cuda or cuda:N. "
        "Empty: keep the parameter file's device.",
    ),
    (
        "rviz",
        "false",
        "true: also start RViz with the package's config/ovseg.rviz (overlay and label image).",
    ),
)

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_VOCABULARY_EXAMPLE = "vocabulary:=\"[door, chair, 'red mug; coffee mug']\""


class LaunchArgumentError(ValueError):
    """A launch argument value that cannot be used; the message says why and how to fix it."""


def share_directory() -> Path:
    """The package's share directory: from the ament index, else the folder above launch/.

    The fallback is this file's package root: share/ovseg_ros when installed, the source tree when
    the file is used from a checkout without a sourced workspace; both hold config/.
    """
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(PACKAGE))
    except (ImportError, LookupError, OSError, ValueError):
        return Path(__file__).resolve().parents[1]


def launch_arguments(share_dir: str | os.PathLike) -> list[tuple[str, str, str]]:
    """ARGUMENTS with the file defaults resolved against `share_dir`."""
    files = {"params_file": str(Path(share_dir) / PARAMS_FILE)}
    return [
        (name, files[name] if default is None else default, description)
        for name, default, description in ARGUMENTS
    ]


def parse_vocabulary(text: str) -> list[str]:
    """The class list of a `vocabulary` argument such as "[door, chair, 'red mug; coffee mug']".

    Raises LaunchArgumentError naming the problem when the text is not a non-empty YAML list of
    non-empty strings (YAML reads yes/no/on/off, numbers and null as other types: quote them).
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).strip()
        raise LaunchArgumentError(
            f"vocabulary:={text!r} is not valid YAML ({problem}); "
            f"write a list of class names, e.g. {_VOCABULARY_EXAMPLE}"
        ) from exc
    if not isinstance(value, list):
        raise LaunchArgumentError(
            f"vocabulary:={text!r} is not a list (YAML reads it as {type(value).__name__} "
            f"{value!r}); put the class names in brackets, e.g. {_VOCABULARY_EXAMPLE}"
        )
    if not value:
        raise LaunchArgumentError(
            "vocabulary:='[]' is an empty list; give at least one class, or leave the argument "
            "out to keep the parameter file's vocabulary"
        )
    classes = []
    for index, entry in enumerate(value, start=1):
        if not isinstance(entry, str):
            raise LaunchArgumentError(
                f"vocabulary:={text!r}: entry {index} is read by YAML as "
                f"{type(entry).__name__} {entry!r}, not as a class name; put it in quotes, "
                f"e.g. \"[door, 'yes', '42']\""
            )
        name = entry.strip()
        if not name:
            raise LaunchArgumentError(f"vocabulary:={text!r}: entry {index} is empty")
        classes.append(name)
    return classes


def node_parameters(
    params_file: str, vocabulary: str = "", method: str = "", device: str = ""
) -> list:
    """The node's `parameters`: the parameter file, then overrides for the non-empty arguments.

    Later entries win, so the overrides replace the file's values; with no override the list is
    only the file.
    """
    params_file = params_file.strip()
    if not params_file:
        raise LaunchArgumentError(
            "params_file is empty; give a parameter file, or leave the argument out to use the "
            "package's config/ovseg.yaml"
        )
    overrides: dict[str, object] = {}
    if vocabulary.strip():
        overrides["vocabulary"] = parse_vocabulary(vocabulary)
    if method.strip():
        overrides["method"] = method.strip()
    if device.strip():
        overrides["device"] = device.strip()
    return [params_file, overrides] if overrides else [params_file]


def node_remappings(image: str, camera_info: str) -> list[tuple[str, str]]:
    """Remappings of the node's inputs onto the camera's topics."""
    image = image.strip().rstrip("/")
    if not image:
        raise LaunchArgumentError(
            "image is empty; give the camera's image topic, e.g. image:=/camera/color/image_raw"
        )
    remappings = [("image", image), ("image/compressed", f"{image}/compressed")]
    camera_info = camera_info.strip()
    if camera_info:
        remappings.append(("camera_info", camera_info))
    return remappings


def parse_bool(name: str, text: str) -> bool:
    """A boolean launch argument (true/false, 1/0, yes/no, on/off; any case)."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise LaunchArgumentError(f"{name}:={text!r} is not a boolean; use {name}:=true or false")


def fastdds_environment(environ: Mapping[str, str], share_dir: str | os.PathLike) -> dict[str, str]:
    """{FASTDDS_DEFAULT_PROFILES_FILE: the package's profile} unless `environ` already names one."""
    if environ.get(FASTDDS_ENV, "").strip():
        return {}
    return {FASTDDS_ENV: str(Path(share_dir) / FASTDDS_FILE)}


def rviz_arguments(share_dir: str | os.PathLike) -> list[str]:
    """Command-line arguments of rviz2: the package's display configuration."""
    return ["-d", str(Path(share_dir) / RVIZ_FILE)]


def rviz_remappings(namespace: str) -> list[tuple[str, str]]:
    """Remap the absolute topics of config/ovseg.rviz into the node's namespace."""
    namespace = namespace.strip().strip("/")
    if not namespace:
        return []
    return [(topic, f"/{namespace}{topic}") for topic in RVIZ_TOPICS]


def require_file(path: str, argument: str) -> None:
    """Raise LaunchArgumentError when `path` (the value of `argument`) is not a file."""
    if not Path(path).is_file():
        raise LaunchArgumentError(f"{argument}:={path!r} is not a file")


def _launch_setup(context, share_dir: str):
    """OpaqueFunction body: read the arguments, validate them, return the actions."""
    from launch.actions import SetEnvironmentVariable
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    values = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    params_file = values["params_file"].strip()
    require_file(params_file, "params_file")
    namespace = values["namespace"].strip()

    # launch >= Humble keeps the environment of started processes in context.environment (older
    # releases wrote os.environ); either way this sees what the user or an including file set.
    environment = getattr(context, "environment", os.environ)
    actions = [
        SetEnvironmentVariable(name, value)
        for name, value in fastdds_environment(environment, share_dir).items()
    ]
    actions.append(
        Node(
            package=PACKAGE,
            executable=EXECUTABLE,
            name=NODE_NAME,
            namespace=namespace,
            parameters=node_parameters(
                params_file, values["vocabulary"], values["method"], values["device"]
            ),
            remappings=node_remappings(values["image"], values["camera_info"]),
            output="screen",
        )
    )
    if parse_bool("rviz", values["rviz"]):
        actions.append(
            Node(
                package="rviz2",
                executable="rviz2",
                name="rviz2",
                arguments=rviz_arguments(share_dir),
                remappings=rviz_remappings(namespace),
                output="screen",
            )
        )
    return actions


def generate_launch_description():
    """The launch description: the arguments of ARGUMENTS, then the node (and RViz)."""
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.launch_description import LaunchDescription

    share_dir = share_directory()
    entities = [
        DeclareLaunchArgument(name, default_value=default, description=description)
        for name, default, description in launch_arguments(share_dir)
    ]
    entities.append(OpaqueFunction(function=_launch_setup, kwargs={"share_dir": str(share_dir)}))
    return LaunchDescription(entities)
