"""launch/segment.launch.py and config/ovseg.rviz against the contract (docs: "Launch and
visualisation").

Without a ROS distribution (`launch` and `launch_ros` are not installable from wheels) the launch
file is read with `ast` and its pure helpers are imported on their own: the launch file imports
`launch` only inside its functions. With `launch` and `launch_ros` installed, the launch
description itself is built and checked as well.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "segment.launch.py"
SETUP_PY = REPO / "setup.py"
RVIZ_CONFIG = REPO / "config" / "ovseg.rviz"
PACKAGE = "ovseg_ros"

#: The launch arguments the contract names, in order.
CONTRACT_ARGUMENTS = [
    "image",
    "camera_info",
    "namespace",
    "params_file",
    "vocabulary",
    "method",
    "device",
    "rviz",
]

CONTRACT_DEFAULTS = {
    "image": "/camera/color/image_raw",
    "camera_info": "/camera/color/camera_info",
    "namespace": "",
    "vocabulary": "",
    "method": "",
    "device": "",
    "rviz": "false",
}


# ---------------------------------------------------------------------------------------------
# Reading the files without running them


def load_launch_module():
    """Import launch/segment.launch.py as a module (it has no importable name of its own)."""
    spec = importlib.util.spec_from_file_location("ovseg_segment_launch", LAUNCH_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def launch_module():
    return load_launch_module()


def _module_constants(tree: ast.Module) -> dict[str, object]:
    """Module-level NAME = <literal> assignments of a parsed file."""
    constants = {}
    for statement in tree.body:
        if (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
        ):
            try:
                constants[statement.targets[0].id] = ast.literal_eval(statement.value)
            except ValueError:
                continue
    return constants


def _evaluate(node: ast.AST, names: dict[str, object]):
    """Evaluate the small expression language setup.py uses for data_files and entry_points:
    literals, module constants, f-strings, `+` and glob("pattern") (relative to the repo)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            inner = value.value if isinstance(value, ast.FormattedValue) else value
            parts.append(str(_evaluate(inner, names)))
        return "".join(parts)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(element, names) for element in node.elts]
    if isinstance(node, ast.Dict):
        return {
            _evaluate(key, names): _evaluate(value, names)
            for key, value in zip(node.keys, node.values, strict=True)
        }
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _evaluate(node.left, names) + _evaluate(node.right, names)
    if (
        isinstance(node, ast.Call)
        and ast.unparse(node.func) in ("glob", "glob.glob")
        and len(node.args) == 1
        and not node.keywords
    ):
        pattern = _evaluate(node.args[0], names)
        return sorted(glob.glob(pattern, root_dir=REPO))
    raise AssertionError(f"setup.py: this test cannot evaluate {ast.unparse(node)!r}")


def _setup_keyword(name: str):
    """The evaluated value of keyword `name` in setup.py's setup(...) call."""
    tree = ast.parse(SETUP_PY.read_text(), filename=str(SETUP_PY))
    names = _module_constants(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("setup", "setuptools.setup"):
            for keyword in node.keywords:
                if keyword.arg == name:
                    return _evaluate(keyword.value, names)
    raise AssertionError(f"setup.py: setup() has no {name}=")


def installed_files() -> dict[str, set[str]]:
    """setup.py's data_files as {install folder: set of source paths relative to the repo}."""
    result: dict[str, set[str]] = {}
    for destination, sources in _setup_keyword("data_files"):
        result.setdefault(destination, set()).update(sources)
    return result


def console_scripts() -> dict[str, str]:
    """setup.py's console scripts as {name: 'module:function'}."""
    entry_points = _setup_keyword("entry_points")
    scripts = {}
    for line in entry_points.get("console_scripts", []):
        name, _, target = line.partition("=")
        scripts[name.strip()] = target.strip()
    return scripts


def launch_tree() -> ast.Module:
    return ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))


def launched_nodes() -> list[dict[str, object]]:
    """The keyword arguments (package, executable, name) of every Node(...) call in the file."""
    tree = launch_tree()
    constants = _module_constants(tree)
    nodes = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "Node":
            fields = {}
            for keyword in node.keywords:
                if keyword.arg in ("package", "executable", "name"):
                    fields[keyword.arg] = _evaluate(keyword.value, constants)
            nodes.append(fields)
    return nodes


def image_displays() -> dict[str, dict]:
    """config/ovseg.rviz's Image displays by topic."""
    config = yaml.safe_load(RVIZ_CONFIG.read_text())
    displays = config["Visualization Manager"]["Displays"]
    return {
        display["Topic"]["Value"]: display
        for display in displays
        if display.get("Class") == "rviz_default_plugins/Image"
    }


# ---------------------------------------------------------------------------------------------
# (b) Always: the launch file read with ast, setup.py, the RViz configuration


def test_launch_file_declares_the_contract_arguments():
    assert not (REPO / "launch" / ".gitkeep").exists()
    constants = _module_constants(launch_tree())
    assert "ARGUMENTS" in constants, "launch file: no literal module-level ARGUMENTS table"
    arguments = constants["ARGUMENTS"]
    assert [name for name, _, _ in arguments] == CONTRACT_ARGUMENTS
    for name, default, description in arguments:
        assert isinstance(description, str) and len(description) > 20, name
        if name in CONTRACT_DEFAULTS:
            assert default == CONTRACT_DEFAULTS[name], name


def test_launch_file_imports_ros_launch_only_inside_functions():
    """So the pure helpers can be imported (and tested) where `launch` is not installed."""
    for statement in launch_tree().body:
        if isinstance(statement, ast.Import):
            modules = [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom):
            modules = [statement.module or ""]
        else:
            continue
        for module in modules:
            assert module.split(".")[0] not in ("launch", "launch_ros"), module


def test_launch_file_starts_ovseg_node_and_rviz2():
    nodes = launched_nodes()
    assert {"package": PACKAGE, "executable": "ovseg_node", "name": "ovseg"} in nodes
    assert any(node.get("executable") == "rviz2" for node in nodes)


def test_launched_executable_is_a_console_script():
    """ovseg_node must be an entry point of setup.py whose target module and function exist."""
    executables = {n["executable"] for n in launched_nodes() if n.get("package") == PACKAGE}
    assert executables == {"ovseg_node"}
    scripts = console_scripts()
    for executable in executables:
        assert executable in scripts, (
            f"setup.py entry_points has no console script {executable!r} "
            f"(has {sorted(scripts)}); `ros2 run {PACKAGE} {executable}` would fail"
        )
        module, _, function = scripts[executable].partition(":")
        source = REPO / Path(*module.split(".")).with_suffix(".py")
        assert source.is_file(), f"{executable} -> {scripts[executable]}: {source} is missing"
        tree = ast.parse(source.read_text(), filename=str(source))
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        defined |= {
            target.id
            for n in tree.body
            if isinstance(n, ast.Assign)
            for target in n.targets
            if isinstance(target, ast.Name)
        }
        assert function in defined, f"{source} defines no {function}()"


@pytest.mark.parametrize("attribute", ["PARAMS_FILE", "RVIZ_FILE", "FASTDDS_FILE"])
def test_files_the_launch_file_names_exist_and_are_installed(launch_module, attribute):
    relative = getattr(launch_module, attribute)
    assert (REPO / relative).is_file(), f"{relative} (launch file's {attribute}) is missing"
    destination = f"share/{PACKAGE}/{Path(relative).parent.as_posix()}"
    installed = installed_files()
    assert relative in installed.get(destination, set()), (
        f"setup.py data_files does not install {relative} into {destination}"
    )


def test_launch_file_itself_is_installed():
    assert "launch/segment.launch.py" in installed_files().get(f"share/{PACKAGE}/launch", set())


def test_rviz_config_shows_overlay_and_labels(launch_module):
    assert not (REPO / "config" / ".gitkeep").exists()
    config = yaml.safe_load(RVIZ_CONFIG.read_text())
    assert isinstance(config["Panels"], list) and config["Panels"]
    manager = config["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "camera"
    assert {"Height", "Width"} <= set(config["Window Geometry"])
    displays = image_displays()
    assert {"/ovseg/overlay", "/ovseg/labels"} <= set(displays)
    overlay = displays["/ovseg/overlay"]["Topic"]
    assert overlay["Reliability Policy"] == "Reliable"
    assert overlay["Depth"] == 1
    assert all(display["Enabled"] for display in displays.values())
    # The launch file remaps the topics of all displays into the node's namespace for RViz.
    topics = {d["Topic"]["Value"] for d in manager["Displays"] if "Topic" in d}
    assert set(launch_module.RVIZ_TOPICS) == topics


# ---------------------------------------------------------------------------------------------
# (b) Always: the launch file's pure helpers


def test_launch_arguments_resolve_the_installed_params_file(launch_module, tmp_path):
    arguments = launch_module.launch_arguments(tmp_path)
    assert [name for name, _, _ in arguments] == CONTRACT_ARGUMENTS
    defaults = {name: default for name, default, _ in arguments}
    assert defaults["params_file"] == str(tmp_path / "config" / "ovseg.yaml")
    for name, value in CONTRACT_DEFAULTS.items():
        assert defaults[name] == value


def test_share_directory_falls_back_to_the_source_tree(launch_module, monkeypatch):
    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    assert launch_module.share_directory() == REPO


def test_empty_arguments_add_no_override(launch_module):
    assert launch_module.node_parameters("/p/ovseg.yaml") == ["/p/ovseg.yaml"]
    assert launch_module.node_parameters("/p/ovseg.yaml", "", " ", "") == ["/p/ovseg.yaml"]


def test_overrides_follow_the_params_file(launch_module):
    parameters = launch_module.node_parameters(
        "/p/ovseg.yaml", "[door, chair, 'red mug; coffee mug']", "naclip", " cuda:0 "
    )
    assert parameters == [
        "/p/ovseg.yaml",
        {
            "vocabulary": ["door", "chair", "red mug; coffee mug"],
            "method": "naclip",
            "device": "cuda:0",
        },
    ]
    assert launch_module.node_parameters("/p/ovseg.yaml", method="maskclip") == [
        "/p/ovseg.yaml",
        {"method": "maskclip"},
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[door, chair, 'red mug; coffee mug']", ["door", "chair", "red mug; coffee mug"]),
        ('["traffic light"]', ["traffic light"]),
        ("- door\n- chair", ["door", "chair"]),
        ("[' door ', 'yes', '42']", ["door", "yes", "42"]),
    ],
)
def test_vocabulary_is_parsed(launch_module, text, expected):
    assert launch_module.parse_vocabulary(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("door", "not a list"),
        ("door, chair", "not a list"),
        ("[door, chair", "not valid YAML"),
        ("[]", "empty list"),
        ("[door, yes]", "entry 2 is read by YAML as bool"),
        ("[door, 42]", "entry 2 is read by YAML as int"),
        ("[door: chair]", "entry 1 is read by YAML as dict"),
        ("[door, '  ']", "entry 2 is empty"),
    ],
)
def test_bad_vocabulary_gives_a_clear_error(launch_module, text, message):
    with pytest.raises(launch_module.LaunchArgumentError, match="vocabulary") as caught:
        launch_module.node_parameters("/p/ovseg.yaml", vocabulary=text)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_empty_params_file_is_rejected(launch_module):
    with pytest.raises(launch_module.LaunchArgumentError, match="params_file"):
        launch_module.node_parameters(" ")


def test_require_file(launch_module, tmp_path):
    (tmp_path / "p.yaml").write_text("{}\n")
    launch_module.require_file(str(tmp_path / "p.yaml"), "params_file")
    with pytest.raises(launch_module.LaunchArgumentError, match="params_file.*not a file"):
        launch_module.require_file(str(tmp_path / "missing.yaml"), "params_file")


def test_remappings(launch_module):
    assert launch_module.node_remappings("/cam/image_raw", "/cam/camera_info") == [
        ("image", "/cam/image_raw"),
        ("image/compressed", "/cam/image_raw/compressed"),
        ("camera_info", "/cam/camera_info"),
    ]
    assert launch_module.node_remappings("/cam/image_raw/", "") == [
        ("image", "/cam/image_raw"),
        ("image/compressed", "/cam/image_raw/compressed"),
    ]
    with pytest.raises(launch_module.LaunchArgumentError, match="image"):
        launch_module.node_remappings(" ", "/cam/camera_info")


def test_rviz_follows_the_namespace(launch_module, tmp_path):
    assert launch_module.rviz_remappings("") == []
    assert launch_module.rviz_remappings("/robot1/") == [
        ("/ovseg/overlay", "/robot1/ovseg/overlay"),
        ("/ovseg/labels", "/robot1/ovseg/labels"),
    ]
    assert launch_module.rviz_arguments(tmp_path) == ["-d", str(tmp_path / "config/ovseg.rviz")]


@pytest.mark.parametrize("text", ["true", "True", "1", "yes", "on"])
def test_parse_bool_true(launch_module, text):
    assert launch_module.parse_bool("rviz", text) is True


@pytest.mark.parametrize("text", ["false", "FALSE", "0", "no", "off"])
def test_parse_bool_false(launch_module, text):
    assert launch_module.parse_bool("rviz", text) is False


def test_parse_bool_rejects_other_text(launch_module):
    with pytest.raises(launch_module.LaunchArgumentError, match="rviz:='maybe' is not a boolean"):
        launch_module.parse_bool("rviz", "maybe")


def test_fastdds_profile_unless_the_user_exported_one(launch_module, tmp_path):
    variable = "FASTDDS_DEFAULT_PROFILES_FILE"
    assert launch_module.FASTDDS_ENV == variable
    ours = {variable: str(tmp_path / "config" / "fastdds.xml")}
    assert launch_module.fastdds_environment({}, tmp_path) == ours
    assert launch_module.fastdds_environment({variable: ""}, tmp_path) == ours
    assert launch_module.fastdds_environment({variable: "/mine.xml"}, tmp_path) == {}


# ---------------------------------------------------------------------------------------------
# (a) With launch and launch_ros installed: the launch description itself


def require_ros_launch():
    """Skip the calling test unless the real `launch` and `launch_ros` packages import."""
    try:
        import launch
    except ImportError as exc:
        pytest.skip(f"`launch` is not installed ({exc}); it comes with a ROS 2 distribution")
    if not hasattr(launch, "LaunchDescription"):
        # Without ROS, `import launch` finds this repository's launch/ folder (a namespace
        # package) when the repository root is on sys.path.
        pytest.skip("`launch` is not installed (only the repository's launch/ folder imports)")
    try:
        import launch_ros.actions  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"`launch_ros` is not installed ({exc}); it comes with a ROS 2 distribution")


def test_generate_launch_description_declares_the_arguments(launch_module):
    require_ros_launch()
    from launch.launch_context import LaunchContext
    from launch.utilities import perform_substitutions

    description = launch_module.generate_launch_description()
    declared = description.get_launch_arguments()
    assert [argument.name for argument in declared] == CONTRACT_ARGUMENTS
    context = LaunchContext()
    defaults = {a.name: perform_substitutions(context, a.default_value) for a in declared}
    for name, value in CONTRACT_DEFAULTS.items():
        assert defaults[name] == value, name
    share = launch_module.share_directory()
    assert defaults["params_file"] == str(share / "config" / "ovseg.yaml")
    assert all(argument.description for argument in declared)


def test_launch_setup_starts_the_node_and_rviz(launch_module, monkeypatch, tmp_path):
    require_ros_launch()
    from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
    from launch.launch_context import LaunchContext
    from launch.utilities import normalize_to_list_of_substitutions, perform_substitutions
    from launch_ros.actions import Node

    monkeypatch.delenv("FASTDDS_DEFAULT_PROFILES_FILE", raising=False)
    params_file = tmp_path / "ovseg.yaml"
    params_file.write_text("/**:\n  ros__parameters: {}\n")
    description = launch_module.generate_launch_description()
    context = LaunchContext()

    def text(value):
        if isinstance(value, str):
            return value
        return perform_substitutions(context, normalize_to_list_of_substitutions(value))

    for entity in description.entities:
        if isinstance(entity, DeclareLaunchArgument):
            context.launch_configurations[entity.name] = text(entity.default_value)
    context.launch_configurations.update(
        {"params_file": str(params_file), "vocabulary": "[door, chair]", "rviz": "true"}
    )
    (setup,) = [e for e in description.entities if isinstance(e, OpaqueFunction)]
    actions = setup.execute(context)

    environment = [a for a in actions if isinstance(a, SetEnvironmentVariable)]
    assert [(text(a.name), text(a.value)) for a in environment] == [
        (
            "FASTDDS_DEFAULT_PROFILES_FILE",
            str(launch_module.share_directory() / "config" / "fastdds.xml"),
        )
    ]

    def field(node, name):
        # Public getters on current launch_ros; older releases only have the private attribute.
        private = {"package": "_Node__package", "executable": "_Node__node_executable"}[name]
        return text(getattr(node, f"node_{name}", None) or getattr(node, private))

    nodes = [a for a in actions if isinstance(a, Node)]
    assert [(field(n, "package"), field(n, "executable")) for n in nodes] == [
        (PACKAGE, "ovseg_node"),
        ("rviz2", "rviz2"),
    ]

    context.launch_configurations["vocabulary"] = "door"
    with pytest.raises(ValueError, match="vocabulary"):
        setup.execute(context)
