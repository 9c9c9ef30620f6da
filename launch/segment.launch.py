"""Start the ovseg_ros open-vocabulary segmentation node, and RViz with rviz:=true.

    ros2 launch ovseg_ros segment.launch.py image:=/camera/color/image_raw \\
        vocabulary:="[door, chair]" method:=naclip device:=auto rviz:=true

`ros2 launch ovseg_ros segment.launch.py --show-args` lists the arguments. The node gets the
parameter file (`params_file`, by default the installed config/ovseg.yaml) plus overrides for the
arguments that are not empty (`vocabulary`, `method`, `device`, `pretrained`, `checkpoint` and the
YAML mapping `params`). Every process started here gets FASTDDS_DEFAULT_PROFILES_FILE =
share/ovseg_ros/config/fastdds.xml unless the environment already names a profile: without it,
best-effort camera frames larger than about 512 KB are lost by Fast DDS's default transports.

Every argument is checked before any process starts (a wrong one ends the launch with one
sentence and exit code 1, nothing left running): the method name against the engine's registry
(read from its source files, so torch is not imported), the `params` names and types against the
package's config/ovseg.yaml, a `checkpoint` file, and, with rviz:=true, that rviz2 is installed.
When the node exits the launch ends with it (RViz too); if it exited with an error (e.g. code 3,
the weights could not be loaded) `ros2 launch` exits with 1, the only non-zero code `launch` has.

The plain functions below hold all the logic (argument table, parameter overrides, remappings,
environment, checks, the reaction to the node's exit) and need neither `launch` nor `launch_ros`,
which are imported only inside generate_launch_description() and the functions that build actions,
so the test suite checks this file on machines without a ROS distribution (test/test_launch.py).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
import signal
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import yaml

PACKAGE = "ovseg_ros"
EXECUTABLE = "ovseg_node"
LIFECYCLE_EXECUTABLE = "ovseg_lifecycle_node"
NODE_NAME = "ovseg"

#: Files this launch file uses, relative to the package's share directory (see setup.py).
PARAMS_FILE = "config/ovseg.yaml"
RVIZ_FILE = "config/ovseg.rviz"
FASTDDS_FILE = "config/fastdds.xml"

FASTDDS_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"

#: The topics that config/ovseg.rviz displays; remapped into `namespace` for RViz.
RVIZ_TOPICS = ("/ovseg/overlay", "/ovseg/labels")

#: The method registry's source folder, relative to the ovseg_ros Python package.
METHODS_FOLDER = ("engine", "methods")

#: The node's exit codes (ovseg_ros/ros/node.py) and what they mean.
EXIT_REASONS = {2: "invalid parameters", 3: "the model could not be loaded"}

#: Parameters a node has without declaring them, and prefixes of ones declared at run time; a
#: `params` override may name these although config/ovseg.yaml does not list them (a prefix only
#: while the file lists no name with it: then the file's names are the only ones).
EXTRA_PARAMETERS = ("use_sim_time", "start_type_description_service")
EXTRA_PREFIXES = ("method_params.", "qos_overrides.")

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
        "depth",
        "",
        "Depth image registered to the colour camera (16UC1 mm or 32FC1 m), e.g. "
        "/camera/aligned_depth_to_color/image_raw (RealSense) or "
        "/zed/zed_node/depth/depth_registered (ZED): sets depth.enabled, remaps `depth` to it and "
        "`depth/camera_info` to the camera_info beside it; the node then publishes ~/points. "
        "Empty: no depth.",
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
        "naclip; checked before anything starts. Empty: keep the parameter file's method.",
    ),
    (
        "device",
        "",
        "Inference device: auto (CUDA if available, else CPU), cpu, cuda or cuda:N. "
        "Empty: keep the parameter file's device.",
    ),
    (
        "pretrained",
        "",
        "open_clip pretrained tag of the weights (model.pretrained), e.g. openai; none = random "
        "weights for an offline smoke test. Also clears the file's model.checkpoint unless "
        "`checkpoint` is given. Empty: keep the parameter file's.",
    ),
    (
        "checkpoint",
        "",
        "Local weights file (model.checkpoint; it takes precedence over model.pretrained), "
        "checked to exist before anything starts. Empty: keep the parameter file's.",
    ),
    (
        "params",
        "",
        "Any other node parameters, as a YAML mapping that overrides the parameter file, e.g. "
        '"{input.short_side: 448, prob_threshold: 0.1}"; names and types are checked against '
        "config/ovseg.yaml. Empty: no override.",
    ),
    (
        "lifecycle",
        "false",
        "true: run the managed node ovseg_lifecycle_node (configure loads the model, activate "
        "subscribes and publishes, deactivate pauses and frees what frames used, cleanup "
        "releases the model) instead of ovseg_node.",
    ),
    (
        "autostart",
        "true",
        "With lifecycle:=true: true configures and activates the node at start-up; false leaves "
        "it unconfigured for a lifecycle manager (nav2's lifecycle_manager). Ignored otherwise.",
    ),
    (
        "rviz",
        "false",
        "true: also start RViz with the package's config/ovseg.rviz (overlay and label image); "
        "rviz2 must be installed (checked before anything starts).",
    ),
)

#: Launch arguments that set one node parameter each, and that parameter.
ARGUMENT_PARAMETERS = {
    "vocabulary": "vocabulary",
    "method": "method",
    "device": "device",
    "pretrained": "model.pretrained",
    "checkpoint": "model.checkpoint",
}

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_VOCABULARY_EXAMPLE = "vocabulary:=\"[door, chair, 'red mug; coffee mug']\""
_PARAMS_EXAMPLE = 'params:="{input.short_side: 448, prob_threshold: 0.1}"'
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_SCALARS = (bool, int, float, str)


class LaunchArgumentError(ValueError):
    """A launch argument value that cannot be used; the message says why and how to fix it."""


class NodeExitError(RuntimeError):
    """The node exited with an error; raised into `launch` so that `ros2 launch` exits with 1."""


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


def _load_yaml(argument: str, text: str, advice: str) -> object:
    """A launch argument read as YAML; LaunchArgumentError with `advice` when it is not YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).strip()
        raise LaunchArgumentError(
            f"{argument}:={text!r} is not valid YAML ({problem}); {advice}"
        ) from exc


def parse_vocabulary(text: str) -> list[str]:
    """The class list of a `vocabulary` argument such as "[door, chair, 'red mug; coffee mug']".

    Raises LaunchArgumentError naming the problem when the text is not a non-empty YAML list of
    non-empty strings (YAML reads yes/no/on/off, numbers and null as other types: quote them).
    """
    value = _load_yaml(
        "vocabulary", text, f"write a list of class names, e.g. {_VOCABULARY_EXAMPLE}"
    )
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


def methods_directory() -> Path | None:
    """The method registry's source folder, found without importing ovseg_ros (nor torch).

    The installed package when Python can find it, else the source tree next to launch/; None
    when neither has the folder.
    """
    candidates = []
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates.extend(Path(p) for p in spec.submodule_search_locations or ())
    candidates.append(Path(__file__).resolve().parents[1] / PACKAGE)
    for package in candidates:
        folder = package.joinpath(*METHODS_FOLDER)
        if folder.is_dir():
            return folder
    return None


def registered_methods(folder: str | os.PathLike | None) -> list[str]:
    """Sorted names of the `@register` classes in the registry's source files (read with ast).

    Empty when `folder` is None or holds no registered class: the caller then skips the check.
    """
    if folder is None:
        return []
    names = set()
    for source in sorted(Path(folder).glob("*.py")):
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            decorators = {ast.unparse(d).split(".")[-1] for d in node.decorator_list}
            if "register" not in decorators:
                continue
            for statement in node.body:
                targets = []
                if isinstance(statement, ast.Assign):
                    targets = statement.targets
                elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
                    targets = [statement.target]
                if any(isinstance(t, ast.Name) and t.id == "name" for t in targets):
                    value = statement.value
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        names.add(value.value)
    return sorted(names)


def check_method(name: str, methods: Iterable[str], where: str = "") -> None:
    """Raise LaunchArgumentError when `name` is not in `methods` (an empty `methods`: no check).

    `where` names the value in the message (default: the `method` argument).
    """
    known = sorted(methods)
    if known and name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise LaunchArgumentError(
            f"{where or f'method:={name!r}'} is not a segmentation method; {hint}"
            f"the methods are {', '.join(known)} (`ovseg methods` describes them)"
        )


def check_device(text: str) -> str:
    """The `device` argument, stripped; LaunchArgumentError unless auto, cpu, cuda or cuda:N."""
    device = text.strip()
    if not _DEVICE.fullmatch(device):
        raise LaunchArgumentError(
            f"device:={text!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:0)"
        )
    return device


def check_checkpoint(text: str, where: str = "") -> str:
    """The absolute path of a weights file; LaunchArgumentError when it is not a file.

    `where` names the value in the message (default: the `checkpoint` argument).
    """
    where = where or f"checkpoint:={text!r}"
    path = Path(text.strip()).expanduser()
    if path.is_dir():
        raise LaunchArgumentError(f"{where} is a folder, not a weights file")
    if not path.is_file():
        raise LaunchArgumentError(f"{where} does not exist")
    return str(path.absolute())


def default_parameters(share_dir: str | os.PathLike) -> dict[str, object]:
    """The node's parameters and defaults as listed by the package's config/ovseg.yaml.

    Empty when the file cannot be read: the caller then skips the name and type checks.
    """
    try:
        document = yaml.safe_load((Path(share_dir) / PARAMS_FILE).read_text(encoding="utf-8"))
        parameters = document["/**"]["ros__parameters"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}
    return (
        {str(k): v for k, v in _flatten(parameters).items()} if isinstance(parameters, dict) else {}
    )


def _flatten(mapping: Mapping, prefix: str = "") -> dict[object, object]:
    """Nested mappings as one mapping with dotted names, as launch_ros flattens them."""
    flat: dict[object, object] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}" if isinstance(key, str) else key
        if isinstance(key, str) and isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _kind(value: object) -> str:
    """A ROS parameter type name for a Python value, with its article ("an integer")."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if isinstance(value, list):
        inner = {names.get(type(v), type(v).__name__) for v in value}
        return f"a list of {inner.pop()}s" if len(inner) == 1 else "a list"
    name = names.get(type(value), type(value).__name__)
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _uniform(values: list) -> bool:
    """Whether a list is one launch_ros can pass: strings, booleans or numbers, not mixed."""
    kinds = {
        bool if isinstance(v, bool) else float if isinstance(v, int) else type(v) for v in values
    }
    return len(kinds) == 1 and kinds <= {bool, float, str}


def check_parameter(name: str, value: object, known: Mapping[str, object]) -> object:
    """`value` as the node parameter `name` takes it (an integer becomes a float where the node
    declares a float); LaunchArgumentError when the name is unknown or the type is wrong.

    An empty `known` checks only that the value is one launch_ros can pass.
    """
    where = f"params: {name}"
    if value is None:
        raise LaunchArgumentError(f"{where} has no value (YAML null); give one or leave it out")
    if isinstance(value, list):
        if not value:
            raise LaunchArgumentError(
                f"{where} is an empty list, which launch_ros cannot pass; set it in a params_file"
            )
        if not _uniform(value):
            raise LaunchArgumentError(
                f"{where}: {value!r} is not a list of strings, numbers or booleans of one type "
                "(quote the strings)"
            )
    elif not isinstance(value, _SCALARS):
        raise LaunchArgumentError(
            f"{where}: {value!r} is not a string, number, boolean or list of one of them"
        )
    if name not in known:
        open_prefixes = tuple(
            prefix for prefix in EXTRA_PREFIXES if not any(k.startswith(prefix) for k in known)
        )
        if known and name not in EXTRA_PARAMETERS and not name.startswith(open_prefixes):
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise LaunchArgumentError(
                f"params: {name!r} is not a parameter of the node; {hint}"
                "the package's config/ovseg.yaml lists them all"
            )
        return value
    default = known[name]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list) and isinstance(value, list):
        if default and any(type(v) is not type(default[0]) for v in value):
            raise LaunchArgumentError(
                f"{where} must be {_kind(default)}, not {value!r} (YAML reads unquoted "
                "yes/no/on/off, numbers and null as other types: quote them)"
            )
        return value
    if type(value) is not type(default):
        quote = " (quote it)" if isinstance(default, str) and not isinstance(value, list) else ""
        raise LaunchArgumentError(
            f"{where} must be {_kind(default)}, not {_kind(value)} {value!r}{quote}"
        )
    return value


def parse_params(text: str, known: Mapping[str, object] | None = None) -> dict[str, object]:
    """The overrides of a `params` argument: a YAML mapping of parameter names to values.

    Nested mappings give dotted names ({input: {short_side: 448}} is input.short_side). With
    `known` (default_parameters()) the names and types are checked against it.
    """
    if not text.strip():
        return {}
    value = _load_yaml("params", text, f"write a mapping, e.g. {_PARAMS_EXAMPLE}")
    if not isinstance(value, dict):
        raise LaunchArgumentError(
            f"params:={text!r} is not a mapping (YAML reads it as {type(value).__name__}); "
            f"write name: value pairs in braces, e.g. {_PARAMS_EXAMPLE}"
        )
    overrides = {}
    for name, item in _flatten(value).items():
        if not isinstance(name, str) or not name:
            raise LaunchArgumentError(
                f"params:={text!r}: {name!r} is not a parameter name (quote it if it is one)"
            )
        overrides[name] = check_parameter(name, item, known or {})
    return overrides


def node_parameters(
    params_file: str,
    vocabulary: str = "",
    method: str = "",
    device: str = "",
    pretrained: str = "",
    checkpoint: str = "",
    params: str = "",
    *,
    known: Mapping[str, object] | None = None,
    methods: Iterable[str] = (),
) -> list:
    """The node's `parameters`: the parameter file, then overrides for the non-empty arguments.

    Later entries win, so the overrides replace the file's values; with no override the list is
    only the file. `known` (default_parameters()) checks the `params` names and types, `methods`
    (registered_methods()) the method name; leave them out to skip those checks.
    """
    params_file = params_file.strip()
    if not params_file:
        raise LaunchArgumentError(
            "params_file is empty; give a parameter file, or leave the argument out to use the "
            "package's config/ovseg.yaml"
        )
    methods = list(methods)
    generic = parse_params(params, known)
    given: dict[str, object] = {}
    if vocabulary.strip():
        given["vocabulary"] = parse_vocabulary(vocabulary)
    if method.strip():
        check_method(method.strip(), methods)
        given["method"] = method.strip()
    if device.strip():
        given["device"] = check_device(device)
    if pretrained.strip():
        given["pretrained"] = pretrained.strip()
    if checkpoint.strip():
        given["checkpoint"] = check_checkpoint(checkpoint)
    overrides: dict[str, object] = dict(generic)
    for argument, value in given.items():
        parameter = ARGUMENT_PARAMETERS[argument]
        if parameter in generic:
            raise LaunchArgumentError(
                f"{parameter} is given twice, by {argument}:= and by params:=; give it once"
            )
        overrides[parameter] = value
    if "method" in generic:
        method = str(generic["method"])
        check_method(method, methods, f"params: method {method!r}")
    if str(generic.get("model.checkpoint", "")).strip():
        path = str(generic["model.checkpoint"])
        overrides["model.checkpoint"] = check_checkpoint(path, f"params: model.checkpoint {path!r}")
    if "pretrained" in given and "model.checkpoint" not in overrides:
        # A checkpoint in the file would win over the tag asked for here.
        overrides["model.checkpoint"] = ""
    return [params_file, overrides] if overrides else [params_file]


def node_remappings(image: str, camera_info: str, depth: str = "") -> list[tuple[str, str]]:
    """Remappings of the node's inputs onto the camera's topics (depth: and its camera_info)."""
    image = image.strip().rstrip("/")
    if not image:
        raise LaunchArgumentError(
            "image is empty; give the camera's image topic, e.g. image:=/camera/color/image_raw"
        )
    remappings = [("image", image), ("image/compressed", f"{image}/compressed")]
    camera_info = camera_info.strip()
    if camera_info:
        remappings.append(("camera_info", camera_info))
    depth = depth.strip().rstrip("/")
    if depth:
        parent = depth.rsplit("/", 1)[0] if "/" in depth.lstrip("/") else ""
        remappings += [("depth", depth), ("depth/camera_info", f"{parent}/camera_info")]
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


def ament_package_prefix(package: str) -> str:
    """The install prefix of `package` from the ament index (LookupError when it is not there)."""
    try:
        from ament_index_python.packages import get_package_prefix
    except ImportError as exc:
        raise LookupError("ament_index_python is not installed") from exc
    return get_package_prefix(package)  # PackageNotFoundError is a KeyError


def check_rviz(package_prefix: Callable[[str], str], environ: Mapping[str, str]) -> None:
    """Raise LaunchArgumentError unless rviz2 is in the ament index with its executable.

    `package_prefix` is ament_package_prefix() or a stand-in; `environ` gives ROS_DISTRO for the
    install command.
    """
    distro = environ.get("ROS_DISTRO", "").strip() or "$ROS_DISTRO"
    remedy = (
        f"install it with `sudo apt install ros-{distro}-rviz2` and source your ROS setup again, "
        "or launch with rviz:=false"
    )
    try:
        prefix = package_prefix("rviz2")
    except (LookupError, OSError, ValueError):
        raise LaunchArgumentError(
            f"rviz:=true but RViz is not installed (no package rviz2 in the ament index); {remedy}"
        ) from None
    if not (Path(prefix) / "lib" / "rviz2" / "rviz2").is_file():
        raise LaunchArgumentError(
            f"rviz:=true but {prefix} has no lib/rviz2/rviz2 executable; {remedy}"
        )


def node_exit_reason(returncode: int | None) -> str:
    """One sentence on how the node ended, used as the launch's shutdown reason."""
    if returncode == 0:
        return f"{EXECUTABLE} exited"
    if returncode is None:
        return f"{EXECUTABLE} ended with an unknown exit code"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{EXECUTABLE} was killed by {name}"
    meaning = EXIT_REASONS.get(returncode, "an error")
    return f"{EXECUTABLE} exited with code {returncode} ({meaning}; its message is above)"


def node_exit_fails_launch(returncode: int | None, shutting_down: bool) -> bool:
    """Whether the node's exit is an error the launch must report with a non-zero exit code.

    Not while the launch is already shutting down (Ctrl-C: the node was stopped on purpose).
    """
    return not shutting_down and returncode != 0


class LaunchPlan(NamedTuple):
    """Everything the launch starts, computed and checked before anything is started.

    (A NamedTuple, not a dataclass: `launch` runs this file without a sys.modules entry.)
    """

    namespace: str
    lifecycle: bool  # ovseg_lifecycle_node instead of ovseg_node
    environment: dict[str, str]
    parameters: list
    remappings: list[tuple[str, str]]
    rviz: bool
    rviz_arguments: list[str]
    rviz_remappings: list[tuple[str, str]]


def launch_plan(
    values: Mapping[str, str],
    share_dir: str | os.PathLike,
    environ: Mapping[str, str],
    package_prefix: Callable[[str], str] | None = None,
    methods: Iterable[str] | None = None,
) -> LaunchPlan:
    """Check every argument in `values` (name: text, as ARGUMENTS) and return what to start.

    Raises LaunchArgumentError for the first unusable argument. `package_prefix` defaults to
    ament_package_prefix(), `methods` to the registry's names read from its source files.
    """
    params_file = values["params_file"].strip()
    require_file(params_file, "params_file")
    rviz = parse_bool("rviz", values["rviz"])
    if rviz:
        check_rviz(package_prefix or ament_package_prefix, environ)
    if methods is None:
        methods = registered_methods(methods_directory())
    namespace = values["namespace"].strip()
    parameters = node_parameters(
        params_file,
        **{name: values.get(name, "") for name in ARGUMENT_PARAMETERS},
        params=values.get("params", ""),
        known=default_parameters(share_dir),
        methods=methods,
    )
    depth = values.get("depth", "")
    if depth.strip():
        parameters = [*parameters, {"depth.enabled": True}]
    lifecycle = parse_bool("lifecycle", values.get("lifecycle", "false"))
    if lifecycle:
        autostart = parse_bool("autostart", values.get("autostart", "true"))
        parameters = [*parameters, {"lifecycle.autostart": autostart}]
    return LaunchPlan(
        namespace=namespace,
        lifecycle=lifecycle,
        environment=fastdds_environment(environ, share_dir),
        parameters=parameters,
        remappings=node_remappings(values["image"], values["camera_info"], depth),
        rviz=rviz,
        rviz_arguments=rviz_arguments(share_dir) if rviz else [],
        rviz_remappings=rviz_remappings(namespace) if rviz else [],
    )


def require_file(path: str, argument: str) -> None:
    """Raise LaunchArgumentError when `path` (the value of `argument`) is not a file."""
    if not Path(path).is_file():
        raise LaunchArgumentError(f"{argument}:={path!r} is not a file")


def on_node_exit(event: object, context: object) -> list | None:
    """on_exit of the node: end the launch (and RViz) with it; an error exit fails the launch."""
    shutting_down = bool(getattr(context, "is_shutdown", False))
    returncode = getattr(event, "returncode", None)
    reason = node_exit_reason(returncode)
    if node_exit_fails_launch(returncode, shutting_down):
        # launch reports an exception raised here as "Caught exception in launch ...: <reason>",
        # stops the other processes and returns 1, which `ros2 launch` exits with.
        raise NodeExitError(reason)
    if shutting_down:
        return None
    from launch.actions import Shutdown

    return [Shutdown(reason=reason)]


def _launch_setup(context: object, share_dir: str) -> list:
    """OpaqueFunction body: read and check every argument, then return the actions."""
    from launch.actions import SetEnvironmentVariable
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    values = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    # launch >= Humble keeps the environment of started processes in context.environment (older
    # releases wrote os.environ); either way this sees what the user or an including file set.
    environment = getattr(context, "environment", os.environ)
    plan = launch_plan(values, share_dir, environment)
    actions = [SetEnvironmentVariable(name, value) for name, value in plan.environment.items()]
    actions.append(
        Node(
            package=PACKAGE,
            executable=LIFECYCLE_EXECUTABLE if plan.lifecycle else EXECUTABLE,
            name=NODE_NAME,
            namespace=plan.namespace,
            parameters=plan.parameters,
            remappings=plan.remappings,
            output="screen",
            on_exit=on_node_exit,
        )
    )
    if plan.rviz:
        actions.append(
            Node(
                package="rviz2",
                executable="rviz2",
                name="rviz2",
                arguments=plan.rviz_arguments,
                remappings=plan.rviz_remappings,
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
