"""The node's parameter table, config/ovseg.yaml, and the node's pure helpers (no ROS started)."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from ovseg_ros.engine.config import SegmenterConfig
from ovseg_ros.engine.methods import describe_methods
from ovseg_ros.ros import param_table as T
from ovseg_ros.ros import params as P
from ovseg_ros.ros.diagnostics import percentile
from ovseg_ros.ros.node import choose_reliability

REPO = Path(__file__).resolve().parents[1]
YAML_FILE = REPO / "config" / "ovseg.yaml"
CONTRACT = REPO.parent / "shared" / "docs" / "ROS_INTERFACE.md"

#: Every parameter name ROS_INTERFACE.md lists (method_params.* handled separately).
CONTRACT_PARAMETERS = {
    "model.name",
    "model.pretrained",
    "model.checkpoint",
    "model.cache_dir",
    "device",
    "precision",
    "method",
    "vocabulary",
    "background_words",
    "templates",
    "prob_threshold",
    "area_threshold",
    "refine",
    "input.short_side",
    "inference.mode",
    "inference.crop",
    "inference.stride",
    "input.transport",
    "input.qos",
    "output.qos",
    "cameras",
    "max_rate_hz",
    "enabled",
    "publish.labels",
    "publish.confidence",
    "publish.masks",
    "publish.overlay",
    "overlay.alpha",
}


def _yaml_params() -> dict:
    data = yaml.safe_load(YAML_FILE.read_text())
    return data["/**"]["ros__parameters"]


def test_yaml_file_is_the_generated_one():
    # Defaults live in the code; the YAML is their published copy and must not drift.
    assert YAML_FILE.read_text() == T.default_yaml(), (
        "config/ovseg.yaml is out of date: run "
        "`.venv/bin/python -m ovseg_ros.ros.param_table > config/ovseg.yaml`"
    )


def test_yaml_holds_every_parameter_with_its_default():
    values = _yaml_params()
    specs = T.parameter_specs()
    methods = T.method_parameters()
    assert set(values) == {s.name for s in specs} | {m.name for m in methods}
    for spec in specs:
        assert values[spec.name] == spec.default, spec.name
        assert type(values[spec.name]) is type(spec.default), spec.name
    for mp in methods:
        assert values[mp.name] == mp.default and type(values[mp.name]) is type(mp.default)


def test_every_method_hyper_parameter_is_a_parameter_with_its_published_default():
    names = {m.name: m for m in T.method_parameters()}
    for method in describe_methods():
        for key, default in method["params"].items():
            mp = names.pop(f"method_params.{method['name']}.{key}")
            assert mp.default == default and mp.method == method["name"] and mp.field == key
    assert not names
    # Shared names keep each method's own default (one method_params.logit_scale could not).
    defaults = {m.name: m.default for m in T.method_parameters()}
    assert defaults["method_params.naclip.logit_scale"] == 40.0
    assert defaults["method_params.clip.logit_scale"] == 100.0


def test_method_overrides_are_the_chosen_methods_changed_values():
    values = {
        "method_params.naclip.sigma": 3.0,
        "method_params.naclip.logit_scale": 40.0,  # the default: not an override
        "method_params.sclip.logit_scale": 65.0,
    }
    assert P.method_overrides(values, "naclip") == {"sigma": 3.0}
    assert P.method_overrides(values, "sclip") == {"logit_scale": 65.0}
    assert P.method_overrides(values, "clip") == {}


def test_contract_parameters_are_all_declared():
    names = {s.name for s in T.parameter_specs()}
    assert CONTRACT_PARAMETERS <= names, CONTRACT_PARAMETERS - names


def test_contract_document_lists_no_parameter_we_miss():
    if not CONTRACT.is_file():
        pytest.skip("ROS_INTERFACE.md not found next to the repository")
    text = CONTRACT.read_text()
    section = text.split("## Parameters", 1)[1].split("\n## ", 1)[0]
    mentioned = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", section))
    names = {s.name for s in T.parameter_specs()}
    # Values (auto, cpu, ...) are quoted too; keep what looks like a parameter name of ours.
    missing = {m for m in mentioned if ("." in m or m in CONTRACT_PARAMETERS) and m not in names}
    missing -= {"method_params.x"}
    assert not {m for m in missing if not m.startswith("method_params")}, missing


def test_specs_mirror_engine_config_fields():
    engine = {s.attr: s for s in T.parameter_specs() if s.owner == "engine"}
    cfg = SegmenterConfig()
    for f in dataclasses.fields(SegmenterConfig):
        if f.name == "method_params":
            assert f.name not in engine
            continue
        assert engine[f.name].name == f.metadata["key"]
        assert engine[f.name].default == getattr(cfg, f.name)


def test_spec_kinds_and_constraints():
    by_name = {s.name: s for s in T.parameter_specs()}
    assert by_name["vocabulary"].kind == "string_array"
    assert by_name["cameras"].kind == "string_array"
    assert by_name["input.short_side"].kind == "integer"
    assert by_name["overlay.alpha"].kind == "double"
    assert by_name["enabled"].kind == "bool"
    assert by_name["model.name"].read_only and not by_name["vocabulary"].read_only
    assert "one of: auto, sensor_data, reliable" in by_name["input.qos"].constraints()
    assert "range [0, 1]" in by_name["overlay.alpha"].constraints()
    for spec in by_name.values():
        assert spec.description, spec.name


def test_split_values_builds_both_configs():
    cfg, options = P.split_values(
        {
            "method": "sclip",
            "method_params.sclip.logit_scale": 30.0,
            "method_params.naclip.sigma": 2.0,  # another method's: not used by sclip
            "input.short_side": 224,
            "cameras": ["front", "rear"],
            "max_rate_hz": 2.5,
        }
    )
    assert cfg.method == "sclip" and cfg.method_params == {"logit_scale": 30.0}
    assert cfg.short_side == 224
    assert options.cameras == ["front", "rear"] and options.max_rate_hz == 2.5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"input.qos": "fast"}, "input.qos must be one of"),
        ({"overlay.alpha": 1.5}, "overlay.alpha must be in"),
        ({"cameras": ["front", "front"]}, "must be unique"),
        ({"cameras": ["1cam"]}, "not a valid topic name"),
        ({"cameras": ["/abs"]}, "not a valid topic name"),
        ({"inference.mode": "tiles"}, "inference.mode must be one of"),
        ({"no.such": 1}, "unknown parameter"),
    ],
)
def test_split_values_rejects_with_the_parameter_name(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        P.split_values(values)


def test_camera_names():
    assert P.camera_name_ok("front") and P.camera_name_ok("arm/wrist_1")
    for bad in ("", "9a", "/a", "a/", "a//b", "a-b", "kamera\u00e9"):
        assert not P.camera_name_ok(bad), bad


def test_choose_reliability():
    from rclpy.qos import ReliabilityPolicy as R

    assert choose_reliability([]) == R.BEST_EFFORT  # nobody yet: match anyone
    assert choose_reliability([R.RELIABLE, R.RELIABLE]) == R.RELIABLE
    assert choose_reliability([R.RELIABLE, R.BEST_EFFORT]) == R.BEST_EFFORT
    assert choose_reliability([R.BEST_EFFORT]) == R.BEST_EFFORT


def test_percentile():
    assert percentile([], 50) != percentile([], 50)  # NaN
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0
