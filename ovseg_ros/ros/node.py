"""The ROS 2 node `ovseg`: camera frames in; labels, confidence, masks and an overlay out.

The contract is docs/ROS_INTERFACE.md (shared/docs). The node is a thin layer over the engine:

* executor callbacks only store the newest message of each camera in its slot (worker.py); the
  inference thread decodes and segments it, so a slow model never blocks the executor and
  latency never grows with load (a replaced frame is counted as a drop);
* parameter changes are validated in the parameter callback (a rejection carries the reason);
  vocabulary and method changes are then built in a background thread while frames keep flowing
  with the old ones, and swapped in atomically;
* every frame is labelled with one snapshot of the vocabulary; `~/vocabulary` (and
  `~/label_info`) is published before the first output that uses a new version, and an output
  computed with an older version than the one announced is discarded, never published;
* an output that is disabled or has no subscriber costs no compute; a camera with no subscribed
  output is not segmented at all.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import SetBool

from ..engine import Segmenter
from ..engine.backbone import ModelLoadError
from ..engine.config import TEMPLATE_SETS
from ..engine.methods import describe_methods, make_params, method_class
from ..engine.text import Vocabulary, parse_background, parse_vocabulary
from ..viz import class_colors, class_mask, confidence_u8, overlay
from . import params as P
from .codec import (
    ImageDecodeError,
    compressed_to_rgb,
    cv_bridge_available,
    header_copy,
    image_to_rgb,
    labels_to_msg,
    mono8_to_msg,
    rgb_to_msg,
)
from .worker import Frame, InferenceWorker, LatestFrameSlots

try:  # vision_msgs is optional (not available as a wheel); LabelInfo is published when present
    from vision_msgs.msg import LabelInfo, VisionClass
except ImportError:  # pragma: no cover - depends on the installation
    LabelInfo = None
    VisionClass = None

#: Exit codes of ovseg_node.
EXIT_OK = 0
EXIT_BAD_PARAMETERS = 2
EXIT_MODEL_LOAD = 3

#: The name of the single camera when `cameras` is empty.
DEFAULT_CAMERA = ""

_VOCAB_KEYS = ("vocabulary", "background_words", "templates")
_METHOD_KEYS = ("method",)
_STATS_WINDOW = 200  # samples kept for the latency / inference-time percentiles


class StartupError(RuntimeError):
    """The node cannot start; the message is one sentence of cause and remedy."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --- small pure helpers (tested without ROS) -------------------------------------------------


def choose_reliability(publisher_reliabilities: Sequence[ReliabilityPolicy]) -> ReliabilityPolicy:
    """`input.qos: auto`: reliable when there are publishers and all are reliable."""
    if publisher_reliabilities and all(
        r == ReliabilityPolicy.RELIABLE for r in publisher_reliabilities
    ):
        return ReliabilityPolicy.RELIABLE
    return ReliabilityPolicy.BEST_EFFORT


def topic_slug(name: str) -> str:
    """A class name made topic-safe: lower case, [a-z0-9_], not starting with a digit."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not slug:
        slug = "class"
    if slug[0].isdigit():
        slug = "c_" + slug
    return slug


def mask_slugs(names: Sequence[str]) -> list[str]:
    """One unique slug per class name (a repeated slug gets the class id appended)."""
    slugs = [topic_slug(n) for n in names]
    counts = Counter(slugs)
    return [s if counts[s] == 1 else f"{s}_{i}" for i, s in enumerate(slugs)]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of values; NaN when empty."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def vocabulary_json(vocab: Vocabulary) -> str:
    """The `~/vocabulary` payload: version, unlabeled value, classes with synonyms and colours."""
    return json.dumps(vocab.to_dict(class_colors(max(vocab.num_classes, 1))))


def stamp_seconds(header: Any) -> float:
    """A header stamp in seconds (0.0 when unset)."""
    return float(header.stamp.sec) + float(header.stamp.nanosec) * 1e-9


def _param_value(param: Parameter) -> Any:
    """A parameter's value; an unset string array (an empty YAML list) reads as []."""
    value = param.value
    if param.type_ == Parameter.Type.NOT_SET:
        return None
    if isinstance(value, tuple | np.ndarray) or type(value).__name__ == "array":
        value = list(value)
    return value


# --- per-camera state -------------------------------------------------------------------------


@dataclass
class CameraStats:
    """Counters of one camera beyond the slot's (received / dropped / processed / failed)."""

    rejected: Counter = field(default_factory=Counter)  # reason -> count
    skipped_idle: int = 0  # frames not segmented because no output had a subscriber
    stale: int = 0  # outputs discarded because a newer vocabulary was announced meanwhile
    published: int = 0
    rejected_seen: int = 0  # counts at the previous diagnostics report (WARN only on news)
    failed_seen: int = 0


class Camera:
    """Topics, publishers and counters of one camera."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prefix = f"{name}/" if name else ""
        self.label = name or "camera"
        self.stats = CameraStats()
        self.image_sub = None
        self.info_sub = None
        self.reliability: ReliabilityPolicy | None = None
        self.camera_info: CameraInfo | None = None
        self.labels_pub = None
        self.confidence_pub = None
        self.overlay_pub = None
        self.info_pub = None
        self.mask_pubs: list[Any] = []  # index = class id of the announced vocabulary

    def out(self, leaf: str) -> str:
        """Private output topic of this camera (e.g. ~/front/labels)."""
        return f"~/{self.prefix}{leaf}"

    def inp(self, leaf: str) -> str:
        """Relative input topic of this camera (e.g. front/image)."""
        return f"{self.prefix}{leaf}"


class _Window:
    """Samples of the last seconds: latency and inference time percentiles, rates."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latency_ms: deque[float] = deque(maxlen=_STATS_WINDOW)
        self.inference_ms: deque[float] = deque(maxlen=_STATS_WINDOW)

    def add(self, latency_ms: float, inference_ms: float) -> None:
        with self._lock:
            self.latency_ms.append(latency_ms)
            self.inference_ms.append(inference_ms)

    def snapshot(self) -> tuple[list[float], list[float]]:
        with self._lock:
            return list(self.latency_ms), list(self.inference_ms)


# --- background reconfiguration ----------------------------------------------------------------


class Reconfigurer:
    """A thread that builds new vocabularies and methods off the image path, newest request wins."""

    def __init__(self, on_error: Callable[[str, Exception], None]) -> None:
        self._cond = threading.Condition()
        self._pending: dict[str, Callable[[], None]] = {}
        self._busy: str | None = None
        self._stop = False
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="ovseg-reconfigure", daemon=True)
        self._thread.start()

    def submit(self, kind: str, job: Callable[[], None]) -> None:
        """Queue a job; a newer job of the same kind replaces one that has not started."""
        with self._cond:
            self._pending[kind] = job
            self._cond.notify()

    @property
    def busy(self) -> str | None:
        """The kind of job running now, or None."""
        return self._busy

    def pending(self) -> list[str]:
        """Kinds of jobs queued or running."""
        with self._cond:
            kinds = list(self._pending)
        return ([self._busy] if self._busy else []) + kinds

    def has_pending(self, kind: str) -> bool:
        """Whether a job of this kind is queued (not yet started)."""
        with self._cond:
            return kind in self._pending

    def idle(self) -> bool:
        """True when nothing is queued or running."""
        with self._cond:
            return not self._pending and self._busy is None

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running job, drop the queued ones, end the thread."""
        with self._cond:
            self._stop = True
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                kind = next(iter(self._pending))
                job = self._pending.pop(kind)
                self._busy = kind
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - reported, the node keeps running
                self._on_error(kind, exc)
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()


# --- the node ----------------------------------------------------------------------------------


class OvsegNode(Node):
    """Open-vocabulary segmentation node (see the module docstring and ROS_INTERFACE.md)."""

    def __init__(
        self,
        *,
        backbone: Any = None,
        node_name: str = "ovseg",
        **node_kwargs: Any,
    ) -> None:
        """Declare parameters, load the model and vocabulary, create topics, start the worker.

        `backbone` reuses an already loaded engine Backbone (tests); `node_kwargs` go to
        rclpy's Node (context, parameter_overrides, namespace, cli_args...). Raises StartupError
        with one sentence of cause and remedy when the parameters or the model are unusable.
        """
        super().__init__(node_name, **node_kwargs)
        self._logger = self.get_logger()
        self._specs = {s.name: s for s in P.parameter_specs()}
        self._method_param_names = self._declare_parameters()
        values = self._current_values()
        try:
            cfg, options = P.split_values(self._engine_values(values))
        except ValueError as exc:
            raise StartupError(f"invalid parameter: {exc}", EXIT_BAD_PARAMETERS) from exc
        self._options = options
        self._logger.info(
            f"loading {cfg.model_name} ({cfg.model_checkpoint or cfg.model_pretrained}) on "
            f"{cfg.device}, vocabulary of {len(cfg.vocabulary)} classes, method {cfg.method}"
        )
        t0 = time.monotonic()
        try:
            self.segmenter = Segmenter(cfg, backbone=backbone, progress=self._text_progress())
        except ModelLoadError as exc:
            raise StartupError(str(exc), EXIT_MODEL_LOAD) from exc
        except ValueError as exc:
            raise StartupError(f"invalid parameter: {exc}", EXIT_BAD_PARAMETERS) from exc
        bb = self.segmenter.backbone
        self._device_text = f"{bb.device} ({str(bb.dtype).replace('torch.', '')})"
        self._logger.info(
            f"model ready in {time.monotonic() - t0:.1f} s: {bb.name} from {bb.source} on "
            f"{self._device_text}; image conversion via "
            f"{'cv_bridge' if cv_bridge_available() else 'numpy/OpenCV'}"
        )
        self._use_cv_bridge = cv_bridge_available()
        self._out_lock = threading.RLock()
        self._announced: Vocabulary | None = None
        self._reverting = False
        self._vocab_error = ""  # last failure of a requested vocabulary / method change
        self._window = _Window()
        self._started = time.monotonic()
        self._diag_prev: dict[str, tuple[float, int, int]] = {}
        self.qos_incompatibilities = 0  # QoS-incompatible peers seen on any topic of the node

        qos_out = (
            qos_profile_sensor_data
            if options.output_qos == "sensor_data"
            else QoSProfile(
                depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST
            )
        )
        self._qos_out = qos_out
        latched = QoSProfile(
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
            history=HistoryPolicy.KEEP_LAST,
        )
        self._vocab_pub = self.create_publisher(
            String, "~/vocabulary", latched, **self._publisher_events("~/vocabulary")
        )
        self._label_info_pub = (
            self.create_publisher(
                LabelInfo, "~/label_info", latched, **self._publisher_events("~/label_info")
            )
            if LabelInfo is not None
            else None
        )
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        names = options.cameras or [DEFAULT_CAMERA]
        self._cams: dict[str, Camera] = {n: Camera(n) for n in names}
        for cam in self._cams.values():
            cam.labels_pub = self._output(cam, Image, "labels")
            cam.confidence_pub = self._output(cam, Image, "confidence")
            cam.overlay_pub = self._output(cam, Image, "overlay")
            cam.info_pub = self._output(cam, CameraInfo, "camera_info")
        self._announce(self.segmenter.vocabulary)

        self._slots = LatestFrameSlots(list(self._cams))
        self._worker = InferenceWorker(self._slots, self._process, options.max_rate_hz)
        self._worker.set_enabled(options.enabled)
        self._reconfigurer = Reconfigurer(self._on_reconfigure_error)
        for cam in self._cams.values():
            self._subscribe(cam)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._enable_srv = self.create_service(SetBool, "~/enable", self._on_enable)
        self._qos_timer = self.create_timer(1.0, self._check_input_qos)
        self._diag_timer = self.create_timer(1.0, self._publish_diagnostics)
        self._worker.start()
        topics = ", ".join(c.image_sub.topic_name for c in self._cams.values())
        self._logger.info(
            f"segmenting {topics} with {cfg.method}; "
            f"outputs under {self.get_fully_qualified_name()}"
        )

    # --- parameters ----------------------------------------------------------------------------

    def _declare_parameters(self) -> list[str]:
        """Declare every parameter of params.py and every method hyper-parameter override."""
        kinds = {
            "string": ParameterType.PARAMETER_STRING,
            "integer": ParameterType.PARAMETER_INTEGER,
            "double": ParameterType.PARAMETER_DOUBLE,
            "bool": ParameterType.PARAMETER_BOOL,
            "string_array": ParameterType.PARAMETER_STRING_ARRAY,
        }
        for spec in self._specs.values():
            descriptor = ParameterDescriptor(
                name=spec.name,
                type=kinds[spec.kind],
                description=spec.description,
                additional_constraints=spec.constraints(),
                read_only=spec.read_only,
            )
            if spec.lo is not None and spec.kind == "integer":
                descriptor.integer_range = [
                    IntegerRange(from_value=int(spec.lo), to_value=int(spec.hi), step=0)
                ]
            elif spec.lo is not None and spec.kind == "double":
                descriptor.floating_point_range = [
                    FloatingPointRange(from_value=float(spec.lo), to_value=float(spec.hi), step=0.0)
                ]
            self._declare(spec.name, spec.default, spec.kind, descriptor)
        methods = describe_methods()
        names = sorted({p for m in methods for p in m["params"]})
        for name in names:
            owners = [m["name"] for m in methods if name in m["params"]]
            self.declare_parameter(
                P.method_param_name(name),
                None,
                ParameterDescriptor(
                    description=(
                        f"override of the hyper-parameter {name!r} of the method in use "
                        f"(methods with it: {', '.join(owners)}); unset = the method's default"
                    ),
                    dynamic_typing=True,
                ),
            )
        return [P.method_param_name(n) for n in names]

    def _declare(self, name: str, default: Any, kind: str, descriptor: ParameterDescriptor) -> None:
        """Declare one parameter; an empty string array is declared typed, without a value."""
        try:
            if kind == "string_array" and not default:
                try:
                    self.declare_parameter(name, Parameter.Type.STRING_ARRAY, descriptor)
                except TypeError:  # Humble: no typed declaration without a value
                    descriptor.dynamic_typing = True
                    self.declare_parameter(name, None, descriptor)
            else:
                self.declare_parameter(name, default, descriptor)
        except Exception as exc:  # wrong type or range of a value from the params file
            raise StartupError(
                f"parameter {name!r}: {exc} (expected {kind}; {descriptor.additional_constraints})",
                EXIT_BAD_PARAMETERS,
            ) from exc

    def _current_values(self) -> dict[str, Any]:
        """All declared parameter values by name (unset arrays as [], unset overrides skipped)."""
        values: dict[str, Any] = {}
        for name in list(self._specs) + self._method_param_names:
            try:
                value = _param_value(self.get_parameter(name))
            except ParameterUninitializedException:  # a typed array declared without a value
                value = None
            if value is None:
                if name in self._specs:
                    values[name] = [] if self._specs[name].kind == "string_array" else value
                continue
            values[name] = value
        return values

    def _engine_values(self, values: dict[str, Any]) -> dict[str, Any]:
        """Values with method overrides limited to the hyper-parameters of the chosen method."""
        method = values.get("method", "")
        out = {k: v for k, v in values.items() if not k.startswith(P.METHOD_PARAMS_PREFIX)}
        try:
            fields = set(describe_fields(method))
        except ValueError:
            return out  # unknown method: SegmenterConfig / create_method report it
        for key, value in values.items():
            if key.startswith(P.METHOD_PARAMS_PREFIX):
                short = key[len(P.METHOD_PARAMS_PREFIX) :]
                if short in fields:
                    out[key] = value
                else:
                    self._logger.warning(
                        f"{key} is set but method {method!r} has no parameter {short!r}; "
                        "it is ignored while this method is in use"
                    )
        return out

    def _on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Validate a change; apply cheap ones now, queue vocabulary/method builds."""
        if self._reverting:
            return SetParametersResult(successful=True)
        changes = {p.name: _param_value(p) for p in parameters}
        for name, value in list(changes.items()):
            if value is None and name in self._specs and self._specs[name].kind == "string_array":
                changes[name] = []
        try:
            apply = self._plan(changes)
        except ValueError as exc:
            self._logger.warning(f"rejected parameter change {sorted(changes)}: {exc}")
            return SetParametersResult(successful=False, reason=str(exc))
        apply()
        return SetParametersResult(successful=True)

    def _plan(self, changes: dict[str, Any]) -> Callable[[], None]:
        """Validate `changes` against the current values; return the function that applies them."""
        values = self._current_values()
        values.update({k: v for k, v in changes.items() if v is not None})
        for key in changes:
            if changes[key] is None and key.startswith(P.METHOD_PARAMS_PREFIX):
                values.pop(key, None)
        actions: list[Callable[[], None]] = []

        if any(k in changes for k in _VOCAB_KEYS):
            entries = values["vocabulary"]
            background = values["background_words"]
            templates = values["templates"]
            classes = parse_vocabulary(entries)  # ValueError: empty, duplicates, too long...
            parse_background(background, classes)
            if templates not in TEMPLATE_SETS:
                raise ValueError(
                    f"templates must be one of {list(TEMPLATE_SETS)}, got {templates!r}"
                )
            actions.append(lambda: self._request_vocabulary(entries, background, templates))

        method_changed = "method" in changes
        override_changed = [k for k in changes if k.startswith(P.METHOD_PARAMS_PREFIX)]
        if method_changed or override_changed:
            method = values["method"]
            fields = set(describe_fields(method))  # ValueError lists the known methods
            prefix = len(P.METHOD_PARAMS_PREFIX)
            overrides = {
                k[prefix:]: v
                for k, v in values.items()
                if k.startswith(P.METHOD_PARAMS_PREFIX) and k[prefix:] in fields
            }
            make_params(method, overrides)  # type / range errors of the overrides
            unused = sorted(
                k
                for k, v in values.items()
                if k.startswith(P.METHOD_PARAMS_PREFIX)
                and v is not None
                and k[prefix:] not in fields
            )
            if unused:
                # Kept, so an override can be set before switching to the method that uses it.
                self._logger.warning(
                    f"method {method!r} does not use {', '.join(unused)}; kept, they apply when "
                    "a method that has them is selected"
                )
            uses_change = method_changed or any(k[prefix:] in fields for k in override_changed)
            if uses_change:
                actions.append(lambda: self._request_method(method, overrides))

        engine_updates: dict[str, Any] = {}
        node_updates: dict[str, Any] = {}
        for key, value in changes.items():
            spec = self._specs.get(key)
            if spec is None or key in _VOCAB_KEYS or key in _METHOD_KEYS:
                continue
            if spec.owner == "engine":
                engine_updates[spec.attr] = value
            else:
                node_updates[spec.attr] = value
        if engine_updates:
            self.segmenter.config.replace(**engine_updates)  # ValueError names the parameter
            actions.append(lambda: self.segmenter.update(**engine_updates))
        if node_updates:
            options = P.check_node_options(self._options.replace(**node_updates))
            actions.append(lambda: self._apply_options(options))

        def apply() -> None:
            for action in actions:
                action()

        return apply

    def _apply_options(self, options: P.NodeOptions) -> None:
        previous = self._options
        self._options = options
        self._worker.max_rate_hz = options.max_rate_hz
        if options.enabled != previous.enabled:
            self._worker.set_enabled(options.enabled)
            self._logger.info("processing resumed" if options.enabled else "processing paused")
        if options.publish_masks != previous.publish_masks:
            with self._out_lock:
                self._sync_mask_publishers()

    def _request_vocabulary(
        self, entries: list[str], background: list[str], templates: str
    ) -> None:
        def job() -> None:
            t0 = time.monotonic()
            self._logger.info(f"encoding vocabulary {entries} ({templates} templates)...")
            self.segmenter.set_vocabulary(entries, background, templates)
            vocab = self.segmenter.vocabulary
            self._announce(vocab)
            self._vocab_error = ""
            self._logger.info(
                f"vocabulary v{vocab.version} in use ({time.monotonic() - t0:.2f} s): "
                f"{', '.join(vocab.names)}"
            )

        self._reconfigurer.submit("vocabulary", job)

    def _request_method(self, method: str, overrides: dict[str, Any]) -> None:
        def job() -> None:
            t0 = time.monotonic()
            self.segmenter.set_method(method, overrides)
            self._vocab_error = ""
            self._logger.info(
                f"method {method} {overrides or ''} in use ({time.monotonic() - t0:.2f} s)"
            )

        self._reconfigurer.submit("method", job)

    def _on_reconfigure_error(self, kind: str, exc: Exception) -> None:
        """A queued change failed: say why, and put the parameters back to what is in use."""
        cfg = self.segmenter.config
        self._vocab_error = f"{kind} change failed: {exc}"
        self._logger.error(f"{self._vocab_error}; still using the previous {kind}")
        if self._reconfigurer.has_pending(kind):
            return  # a newer request of this kind follows and decides what is in use
        if kind == "vocabulary":
            restore = [
                Parameter("vocabulary", Parameter.Type.STRING_ARRAY, list(cfg.vocabulary)),
                Parameter(
                    "background_words", Parameter.Type.STRING_ARRAY, list(cfg.background_words)
                ),
                Parameter("templates", Parameter.Type.STRING, cfg.templates),
            ]
        else:
            restore = [Parameter("method", Parameter.Type.STRING, cfg.method)]
        self._reverting = True
        try:
            self.set_parameters(restore)
        finally:
            self._reverting = False

    def _text_progress(self) -> Callable[[int, int], None]:
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if done == total or now - last[0] > 2.0:
                last[0] = now
                self._logger.info(f"encoding text prompts: {done}/{total}")

        return progress

    # --- services ------------------------------------------------------------------------------

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        result = self.set_parameters(
            [Parameter("enabled", Parameter.Type.BOOL, bool(request.data))]
        )
        response.success = bool(result[0].successful)
        response.message = (
            ("processing resumed" if request.data else "processing paused (model kept loaded)")
            if response.success
            else result[0].reason
        )
        return response

    # --- inputs --------------------------------------------------------------------------------

    def _input_profile(self, reliability: ReliabilityPolicy) -> QoSProfile:
        return QoSProfile(
            depth=1,
            history=HistoryPolicy.KEEP_LAST,
            reliability=reliability,
            durability=DurabilityPolicy.VOLATILE,
        )

    def _subscribe(self, cam: Camera, reliability: ReliabilityPolicy | None = None) -> None:
        """(Re)create the camera's image and camera_info subscriptions."""
        mode = self._options.input_qos
        compressed = self._options.transport == "compressed"
        topic = cam.inp("image/compressed" if compressed else "image")
        if reliability is None:
            if mode == "reliable":
                reliability = ReliabilityPolicy.RELIABLE
            elif mode == "sensor_data":
                reliability = ReliabilityPolicy.BEST_EFFORT
            else:
                reliability = choose_reliability(self._publisher_reliabilities(topic))
        if cam.image_sub is not None:
            self.destroy_subscription(cam.image_sub)
        msg_type = CompressedImage if compressed else Image
        cam.image_sub = self.create_subscription(
            msg_type,
            topic,
            lambda msg, c=cam: self._on_image(c, msg),
            self._input_profile(reliability),
            **self._subscription_events(topic),
        )
        cam.reliability = reliability
        if cam.info_sub is None:
            cam.info_sub = self.create_subscription(
                CameraInfo,
                cam.inp("camera_info"),
                lambda msg, c=cam: setattr(c, "camera_info", msg),
                self._input_profile(ReliabilityPolicy.BEST_EFFORT),
            )

    def _resolve(self, topic: str) -> str:
        """Fully qualified topic name (remappings applied); as given where rclpy cannot tell."""
        resolve = getattr(self, "resolve_topic_name", None)  # rclpy of Iron and newer
        return resolve(topic) if resolve is not None else topic

    def _publisher_reliabilities(self, topic: str) -> list[ReliabilityPolicy]:
        resolved = self._resolve(topic)
        if not resolved.startswith("/"):
            return []  # Humble, before the subscription exists: the 1 s check decides
        return [
            info.qos_profile.reliability for info in self.get_publishers_info_by_topic(resolved)
        ]

    def _check_input_qos(self) -> None:
        """input.qos auto: resubscribe when the publishers' reliability calls for it."""
        if self._options.input_qos != "auto":
            return
        for cam in self._cams.values():
            topic = cam.image_sub.topic_name
            wanted = choose_reliability(self._publisher_reliabilities(topic))
            if wanted != cam.reliability:
                self._logger.info(
                    f"input QoS auto: publishers of {topic} are "
                    f"{'all reliable' if wanted == ReliabilityPolicy.RELIABLE else 'best effort'}"
                    f"; subscribing {wanted.name.lower()}"
                )
                self._subscribe(cam, wanted)

    def _subscription_events(self, topic: str) -> dict[str, Any]:
        try:
            from rclpy.event_handler import SubscriptionEventCallbacks
        except ImportError:  # Humble
            from rclpy.qos_event import SubscriptionEventCallbacks

        def warn(event: Any) -> None:
            self._incompatible(topic, "publisher", event)

        return {"event_callbacks": SubscriptionEventCallbacks(incompatible_qos=warn)}

    def _publisher_events(self, topic: str) -> dict[str, Any]:
        try:
            from rclpy.event_handler import PublisherEventCallbacks
        except ImportError:  # Humble
            from rclpy.qos_event import PublisherEventCallbacks

        def warn(event: Any) -> None:
            self._incompatible(topic, "subscriber", event)

        return {"event_callbacks": PublisherEventCallbacks(incompatible_qos=warn)}

    def _incompatible(self, topic: str, peer: str, event: Any) -> None:
        self.qos_incompatibilities += 1
        try:
            from rclpy.qos import qos_policy_name_from_kind

            policy = qos_policy_name_from_kind(event.last_policy_kind)
        except Exception:  # noqa: BLE001 - only the wording of the warning depends on it
            policy = str(getattr(event, "last_policy_kind", "unknown"))
        self._logger.warning(
            f"QoS incompatibility on {self._resolve(topic)}: a {peer} cannot be "
            f"matched because of its {policy} policy ({event.total_count} so far); align the "
            "two sides' QoS (this node: input.qos / output.qos)",
            throttle_duration_sec=5.0,
        )

    def _on_image(self, cam: Camera, msg: Any) -> None:
        """Executor callback: keep the newest frame; nothing heavy here."""
        if not self._worker.enabled:
            return
        self._slots.put(Frame(camera=cam.name, image=msg, header=msg.header))

    # --- outputs -------------------------------------------------------------------------------

    def _output(self, cam: Camera, msg_type: Any, leaf: str) -> Any:
        """A publisher for one of the camera's outputs, with the output QoS."""
        topic = cam.out(leaf)
        return self.create_publisher(
            msg_type, topic, self._qos_out, **self._publisher_events(topic)
        )

    def _announce(self, vocab: Vocabulary) -> None:
        """Publish the class map of `vocab` (once per version) and follow it with mask topics."""
        with self._out_lock:
            if self._announced is not None and vocab.version <= self._announced.version:
                return
            self._announced = vocab
            self._sync_mask_publishers()
            self._vocab_pub.publish(String(data=vocabulary_json(vocab)))
            if self._label_info_pub is not None:
                self._label_info_pub.publish(label_info_msg(vocab, self.get_clock().now()))

    def _sync_mask_publishers(self) -> None:
        """One ~/masks/<slug> publisher per class of the announced vocabulary (when enabled)."""
        vocab = self._announced
        slugs = mask_slugs(vocab.names) if vocab is not None and self._options.publish_masks else []
        for cam in self._cams.values():
            old = {pub.topic_name.rsplit("/", 1)[-1]: pub for pub in cam.mask_pubs}
            pubs = []
            for slug in slugs:
                pub = old.pop(slug, None)
                if pub is None:
                    pub = self._output(cam, Image, f"masks/{slug}")
                pubs.append(pub)
            for pub in old.values():
                self.destroy_publisher(pub)
            cam.mask_pubs = pubs

    def _process(self, frame: Frame) -> None:
        """Worker thread: decode, segment, publish the outputs that someone listens to."""
        cam = self._cams[frame.camera]
        opts = self._options
        want_labels = opts.publish_labels and cam.labels_pub.get_subscription_count() > 0
        want_conf = opts.publish_confidence and cam.confidence_pub.get_subscription_count() > 0
        want_overlay = opts.publish_overlay and cam.overlay_pub.get_subscription_count() > 0
        want_masks = opts.publish_masks and any(
            p.get_subscription_count() > 0 for p in list(cam.mask_pubs)
        )
        want_info = cam.camera_info is not None and cam.info_pub.get_subscription_count() > 0
        if not (want_labels or want_conf or want_overlay or want_masks or want_info):
            cam.stats.skipped_idle += 1
            return
        t0 = time.perf_counter()
        try:
            if isinstance(frame.image, CompressedImage):
                rgb = compressed_to_rgb(frame.image)
            else:
                rgb = image_to_rgb(frame.image, use_cv_bridge=self._use_cv_bridge)
        except ImageDecodeError as exc:
            reason = str(exc)
            cam.stats.rejected[_reason_key(reason)] += 1
            self._logger.error(f"{cam.label}: frame rejected: {reason}", throttle_duration_sec=5.0)
            return
        result = self.segmenter.segment(rgb)
        vocab = result.vocabulary
        if not self.context.ok():
            return  # shutting down (e.g. the node was embedded and its context shut down)
        with self._out_lock:
            if self._announced is not None and vocab.version < self._announced.version:
                cam.stats.stale += 1  # labelled with a class map that is no longer announced
                return
            self._announce(vocab)
            header = frame.header
            if want_labels:
                cam.labels_pub.publish(labels_to_msg(result.labels, header))
            if want_conf:
                conf = confidence_u8(result.confidence)
                cam.confidence_pub.publish(mono8_to_msg(conf, header))
            if want_overlay:
                colors = class_colors(max(vocab.num_classes, 1))
                image = overlay(rgb, result.labels, colors, opts.overlay_alpha, vocab.names)
                cam.overlay_pub.publish(rgb_to_msg(image, header))
            if opts.publish_masks:
                for cid, pub in enumerate(cam.mask_pubs):
                    if pub.get_subscription_count() == 0:
                        continue
                    pub.publish(mono8_to_msg(class_mask(result.labels, cid), header))
            if want_info:
                info = copy.deepcopy(cam.camera_info)
                info.header = header_copy(header)
                cam.info_pub.publish(info)
        cam.stats.published += 1
        now = self.get_clock().now().nanoseconds * 1e-9
        stamp = stamp_seconds(frame.header)
        latency = (now - stamp) if stamp > 0 else (time.monotonic() - frame.received)
        self._window.add(latency * 1e3, (time.perf_counter() - t0) * 1e3)

    # --- diagnostics ---------------------------------------------------------------------------

    def diagnostics(self) -> DiagnosticStatus:
        """One DiagnosticStatus with rates, latencies, counters and a human summary."""
        now = time.monotonic()
        latency, inference = self._window.snapshot()
        cfg = self.segmenter.config
        vocab = self.segmenter.vocabulary
        values: list[tuple[str, str]] = []
        problems: list[tuple[int, str]] = []
        total_in = total_out = 0.0
        for cam in self._cams.values():
            st = self._slots.stats[cam.name]
            prev_t, prev_in, prev_out = self._diag_prev.get(cam.name, (self._started, 0, 0))
            dt = max(now - prev_t, 1e-6)
            rate_in = (st.received - prev_in) / dt
            rate_out = (cam.stats.published - prev_out) / dt
            self._diag_prev[cam.name] = (now, st.received, cam.stats.published)
            total_in += rate_in
            total_out += rate_out
            p = f"{cam.label}: "
            rejected = sum(cam.stats.rejected.values())
            values += [
                (p + "input rate (Hz)", f"{rate_in:.2f}"),
                (p + "output rate (Hz)", f"{rate_out:.2f}"),
                (p + "frames received", str(st.received)),
                (p + "frames published", str(cam.stats.published)),
                (p + "frames dropped (replaced by newer)", str(st.dropped)),
                (p + "frames rejected", str(rejected)),
                (p + "frames failed", str(st.failed)),
                (p + "frames skipped (no subscriber)", str(cam.stats.skipped_idle)),
                (p + "outputs discarded (vocabulary changed)", str(cam.stats.stale)),
                (p + "input QoS", cam.reliability.name.lower() if cam.reliability else "-"),
            ]
            for reason, count in cam.stats.rejected.most_common(5):
                values.append((p + f"rejected: {reason}", str(count)))
            if rejected and cam.stats.rejected_seen != rejected:
                problems.append(
                    (DiagnosticStatus.WARN, f"{cam.label} rejected {rejected} bad frames")
                )
            cam.stats.rejected_seen = rejected
            if st.failed != cam.stats.failed_seen:
                problems.append(
                    (DiagnosticStatus.ERROR, f"{cam.label}: {st.failed} frames failed in the model")
                )
            cam.stats.failed_seen = st.failed
            if st.received == 0 and now - self._started > 10:
                problems.append((DiagnosticStatus.WARN, f"no frames received on {cam.label}"))
        gpu = "-"
        device = self.segmenter.device
        if device.type == "cuda":
            import torch

            gpu = f"{torch.cuda.memory_allocated(device) / 2**20:.0f} MiB"
        values += [
            ("inference ms p50", f"{percentile(inference, 50):.1f}"),
            ("inference ms p95", f"{percentile(inference, 95):.1f}"),
            ("latency ms p50 (input stamp to publish)", f"{percentile(latency, 50):.1f}"),
            ("latency ms p95 (input stamp to publish)", f"{percentile(latency, 95):.1f}"),
            ("device", self._device_text),
            ("GPU memory allocated", gpu),
            ("method", cfg.method),
            ("vocabulary version", str(vocab.version)),
            ("vocabulary", ", ".join(vocab.names)),
            ("enabled", str(self._worker.enabled).lower()),
            ("reconfiguring", ", ".join(self._reconfigurer.pending()) or "-"),
            ("QoS incompatibilities", str(self.qos_incompatibilities)),
        ]
        if self._vocab_error:
            problems.append((DiagnosticStatus.ERROR, self._vocab_error))
        if self.qos_incompatibilities:
            problems.append(
                (
                    DiagnosticStatus.WARN,
                    f"{self.qos_incompatibilities} QoS-incompatible peers could not be matched "
                    "(see the node's log for the topic and policy)",
                )
            )
        status = DiagnosticStatus()
        status.name = f"{self.get_fully_qualified_name()}: open-vocabulary segmentation"
        status.hardware_id = self._device_text
        if problems:
            status.level = max(level for level, _ in problems)
            status.message = "; ".join(text for _, text in problems)
        elif not self._worker.enabled:
            status.level = DiagnosticStatus.OK
            status.message = "paused (~/enable or the enabled parameter)"
        else:
            status.level = DiagnosticStatus.OK
            status.message = (
                f"segmenting {total_in:.1f} fps in, {total_out:.1f} fps out with {cfg.method}"
            )
        status.values = [KeyValue(key=k, value=v) for k, v in values]
        return status

    def _publish_diagnostics(self) -> None:
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [self.diagnostics()]
        self._diag_pub.publish(msg)

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def worker(self) -> InferenceWorker:
        """The inference thread (tests and benchmarks look at its counters)."""
        return self._worker

    @property
    def slots(self) -> LatestFrameSlots:
        """The per-camera latest-frame slots."""
        return self._slots

    @property
    def cameras(self) -> dict[str, Camera]:
        """Camera state by name ('' for the single default camera)."""
        return self._cams

    def reconfiguring(self) -> bool:
        """True while a vocabulary or method change is queued or being built."""
        return not self._reconfigurer.idle()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the worker (after the frame in hand) and the reconfiguration thread."""
        worker = getattr(self, "_worker", None)  # absent when the constructor failed early
        if worker is not None:
            worker.stop(timeout)
        reconfigurer = getattr(self, "_reconfigurer", None)
        if reconfigurer is not None:
            reconfigurer.stop(timeout)

    def destroy_node(self) -> None:
        """Stop the threads, then destroy the ROS entities."""
        self.shutdown()
        super().destroy_node()


def describe_fields(method: str) -> list[str]:
    """Hyper-parameter names of a registered method; ValueError lists the known methods."""
    import dataclasses

    return [f.name for f in dataclasses.fields(method_class(method).Params)]


def _reason_key(reason: str) -> str:
    """A short, bounded key for a rejection reason (diagnostics counters)."""
    return reason.split(":")[0][:80] if ":" in reason[:80] else reason[:80]


def label_info_msg(vocab: Vocabulary, stamp: Any) -> Any:
    """vision_msgs/LabelInfo of a vocabulary (only called when vision_msgs is importable)."""
    msg = LabelInfo()
    msg.header.stamp = stamp.to_msg()
    msg.class_map = [VisionClass(class_id=c.id, class_name=c.name) for c in vocab.classes]
    msg.threshold = 0.0
    return msg


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(args: list[str] | None = None) -> int:
    """Console script `ovseg_node`: run the node until Ctrl-C; exit non-zero if it cannot start.

    rclpy's own signal handlers are off: they would shut the context down while the worker is
    still publishing a frame. Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt here instead,
    the worker finishes the frame in hand, then the node and the context are shut down.
    """
    import signal

    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    node = None
    code = EXIT_OK
    try:
        node = OvsegNode()
    except StartupError as exc:
        rclpy.logging.get_logger("ovseg").fatal(str(exc))
        code = exc.exit_code
    except (KeyboardInterrupt, ExternalShutdownException):
        code = 130
    if node is not None:
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            node.get_logger().info("shutting down")
            node.destroy_node()  # stops the worker after the frame in hand
            executor.shutdown()
    rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
