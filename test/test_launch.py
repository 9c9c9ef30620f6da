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
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

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
    "depth",
    "namespace",
    "params_file",
    "vocabulary",
    "method",
    "device",
    "pretrained",
    "checkpoint",
    "params",
    "lifecycle",
    "autostart",
    "rviz",
]

CONTRACT_DEFAULTS = {
    "image": "/camera/color/image_raw",
    "camera_info": "/camera/color/camera_info",
    "depth": "",
    "namespace": "",
    "vocabulary": "",
    "method": "",
    "device": "",
    "pretrained": "",
    "checkpoint": "",
    "params": "",
    "lifecycle": "false",
    "autostart": "true",
    "rviz": "false",
}

#: The registry's method names (ovseg_ros/engine/methods), as `ovseg methods` lists them.
METHODS = [
    "clearclip", "clip", "cliper", "cliprc", "cliptrase", "maskclip", "naclip", "pearl",
    "proxyclip", "sclip",
]  # fmt: skip


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
            choices = []  # `A if condition else B`: one node per branch
            for keyword in node.keywords:
                if keyword.arg in ("package", "executable", "name"):
                    if isinstance(keyword.value, ast.IfExp):
                        choices = [
                            (keyword.arg, _evaluate(branch, constants))
                            for branch in (keyword.value.body, keyword.value.orelse)
                        ]
                    else:
                        fields[keyword.arg] = _evaluate(keyword.value, constants)
            nodes += [{**fields, k: v} for k, v in choices] if choices else [fields]
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
    assert executables == {"ovseg_node", "ovseg_lifecycle_node"}
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


def test_depth_argument_remaps_the_depth_and_enables_it(launch_module):
    """depth:=<registered depth topic>: remapped with the camera_info beside it, depth.enabled."""
    assert launch_module.node_remappings(
        "/camera/color/image_raw", "", "/camera/aligned_depth_to_color/image_raw"
    )[-2:] == [
        ("depth", "/camera/aligned_depth_to_color/image_raw"),
        ("depth/camera_info", "/camera/aligned_depth_to_color/camera_info"),
    ]
    zed = launch_module.node_remappings("/i", "", "/zed/zed_node/depth/depth_registered")
    assert zed[-1] == ("depth/camera_info", "/zed/zed_node/depth/camera_info")
    plain = launch_module.launch_plan(_argument_values(launch_module), REPO, {})
    assert not any(name == "depth" for name, _ in plain.remappings)
    assert not any(isinstance(p, dict) and "depth.enabled" in p for p in plain.parameters)
    plan = launch_module.launch_plan(
        _argument_values(launch_module, depth="/cam/depth/image_rect_raw"), REPO, {}
    )
    assert ("depth", "/cam/depth/image_rect_raw") in plan.remappings
    assert ("depth/camera_info", "/cam/depth/camera_info") in plan.remappings
    assert {"depth.enabled": True} in plan.parameters


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
# (b) Always: weights, generic overrides, method names, RViz check, the node's exit (issue 10,
# items 12-14)


def test_pretrained_argument_selects_the_weights(launch_module):
    """pretrained:=none also clears the file's checkpoint, which would otherwise win."""
    assert launch_module.node_parameters("/p/ovseg.yaml", pretrained=" none ") == [
        "/p/ovseg.yaml",
        {"model.pretrained": "none", "model.checkpoint": ""},
    ]


def test_checkpoint_argument_is_checked_and_made_absolute(launch_module, tmp_path, monkeypatch):
    (tmp_path / "w.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert launch_module.node_parameters("/p/ovseg.yaml", checkpoint="w.pt") == [
        "/p/ovseg.yaml",
        {"model.checkpoint": str(tmp_path / "w.pt")},
    ]
    both = launch_module.node_parameters("/p/ovseg.yaml", pretrained="openai", checkpoint="w.pt")
    assert both[1] == {"model.pretrained": "openai", "model.checkpoint": str(tmp_path / "w.pt")}
    with pytest.raises(launch_module.LaunchArgumentError, match=r"^checkpoint:='nope.pt' does not"):
        launch_module.node_parameters("/p/ovseg.yaml", checkpoint="nope.pt")
    with pytest.raises(launch_module.LaunchArgumentError, match="is a folder, not a weights file"):
        launch_module.node_parameters("/p/ovseg.yaml", checkpoint=str(tmp_path))


@pytest.fixture(scope="module")
def known(launch_module):
    """The node's parameters and defaults, from the repository's config/ovseg.yaml."""
    parameters = launch_module.default_parameters(REPO)
    assert isinstance(parameters["input.short_side"], int)
    assert isinstance(parameters["prob_threshold"], float)
    return parameters


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", {}),
        (
            "{input.short_side: 448, prob_threshold: 0.1}",
            {"input.short_side": 448, "prob_threshold": 0.1},
        ),
        # Nested mappings are dotted names (launch_ros flattens them the same way).
        (
            "{input: {short_side: 448}, model: {name: ovseg-tiny}}",
            {"input.short_side": 448, "model.name": "ovseg-tiny"},
        ),
        # An integer for a float parameter: rclpy would reject INTEGER for a DOUBLE parameter.
        ("{prob_threshold: 0, overlay.alpha: 1}", {"prob_threshold": 0.0, "overlay.alpha": 1.0}),
        (
            "{model.pretrained: none, text.cache_dir: none}",
            {"model.pretrained": "none", "text.cache_dir": "none"},
        ),
        (
            "{cameras: [front, rear], enabled: false}",
            {"cameras": ["front", "rear"], "enabled": False},
        ),
        ("{use_sim_time: true}", {"use_sim_time": True}),
    ],
)
def test_params_argument_overrides_any_parameter(launch_module, known, text, expected):
    parsed = launch_module.parse_params(text, known)
    assert parsed == expected
    assert [type(v) for v in parsed.values()] == [type(v) for v in expected.values()]


def test_method_params_names_are_checked_when_the_table_lists_them(launch_module):
    """method_params.* names are open only while config/ovseg.yaml lists none of them."""
    listed = {"prob_threshold": 0.0, "method_params.naclip.sigma": 5.0}
    assert launch_module.parse_params("{method_params.naclip.sigma: 4}", listed) == {
        "method_params.naclip.sigma": 4.0
    }
    with pytest.raises(
        launch_module.LaunchArgumentError, match="did you mean method_params.naclip.sigma?"
    ):
        launch_module.parse_params("{method_params.naclip.sigm: 4}", listed)
    unlisted = {"prob_threshold": 0.0}
    assert launch_module.parse_params("{method_params.sigma: 4.0}", unlisted) == {
        "method_params.sigma": 4.0
    }
    # Nested YAML in the parameter file gives the same dotted names.
    assert launch_module.parse_params("{method_params: {naclip: {sigma: 3}}}", listed) == {
        "method_params.naclip.sigma": 3.0
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("[a, b]", "params:='[a, b]' is not a mapping"),
        ("{a: [b}", "is not valid YAML"),
        (
            "{input.shortside: 448}",
            "'input.shortside' is not a parameter of the node; did you mean input.short_side?",
        ),
        ("{input.short_side: 448.5}", "input.short_side must be an integer, not a number 448.5"),
        ("{prob_threshold: high}", "prob_threshold must be a number, not a string 'high'"),
        (
            "{model.pretrained: yes}",
            "model.pretrained must be a string, not a boolean True (quote it)",
        ),
        ("{enabled: 1}", "enabled must be a boolean, not an integer 1"),
        ("{vocabulary: door}", "vocabulary must be a list of strings, not a string 'door'"),
        ("{vocabulary: [door, 42]}", "is not a list of strings, numbers or booleans of one type"),
        (
            "{background_words: []}",
            "background_words is an empty list, which launch_ros cannot pass",
        ),
        ("{model.checkpoint: }", "model.checkpoint has no value (YAML null)"),
        ("{1: 2}", "1 is not a parameter name"),
    ],
)
def test_bad_params_argument_gives_one_sentence(launch_module, known, text, message):
    with pytest.raises(launch_module.LaunchArgumentError) as caught:
        launch_module.node_parameters("/p/ovseg.yaml", params=text, known=known)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_params_argument_merges_with_the_other_arguments(launch_module, known, tmp_path):
    parameters = launch_module.node_parameters(
        "/p/ovseg.yaml",
        method="sclip",
        pretrained="none",
        params="{model.name: ovseg-tiny, device: cpu, templates: single}",
        known=known,
        methods=METHODS,
    )
    assert parameters == [
        "/p/ovseg.yaml",
        {
            "model.name": "ovseg-tiny",
            "device": "cpu",
            "templates": "single",
            "method": "sclip",
            "model.pretrained": "none",
            "model.checkpoint": "",
        },
    ]
    with pytest.raises(launch_module.LaunchArgumentError, match="method is given twice"):
        launch_module.node_parameters("/p/ovseg.yaml", method="clip", params="{method: sclip}")
    with pytest.raises(launch_module.LaunchArgumentError, match="params: model.checkpoint '/no"):
        launch_module.node_parameters("/p/ovseg.yaml", params="{model.checkpoint: /no/w.pt}")
    with pytest.raises(launch_module.LaunchArgumentError, match="params: method 'bogus' is not"):
        launch_module.node_parameters("/p/ovseg.yaml", params="{method: bogus}", methods=METHODS)


def test_registry_names_are_read_without_importing_torch(launch_module):
    """The cheap reader (ast over ovseg_ros/engine/methods/*.py) imports neither ovseg_ros nor
    torch, so a wrong method:= fails before anything loads."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(LAUNCH_FILE)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(','.join(m.registered_methods(m.methods_directory())))\n"
        "print('torch' in sys.modules, 'ovseg_ros' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == [",".join(METHODS), "False", "False"]
    assert launch_module.registered_methods(None) == []


def test_registry_names_match_the_engine_registry(launch_module):
    pytest.importorskip("torch")
    from ovseg_ros.engine.methods import available_methods

    assert launch_module.registered_methods(launch_module.methods_directory()) == (
        available_methods()
    )


def test_unknown_method_is_rejected_with_the_known_names(launch_module):
    with pytest.raises(launch_module.LaunchArgumentError) as caught:
        launch_module.node_parameters("/p/ovseg.yaml", method="bogus", methods=METHODS)
    assert str(caught.value) == (
        "method:='bogus' is not a segmentation method; the methods are "
        + ", ".join(METHODS)
        + " (`ovseg methods` describes them)"
    )
    with pytest.raises(launch_module.LaunchArgumentError, match="did you mean naclip?"):
        launch_module.node_parameters("/p/ovseg.yaml", method="naclp", methods=METHODS)
    # Without a registry to read, the node checks the name itself.
    assert launch_module.node_parameters("/p/ovseg.yaml", method="bogus")[1] == {"method": "bogus"}


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_device_argument_accepts_the_documented_devices(launch_module, device):
    assert launch_module.node_parameters("/p/ovseg.yaml", device=device)[1] == {"device": device}


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:x", "cuda:0,1"])
def test_device_argument_rejects_other_text(launch_module, device):
    with pytest.raises(launch_module.LaunchArgumentError, match="use auto, cpu, cuda or cuda:N"):
        launch_module.node_parameters("/p/ovseg.yaml", device=device)


def _missing_package(package: str) -> str:
    raise KeyError(f"package '{package}' not found")  # ament_index's PackageNotFoundError


def _fake_rviz_prefix(folder: Path) -> Path:
    """An install prefix holding an rviz2 executable, as apt installs it."""
    executable = folder / "lib" / "rviz2" / "rviz2"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\nexec sleep 60\n")
    executable.chmod(0o755)
    return folder


def test_rviz_check_says_what_to_install(launch_module):
    with pytest.raises(launch_module.LaunchArgumentError) as caught:
        launch_module.check_rviz(_missing_package, {"ROS_DISTRO": "kilted"})
    assert str(caught.value) == (
        "rviz:=true but RViz is not installed (no package rviz2 in the ament index); install it "
        "with `sudo apt install ros-kilted-rviz2` and source your ROS setup again, or launch "
        "with rviz:=false"
    )
    with pytest.raises(launch_module.LaunchArgumentError, match=r"ros-\$ROS_DISTRO-rviz2"):
        launch_module.check_rviz(_missing_package, {})


def test_rviz_check_needs_the_executable(launch_module, tmp_path):
    with pytest.raises(launch_module.LaunchArgumentError, match="has no lib/rviz2/rviz2"):
        launch_module.check_rviz(lambda package: str(tmp_path), {})
    prefix = _fake_rviz_prefix(tmp_path / "opt")
    launch_module.check_rviz(lambda package: str(prefix), {})


def _argument_values(launch_module, **changes: str) -> dict[str, str]:
    """Launch argument values as launch passes them: the defaults with `changes`."""
    values = {name: default for name, default, _ in launch_module.launch_arguments(REPO)}
    values.update(changes)
    return values


def test_launch_plan_checks_rviz_before_anything_starts(launch_module, tmp_path):
    """rviz:=true without rviz2: the plan, computed before any action, fails; rviz:=false never
    looks rviz2 up."""
    with pytest.raises(launch_module.LaunchArgumentError, match="sudo apt install"):
        launch_module.launch_plan(
            _argument_values(launch_module, rviz="true"), REPO, {}, package_prefix=_missing_package
        )
    plan = launch_module.launch_plan(
        _argument_values(launch_module, rviz="false"), REPO, {}, package_prefix=_missing_package
    )
    assert plan.rviz is False and plan.rviz_arguments == []
    prefix = _fake_rviz_prefix(tmp_path / "opt")
    plan = launch_module.launch_plan(
        _argument_values(launch_module, rviz="true", namespace="robot1"),
        REPO,
        {},
        package_prefix=lambda package: str(prefix),
    )
    assert plan.rviz is True
    assert plan.rviz_arguments == ["-d", str(REPO / "config" / "ovseg.rviz")]
    assert plan.rviz_remappings == launch_module.rviz_remappings("robot1")


def test_launch_plan_checks_every_argument(launch_module):
    """The plan uses the registry read from the source tree and the package's parameter table."""
    values = _argument_values(
        launch_module,
        method="naclip",
        pretrained="none",
        params="{model.name: ovseg-tiny, prob_threshold: 0}",
    )
    plan = launch_module.launch_plan(values, REPO, {"FASTDDS_DEFAULT_PROFILES_FILE": "/mine.xml"})
    assert plan.parameters == [
        values["params_file"],
        {
            "model.name": "ovseg-tiny",
            "prob_threshold": 0.0,
            "method": "naclip",
            "model.pretrained": "none",
            "model.checkpoint": "",
        },
    ]
    assert plan.environment == {}
    assert plan.remappings[0] == ("image", "/camera/color/image_raw")
    for change, message in [
        ({"method": "bogus"}, "method:='bogus' is not a segmentation method"),
        ({"params": "{input.shortside: 1}"}, "did you mean input.short_side?"),
        ({"params_file": "/nope.yaml"}, "params_file:='/nope.yaml' is not a file"),
    ]:
        with pytest.raises(launch_module.LaunchArgumentError, match=message):
            launch_module.launch_plan(_argument_values(launch_module, **change), REPO, {})


def test_lifecycle_argument_starts_the_managed_node(launch_module):
    """lifecycle:=true runs ovseg_lifecycle_node; autostart becomes lifecycle.autostart."""
    plain = launch_module.launch_plan(_argument_values(launch_module), REPO, {})
    assert plain.lifecycle is False
    assert not any(isinstance(p, dict) and "lifecycle.autostart" in p for p in plain.parameters)
    managed = launch_module.launch_plan(_argument_values(launch_module, lifecycle="true"), REPO, {})
    assert managed.lifecycle is True
    assert managed.parameters[-1] == {"lifecycle.autostart": True}  # the default: start at once
    manual = launch_module.launch_plan(
        _argument_values(launch_module, lifecycle="true", autostart="false"), REPO, {}
    )
    assert manual.parameters[-1] == {"lifecycle.autostart": False}  # a lifecycle manager's
    with pytest.raises(launch_module.LaunchArgumentError, match="autostart:='maybe'"):
        launch_module.launch_plan(
            _argument_values(launch_module, lifecycle="true", autostart="maybe"), REPO, {}
        )
    assert {"package": PACKAGE, "executable": "ovseg_lifecycle_node", "name": "ovseg"} in (
        launched_nodes()
    )


@pytest.mark.parametrize(
    "returncode, reason",
    [
        (0, "ovseg_node exited"),
        (3, "ovseg_node exited with code 3 (the model could not be loaded; its message is above)"),
        (2, "ovseg_node exited with code 2 (invalid parameters; its message is above)"),
        (1, "ovseg_node exited with code 1 (an error; its message is above)"),
        (-9, "ovseg_node was killed by SIGKILL"),
        (None, "ovseg_node ended with an unknown exit code"),
    ],
)
def test_node_exit_reason(launch_module, returncode, reason):
    assert launch_module.node_exit_reason(returncode) == reason


def test_only_an_unexpected_error_exit_fails_the_launch(launch_module):
    fails = launch_module.node_exit_fails_launch
    assert fails(3, shutting_down=False) and fails(-9, shutting_down=False)
    assert not fails(0, shutting_down=False)
    # Ctrl-C: the launch stopped the node itself, whatever its exit code.
    assert not fails(3, shutting_down=True) and not fails(-2, shutting_down=True)


def test_on_node_exit_raises_for_an_error_exit(launch_module):
    """launch turns the exception into "Caught exception in launch", a shutdown and exit code 1."""
    event = SimpleNamespace(returncode=3)
    with pytest.raises(launch_module.NodeExitError, match="exited with code 3"):
        launch_module.on_node_exit(event, SimpleNamespace(is_shutdown=False))
    assert launch_module.on_node_exit(event, SimpleNamespace(is_shutdown=True)) is None


def test_node_is_started_with_the_exit_handler():
    """The ovseg Node(...) call passes on_exit=on_node_exit (read with ast)."""
    calls = [
        node
        for node in ast.walk(launch_tree())
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "Node"
    ]
    on_exit = {
        ast.unparse(next(k.value for k in call.keywords if k.arg == "executable")): [
            ast.unparse(k.value) for k in call.keywords if k.arg == "on_exit"
        ]
        for call in calls
    }
    assert on_exit == {
        "LIFECYCLE_EXECUTABLE if plan.lifecycle else EXECUTABLE": ["on_node_exit"],
        "'rviz2'": [],
    }


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
    rviz_prefix = _fake_rviz_prefix(tmp_path / "opt")
    monkeypatch.setattr(launch_module, "ament_package_prefix", lambda package: str(rviz_prefix))
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
    # The launch ends with the node: ExecuteProcess keeps on_exit in a private attribute.
    assert nodes[0]._ExecuteLocal__on_exit is launch_module.on_node_exit
    assert nodes[1]._ExecuteLocal__on_exit is None

    context.launch_configurations["vocabulary"] = "door"
    with pytest.raises(ValueError, match="vocabulary"):
        setup.execute(context)


def _fake_install(prefix: Path, node_script: str, rviz: bool) -> Path:
    """An install prefix with ovseg_ros (its ovseg_node is `node_script`) and maybe rviz2."""
    index = prefix / "share" / "ament_index" / "resource_index" / "packages"
    index.mkdir(parents=True)
    packages = [PACKAGE] + (["rviz2"] if rviz else [])
    for package in packages:
        (index / package).write_text("")
        (prefix / "share" / package).mkdir(parents=True)
    (prefix / "share" / PACKAGE / "config").symlink_to(REPO / "config")
    node = prefix / "lib" / PACKAGE / "ovseg_node"
    node.parent.mkdir(parents=True)
    node.write_text(node_script)
    node.chmod(0o755)
    if rviz:
        _fake_rviz_prefix(prefix)
        rviz_script = prefix / "lib" / "rviz2" / "rviz2"
        rviz_script.write_text(f"#!/bin/sh\necho $$ > {prefix / 'rviz.pid'}\nexec sleep 60\n")
    return prefix


def _run_launch(prefix: Path, monkeypatch, *arguments: str) -> tuple[int, float]:
    """Run launch/segment.launch.py as `ros2 launch` does; (return code, seconds)."""
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    from launch import LaunchDescription, LaunchService

    monkeypatch.setenv("AMENT_PREFIX_PATH", str(prefix))
    monkeypatch.setenv("FASTDDS_DEFAULT_PROFILES_FILE", str(REPO / "config" / "fastdds.xml"))
    monkeypatch.setenv("ROS_DISTRO", "kilted")
    pairs = [tuple(argument.split(":=", 1)) for argument in arguments]
    service = LaunchService(argv=list(arguments), noninteractive=True)
    service.include_launch_description(
        LaunchDescription(
            [
                IncludeLaunchDescription(
                    PythonLaunchDescriptionSource(str(LAUNCH_FILE)), launch_arguments=pairs
                )
            ]
        )
    )
    # A launch that does not end by itself (the failure these tests catch) is stopped after 30 s.
    timer = threading.Timer(30.0, service.shutdown)
    timer.start()
    start = time.monotonic()
    try:
        code = service.run()
    finally:
        timer.cancel()
    return code, time.monotonic() - start


def test_launch_without_rviz2_starts_nothing(tmp_path, monkeypatch):
    """rviz:=true without rviz2: exit code 1 and the node never started (issue 10, item 12)."""
    require_ros_launch()
    marker = tmp_path / "node-started"
    prefix = _fake_install(
        tmp_path / "install", f"#!/bin/sh\ntouch {marker}\nexec sleep 60\n", False
    )
    code, seconds = _run_launch(prefix, monkeypatch, "rviz:=true")
    assert code == 1 and seconds < 10
    assert not marker.exists()


def test_launch_ends_with_the_node_and_fails_with_it(tmp_path, monkeypatch):
    """The node exits 3: RViz is stopped and the launch returns 1 (issue 10, item 13)."""
    require_ros_launch()
    prefix = _fake_install(tmp_path / "install", "#!/bin/sh\nsleep 1\nexit 3\n", True)
    code, seconds = _run_launch(prefix, monkeypatch, "rviz:=true", "pretrained:=none")
    assert code == 1 and seconds < 20
    rviz_pid = int((prefix / "rviz.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(rviz_pid, 0)


def test_launch_ends_cleanly_when_the_node_exits_0(tmp_path, monkeypatch):
    require_ros_launch()
    prefix = _fake_install(tmp_path / "install", "#!/bin/sh\nsleep 1\nexit 0\n", True)
    code, seconds = _run_launch(prefix, monkeypatch, "rviz:=true")
    assert code == 0 and seconds < 20


def test_launch_rejects_a_bogus_method_before_starting(tmp_path, monkeypatch):
    """method:=bogus fails in the launch file, before the node (and its model) starts."""
    require_ros_launch()
    marker = tmp_path / "node-started"
    prefix = _fake_install(
        tmp_path / "install", f"#!/bin/sh\ntouch {marker}\nexec sleep 60\n", False
    )
    code, seconds = _run_launch(prefix, monkeypatch, "method:=bogus")
    assert code == 1 and seconds < 10
    assert not marker.exists()
