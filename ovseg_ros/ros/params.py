"""The node's options: the ROS layer's dataclasses, their validation, values -> config.

NodeOptions (topics, QoS, outputs, depth) and LifecycleOptions (ovseg_lifecycle_node only) carry,
like the engine's SegmenterConfig, each parameter's key, help, range and run-time flag in their
field metadata; `option_fields()` lists those fields with their owner. `split_values()` turns ROS
parameter values into a validated SegmenterConfig and NodeOptions (method_params.<method>.* via
`method_overrides()`), `check_node_options()` validates a changed NodeOptions.

The parameter table built from these fields (ParamSpec, method hyper-parameters) and its
published copy config/ovseg.yaml are param_table.py's. No rclpy here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..engine.config import SegmenterConfig, _opt, check_fields, parameter_fields

TRANSPORTS = ("raw", "compressed")
OVERSIZE = ("reject", "downscale")
#: Default largest input frame: 4K UHD (3840 x 2160).
DEFAULT_MAX_PIXELS = 3840 * 2160
INPUT_QOS = ("auto", "sensor_data", "reliable")
OUTPUT_QOS = ("reliable", "sensor_data")
DEPTH_CAMERA_INFO = ("color", "depth")
LIFECYCLE_PREFIX = "lifecycle."


@dataclass
class NodeOptions:
    """Parameters of the ROS layer only (the engine knows nothing of topics or QoS)."""

    transport: str = field(
        default="raw",
        metadata=_opt(
            "input.transport",
            "raw: subscribe <camera>/image (sensor_msgs/Image); compressed: subscribe "
            "<camera>/image/compressed (sensor_msgs/CompressedImage, jpeg or png)",
            choices=TRANSPORTS,
        ),
    )
    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata=_opt(
            "input.max_pixels",
            "largest input frame in pixels (width x height); a raw frame is checked from its "
            "width and height, a compressed one from its header, before anything is decoded. "
            "Default: 4K (3840 x 2160)",
            lo=1,
            hi=16384 * 16384,
            runtime=True,
        ),
    )
    oversize: str = field(
        default="reject",
        metadata=_opt(
            "input.oversize",
            "a frame over input.max_pixels: reject (counted in /diagnostics) or downscale (raw "
            "frames resized, JPEG decoded at 1/2, 1/4 or 1/8; PNG over the limit is rejected)",
            choices=OVERSIZE,
            runtime=True,
        ),
    )
    input_qos: str = field(
        default="auto",
        metadata=_opt(
            "input.qos",
            "auto: reliable when every publisher of the input topic is reliable, best effort "
            "otherwise (re-checked when publishers appear); sensor_data or reliable force a "
            "profile; always keep-last 1",
            choices=INPUT_QOS,
        ),
    )
    output_qos: str = field(
        default="reliable",
        metadata=_opt(
            "output.qos",
            "reliable (keep last 1; serves reliable and best-effort subscribers) or "
            "sensor_data (best effort, the profile of nav2's semantic_segmentation_layer); "
            "~/vocabulary and ~/label_info stay reliable + transient local",
            choices=OUTPUT_QOS,
        ),
    )
    cameras: list[str] = field(
        default_factory=list,
        metadata=_opt(
            "cameras",
            "camera names; [] = one camera on image / camera_info. With names the node "
            "subscribes <name>/image and publishes ~/<name>/labels etc.",
        ),
    )
    max_rate_hz: float = field(
        default=0.0,
        metadata=_opt(
            "max_rate_hz",
            "most frames segmented per second over all cameras (0 = as fast as possible)",
            lo=0.0,
            hi=1000.0,
            runtime=True,
        ),
    )
    enabled: bool = field(
        default=True,
        metadata=_opt(
            "enabled",
            "false pauses processing (the model stays loaded); same as the ~/enable service",
            runtime=True,
        ),
    )
    publish_labels: bool = field(
        default=True,
        metadata=_opt("publish.labels", "publish ~/labels (class id per pixel)", runtime=True),
    )
    publish_confidence: bool = field(
        default=True,
        metadata=_opt(
            "publish.confidence", "publish ~/confidence (mono8 probability 0-255)", runtime=True
        ),
    )
    publish_masks: bool = field(
        default=True,
        metadata=_opt(
            "publish.masks",
            "publish ~/masks/<class> (0/255); only masks with subscribers are computed",
            runtime=True,
        ),
    )
    masks_advertised: int = field(
        default=64,
        metadata=_opt(
            "publish.masks_advertised",
            "the first this many classes get their ~/masks/<class> topics at once; any other "
            "class's topic appears when something subscribes to it (within a second)",
            lo=0,
            hi=1024,
            runtime=True,
        ),
    )
    publish_overlay: bool = field(
        default=True,
        metadata=_opt(
            "publish.overlay", "publish ~/overlay (rgb8 colours and legend)", runtime=True
        ),
    )
    overlay_alpha: float = field(
        default=0.5,
        metadata=_opt(
            "overlay.alpha",
            "opacity of the class colours in ~/overlay",
            lo=0.0,
            hi=1.0,
            runtime=True,
        ),
    )

    depth_enabled: bool = field(
        default=False,
        metadata=_opt(
            "depth.enabled",
            "subscribe <camera>/depth (sensor_msgs/Image 16UC1 millimetres or 32FC1 metres, "
            "registered to the colour camera) and publish ~/points, the semantic point cloud "
            "aligned pixel for pixel with ~/labels",
        ),
    )
    depth_camera_info: str = field(
        default="color",
        metadata=_opt(
            "depth.camera_info",
            "intrinsics of the cloud: color = the colour camera's <camera>/camera_info (right "
            "for depth registered to the colour image); depth = <camera>/depth/camera_info",
            choices=DEPTH_CAMERA_INFO,
        ),
    )
    depth_tolerance: float = field(
        default=0.02,
        metadata=_opt(
            "depth.tolerance",
            "seconds a depth image's stamp may differ from the colour frame's to be its partner; "
            "a frame without one publishes no cloud (counted in /diagnostics)",
            lo=0.0,
            hi=1.0,
            runtime=True,
        ),
    )
    depth_max_range: float = field(
        default=10.0,
        metadata=_opt(
            "depth.max_range",
            "metres; depth beyond it (like 0, NaN and inf) gives NaN points",
            lo=0.01,
            hi=1000.0,
            runtime=True,
        ),
    )
    points_stride: int = field(
        default=1,
        metadata=_opt(
            "points.stride",
            "~/points keeps every stride-th pixel of every stride-th row (1 = one point per "
            "label pixel, which nav2's semantic_segmentation_layer needs)",
            lo=1,
            hi=64,
            runtime=True,
        ),
    )

    def replace(self, **changes: Any) -> NodeOptions:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass
class LifecycleOptions:
    """Parameters of the managed node `ovseg_lifecycle_node` only (lifecycle.py)."""

    autostart: bool = field(
        default=False,
        metadata=_opt(
            "lifecycle.autostart",
            "configure and activate at start-up, as `ros2 launch ... lifecycle:=true` does by "
            "default; false leaves the node unconfigured for a lifecycle manager (nav2's "
            "lifecycle_manager with its own autostart)",
        ),
    )
    unload_on_deactivate: bool = field(
        default=False,
        metadata=_opt(
            "lifecycle.unload_on_deactivate",
            "deactivate also frees the model (GPU and host memory); activate then loads it "
            "again (seconds). False: only what frames used is freed and activation is instant",
            runtime=True,
        ),
    )


def option_fields(managed: bool = False) -> list[tuple[str, dataclasses.Field]]:
    """Every dataclass field that is one ROS parameter, with its owner, engine fields first.

    Owners: "engine" (SegmenterConfig), "node" (NodeOptions) and, when `managed`, "lifecycle"
    (LifecycleOptions, ovseg_lifecycle_node's lifecycle.*). SegmenterConfig.method_params is left
    out: a dict, one parameter per hyper-parameter (see method_param_name()).
    """
    sources = [("engine", parameter_fields()), ("node", list(dataclasses.fields(NodeOptions)))]
    if managed:
        sources.append(("lifecycle", list(dataclasses.fields(LifecycleOptions))))
    return [
        (owner, f)
        for owner, fields in sources
        for f in fields
        if f.metadata["key"] != "method_params"
    ]


METHOD_PARAMS_PREFIX = "method_params."


def method_param_name(method: str, hyper_parameter: str) -> str:
    """ROS name of a method's hyper-parameter, e.g. method_params.naclip.sigma."""
    return f"{METHOD_PARAMS_PREFIX}{method}.{hyper_parameter}"


def _method_defaults(method: str) -> dict[str, Any]:
    """The published defaults of `method`'s hyper-parameters ({} for an unknown method)."""
    from ..engine.methods import describe_methods

    return {
        key: default
        for described in describe_methods()
        if described["name"] == method
        for key, default in described["params"].items()
    }


def method_overrides(values: dict[str, Any], method: str) -> dict[str, Any]:
    """The hyper-parameters of `method` among parameter values that differ from its defaults."""
    prefix = f"{METHOD_PARAMS_PREFIX}{method}."
    defaults = _method_defaults(method)
    return {
        key[len(prefix) :]: value
        for key, value in values.items()
        if key.startswith(prefix)
        and key[len(prefix) :] in defaults
        and value != defaults[key[len(prefix) :]]
    }


def split_values(values: dict[str, Any]) -> tuple[SegmenterConfig, NodeOptions]:
    """Build and validate the engine config and node options from ROS parameter values.

    `values` maps parameter names to values (method_params.<method>.* included: those of the
    chosen method that differ from its defaults become the engine's method_params); a missing name
    keeps its default. Raises ValueError naming the parameter for anything invalid.
    """
    engine: dict[str, Any] = {}
    node: dict[str, Any] = {}
    by_name = {f.metadata["key"]: (owner, f.name) for owner, f in option_fields()}
    method = values.get("method", SegmenterConfig().method)
    for key, value in method_overrides(values, method).items():
        engine[f"{METHOD_PARAMS_PREFIX}{key}"] = value
    for name, value in values.items():
        if name.startswith(METHOD_PARAMS_PREFIX):
            continue
        where = by_name.get(name)
        if where is None and name.startswith(LIFECYCLE_PREFIX):
            continue  # the managed node's own (lifecycle_options)
        if where is None:
            raise ValueError(f"unknown parameter {name!r}")
        owner, attr = where
        if owner == "engine":
            engine[name] = value
        else:
            node[attr] = value
    cfg = SegmenterConfig.from_params(engine)
    options = NodeOptions(**node)
    check_node_options(options)
    return cfg, options


def lifecycle_options(values: dict[str, Any]) -> LifecycleOptions:
    """The lifecycle.* values as LifecycleOptions (missing names keep their defaults)."""
    fields = {f.metadata["key"]: f.name for f in dataclasses.fields(LifecycleOptions)}
    return LifecycleOptions(**{fields[k]: v for k, v in values.items() if k in fields})


def check_node_options(options: NodeOptions) -> NodeOptions:
    """Validate the node options against their metadata; ValueError names the parameter."""
    check_fields(options)
    cameras = options.cameras
    for name in cameras:
        if not camera_name_ok(name):
            raise ValueError(
                f"cameras: {name!r} is not a valid topic name part (letters, digits, '_', '/'; "
                "not starting with a digit or '/')"
            )
    if len(set(cameras)) != len(cameras):
        raise ValueError(f"cameras: names must be unique, got {cameras}")
    return options


def camera_name_ok(name: str) -> bool:
    """A camera name usable as a relative topic prefix (e.g. 'front' or 'arm/wrist')."""
    if not name or name[0].isdigit() or name[0] == "/" or name.endswith("/") or "//" in name:
        return False
    return all(c.isalnum() or c in "_/" for c in name) and name.isascii()
