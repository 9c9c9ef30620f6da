"""The node's parameter table and its published copy, config/ovseg.yaml.

One table built from the engine's SegmenterConfig plus the node's own options (params.py): every
parameter the node declares comes from here, with its type, description, range and whether it can
change while the node runs, and every method hyper-parameter as method_params.<method>.<name>.
`config/ovseg.yaml` holds the same names with the same default values; `default_yaml()` writes
that file and a test keeps the two equal, so a default lives in exactly one place (the dataclasses
of params.py and SegmenterConfig) and the YAML is its published copy:

    .venv/bin/python -m ovseg_ros.ros.param_table > config/ovseg.yaml

No rclpy here: the node turns `ParamSpec` into ParameterDescriptors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .params import method_param_name, option_fields


@dataclass(frozen=True)
class ParamSpec:
    """One ROS parameter: name, default, kind, description, constraints, where it goes."""

    name: str
    default: Any
    kind: str  # "string", "integer", "double", "bool", "string_array"
    description: str
    choices: tuple[str, ...]
    lo: float | None
    hi: float | None
    runtime: bool
    owner: str  # "engine" (SegmenterConfig) or "node" (NodeOptions)
    attr: str  # the dataclass field name

    @property
    def read_only(self) -> bool:
        """Whether the parameter is fixed once the node has started."""
        return not self.runtime

    def constraints(self) -> str:
        """Human summary of what values are allowed (for the descriptor)."""
        parts = []
        if self.choices:
            parts.append("one of: " + ", ".join(self.choices))
        if self.lo is not None:
            parts.append(f"range [{self.lo:g}, {self.hi:g}]")
        parts.append("run time" if self.runtime else "read-only: set at start-up")
        return "; ".join(parts)


def _kind(value: Any, annotation: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "string_array"
    raise TypeError(f"no ROS parameter kind for {annotation!r}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def parameter_specs(managed: bool = False) -> list[ParamSpec]:
    """Every node parameter, engine fields first; method_params is handled separately.

    `managed`: also the lifecycle.* parameters of ovseg_lifecycle_node (owner "lifecycle").
    """
    specs: list[ParamSpec] = []
    for owner, f in option_fields(managed):
        meta = f.metadata
        default = _default(f)
        specs.append(
            ParamSpec(
                name=meta["key"],
                default=default,
                kind=_kind(default, f.type),
                description=meta["help"],
                choices=tuple(meta["choices"]),
                lo=meta["lo"],
                hi=meta["hi"],
                runtime=bool(meta["runtime"]),
                owner=owner,
                attr=f.name,
            )
        )
    return specs


@dataclass(frozen=True)
class MethodParam:
    """One method hyper-parameter as a ROS parameter: its value is the published default."""

    name: str  # method_params.<method>.<field>
    method: str
    field: str
    default: Any
    description: str


def method_parameters() -> list[MethodParam]:
    """Every registered method's hyper-parameters, as ROS parameters with their defaults."""
    from ..engine.methods import describe_methods

    out = []
    for method in describe_methods():
        for key, default in method["params"].items():
            out.append(
                MethodParam(
                    name=method_param_name(method["name"], key),
                    method=method["name"],
                    field=key,
                    default=default,
                    description=(
                        f"{method['name']} hyper-parameter {key!r} (published default "
                        f"{default!r}); used while method is {method['name']}"
                    ),
                )
            )
    return out


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _wrap(text: str, width: int = 96) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines


YAML_HEADER = """\
# ovseg_ros node parameters: every parameter the node declares, with its default value.
# Generated from the code (ovseg_ros/ros/params.py + the engine's SegmenterConfig) by
#   .venv/bin/python -m ovseg_ros.ros.param_table > config/ovseg.yaml
# and checked against it by test/test_params.py, so this file and the node never disagree.
# Copy it, change what you need, and pass it with
#   ros2 run ovseg_ros ovseg_node --ros-args --params-file my_ovseg.yaml
# Parameters marked [run time] can also be changed while the node runs (ros2 param set);
# [read-only] ones are fixed at start-up.
#
# Method hyper-parameters are method_params.<method>.<name> (listed at the end with their
# published defaults), e.g. method_params.naclip.sigma: 5.0 is NACLIP's Gaussian window; each
# applies while its method is in use. `ovseg methods` explains them.
"""


def default_yaml() -> str:
    """The text of config/ovseg.yaml: all parameters with their defaults and descriptions."""
    lines = [YAML_HEADER, "/**:", "  ros__parameters:"]
    for spec in parameter_specs():
        lines.append("")
        for part in _wrap(spec.description):
            lines.append(f"    # {part}")
        lines.append(f"    # [{spec.constraints()}]")
        if spec.kind == "string_array":
            if not spec.default:
                lines.append(f"    {spec.name}: []")
            else:
                lines.append(f"    {spec.name}:")
                lines.extend(f"      - {_yaml_scalar(v)}" for v in spec.default)
        else:
            lines.append(f"    {spec.name}: {_yaml_scalar(spec.default)}")
    lines += ["", "    # --- method hyper-parameters (published defaults; [run time]) ---"]
    method = ""
    for mp in method_parameters():
        if mp.method != method:
            method = mp.method
            lines += ["", f"    # {method}"]
        lines.append(f"    {mp.name}: {_yaml_scalar(mp.default)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(default_yaml(), end="")
