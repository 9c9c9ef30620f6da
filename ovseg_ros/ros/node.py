"""The ROS 2 node `ovseg`: camera frames in; labels, confidence, masks and an overlay out.

The contract is the README's "The ROS 2 node" section. The node is a thin layer over the engine:

* executor callbacks only store the newest message of each camera in its slot (worker.py); the
  frame pipeline (pipeline.py) decodes, segments and publishes in three overlapping threads
  (on a GPU, several cameras of one size in one forward pass), so a slow model never blocks the
  executor and latency never grows with load (a replaced frame is counted as a drop);
* parameter changes are validated in the parameter callback (a rejection carries the reason);
  vocabulary and method changes are then built in a background thread (reconfigure.py) while
  frames keep flowing with the old ones, and swapped in atomically;
* every frame is labelled with one snapshot of the vocabulary; the class map is announced on
  `~/vocabulary` (and `~/label_info`) with a stamp before the first output that uses it, and the
  outputs obey the pairing rule of classmap.py (an output that would break it is discarded);
* ROS entities are created and destroyed only on the executor thread (mask topics: masks.py);
* each output is a small class (outputs.py); the class-map announcements are node_classmap.py;
* an output that is disabled or has no subscriber costs no compute; a camera with no subscribed
  output is not segmented at all; memory is bounded by the parameters (input.max_pixels, the
  engine's token and chunk limits), never by what arrives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from sensor_msgs.msg import Image
from std_srvs.srv import SetBool

from ..engine import Segmenter
from ..engine.clip_weights import ModelLoadError
from ..engine.memory import free_memory
from ..engine.text import Vocabulary
from . import classmap
from . import diagnostics as D
from . import params as P
from .decode import cv_bridge_available
from .depth import DepthInput, DepthPairing
from .masks import MaskTopics
from .node_classmap import ClassMapPublishing, label_info_msg
from .node_frames import FrameStages
from .node_health import HealthReporting
from .node_inputs import Camera, InputHandling, choose_reliability
from .node_params import (
    EXIT_BAD_PARAMETERS,
    EXIT_MODEL_LOAD,
    EXIT_OK,
    ParameterHandling,
    StartupError,
)
from .outputs import (
    IMAGE_OUTPUTS,
    CameraInfoOutput,
    MasksOutput,
    Output,
    PointsOutput,
    scaled_camera_info,
)
from .param_table import method_parameters, parameter_specs
from .pipeline import FramePipeline
from .reconfigure import Reconfigurer
from .worker import LatestFrameSlots

__all__ = [
    "EXIT_BAD_PARAMETERS",
    "EXIT_MODEL_LOAD",
    "EXIT_OK",
    "Camera",
    "OvsegNode",
    "StartupError",
    "choose_reliability",
    "label_info_msg",
    "scaled_camera_info",
]

#: The name of the single camera when `cameras` is empty.
DEFAULT_CAMERA = ""
#: Seconds a cleanup waits for a vocabulary build in progress to stop at its next batch.
JOIN_SECONDS = 3.0


# --- the node ----------------------------------------------------------------------------------


class OvsegNode(
    FrameStages, ParameterHandling, InputHandling, HealthReporting, ClassMapPublishing, Node
):
    """Open-vocabulary segmentation node (see the module docstring and the README)."""

    #: True for the managed (lifecycle) node: the constructor only declares the parameters and the
    #: transitions (lifecycle.py) call _configure / _activate / _deactivate / _cleanup.
    _MANAGED = False

    def __init__(
        self,
        *,
        backbone: Any = None,
        node_name: str = "ovseg",
        cancel: Callable[[], bool] | None = None,
        **node_kwargs: Any,
    ) -> None:
        """Declare parameters, load the model and vocabulary, create topics, start the worker.

        `backbone` reuses an already loaded engine Backbone (tests); `cancel()` returning True
        aborts the start-up vocabulary encoding (a stop signal); `node_kwargs` go to rclpy's
        Node (context, parameter_overrides, namespace, cli_args...). Raises StartupError with one
        sentence of cause and remedy when the parameters or the model are unusable.
        """
        super().__init__(node_name, **node_kwargs)
        self._logger = self.get_logger()
        self._specs = {s.name: s for s in parameter_specs(managed=self._MANAGED)}
        self._method_params = method_parameters()
        self._declare_parameters()
        self._warn_unknown_parameters()
        self.segmenter: Segmenter | None = None
        self._active = False
        self._shut_down = False
        if self._MANAGED:
            return
        self._configure(backbone, cancel)
        self._activate()

    def _configure(self, backbone: Any = None, cancel: Callable[[], bool] | None = None) -> None:
        """Load the model and the vocabulary; create the publishers, services and threads.

        Raises StartupError (one sentence) when the parameters or the model are unusable; what
        was created before the failure is released by _cleanup.
        """
        values = self._current_values()
        try:
            cfg, options = P.split_values(values)
        except ValueError as exc:
            raise StartupError(f"invalid parameter: {exc}", EXIT_BAD_PARAMETERS) from exc
        self._options = options
        self._logger.info(
            f"loading {cfg.model_name} ({cfg.model_checkpoint or cfg.model_pretrained}) on "
            f"{cfg.device}, vocabulary of {len(cfg.vocabulary)} classes, method {cfg.method}"
        )
        t0 = time.monotonic()
        try:
            self.segmenter = Segmenter(
                cfg, backbone=backbone, progress=self._text_progress(cancel=cancel)
            )
        except ModelLoadError as exc:
            raise StartupError(str(exc), EXIT_MODEL_LOAD) from exc
        except ValueError as exc:
            raise StartupError(f"invalid parameter: {exc}", EXIT_BAD_PARAMETERS) from exc
        bb = self.segmenter.backbone
        self._device_text = f"{bb.device} ({str(bb.dtype).replace('torch.', '')})"
        self._use_cv_bridge = cv_bridge_available()
        self._logger.info(
            f"model ready in {time.monotonic() - t0:.1f} s: {bb.name} from {bb.source} on "
            f"{self._device_text}; image conversion via "
            f"{'cv_bridge' if self._use_cv_bridge else 'numpy/OpenCV'}"
        )
        self._out_lock = threading.RLock()
        self._stamps = classmap.ClassMapStamps()
        self._announced: Vocabulary | None = None
        self._slugs: dict[int, tuple[list[str], dict[str, int]]] = {}  # version -> slugs, ids
        self._label_info_frame = ""
        self._reverting = 0  # the thread undoing a failed change (its parameter sets pass)
        self._change_error = ""  # last failure of a requested vocabulary / method change
        self._change_error_at = -1e9
        self._window = D.LatencyWindow()
        self._started = time.monotonic()
        self._diag_prev: dict[str, tuple[float, int, int]] = {}
        self.qos_incompatibilities = 0  # QoS-incompatible peers seen on any topic (events)

        self._qos_out = (
            qos_profile_sensor_data
            if options.output_qos == "sensor_data"
            else QoSProfile(
                depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST
            )
        )
        latched = QoSProfile(
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
            history=HistoryPolicy.KEEP_LAST,
        )
        self._make_classmap_publishers(latched)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        names = options.cameras or [DEFAULT_CAMERA]
        self._cams: dict[str, Camera] = {n: Camera(n) for n in names}
        self._masks = MaskTopics(
            list(self._cams), self._create_mask_pub, self._drop_publisher, self._mask_subscribed
        )
        for cam in self._cams.values():
            cam.outputs = [output(self._output(cam, output)) for output in IMAGE_OUTPUTS]
            cam.outputs.append(MasksOutput(self._masks, lambda vocab: self._slug_map(vocab)[1]))
            cam.outputs.append(CameraInfoOutput(self._output(cam, CameraInfoOutput)))
            if options.depth_enabled:
                cam.depth = DepthInput()
                cam.outputs.append(PointsOutput(self._output(cam, PointsOutput), self._warn))
        self._mask_gc = self.create_guard_condition(self._sync_masks)
        self._reconfigurer = Reconfigurer(self._on_reconfigure_error)
        self._param_callback = self._on_set_parameters
        self.add_on_set_parameters_callback(self._param_callback)
        self._enable_srv = self.create_service(SetBool, "~/enable", self._on_enable)

    def _activate(self) -> None:
        """Announce the class map, subscribe the cameras, start the inference thread."""
        with self._out_lock:
            self._announced = None  # (again, after a deactivation: the publishers were off)
            self._announce(self.segmenter.vocabulary)
        self._slots = LatestFrameSlots(list(self._cams))
        self._worker = FramePipeline(
            self._slots,
            self._decode_frame,
            self._segment_frames,
            self._publish_frame,
            self._options.max_rate_hz,
            # On the CPU a batch of n frames costs n frames' time: batching would only add
            # latency (measured: two cameras 1.05x one camera's rate, p50 latency 1.75x).
            batch=self.segmenter.backbone.device.type == "cuda",
        )
        self._worker.set_enabled(self._options.enabled)
        for cam in self._cams.values():
            self._subscribe(cam)
        self._tick_timer = self.create_timer(1.0, self._tick)
        self._worker.start()
        self._active = True
        topics = ", ".join(c.image_sub.topic_name for c in self._cams.values())
        self._logger.info(
            f"segmenting {topics} with {self.segmenter.config.method}; "
            f"outputs under {self.get_fully_qualified_name()}"
        )

    def _deactivate(self, timeout: float = 10.0) -> bool:
        """Stop taking frames: unsubscribe, stop the inference thread, free what frames used.

        The model and the vocabulary stay loaded (activation is then immediate); memory the
        frames used (activations, the allocator's cache on a GPU) is given back. True if the
        thread ended after the frame in hand within `timeout`.
        """
        self._active = False
        for cam in self._cams.values():
            for sub in (
                cam.image_sub,
                cam.old_image_sub,
                cam.info_sub,
                cam.depth_sub,
                cam.depth_info_sub,
            ):
                if sub is not None:
                    self.destroy_subscription(sub)
            cam.image_sub = cam.old_image_sub = cam.info_sub = None
            cam.depth_sub = cam.depth_info_sub = None
            cam.camera_info = None
            if cam.depth is not None:
                cam.depth.pairing = DepthPairing()  # drop the depth images held for pairing
        self.destroy_timer(self._tick_timer)
        ended = self._worker.stop(timeout)
        free_memory(self.segmenter.backbone.device)
        return ended

    def _cleanup(self) -> None:
        """Release everything _configure made: model, vocabulary, publishers, services, threads."""
        reconfigurer = getattr(self, "_reconfigurer", None)
        if reconfigurer is not None:
            reconfigurer.cancelled.set()
            reconfigurer.stop(JOIN_SECONDS)
            self._reconfigurer = None
        if getattr(self, "_param_callback", None) is not None:
            self.remove_on_set_parameters_callback(self._param_callback)
            self._param_callback = None
        masks = getattr(self, "_masks", None)
        if masks is not None:
            masks.close()
        for name in ("_enable_srv",):
            if getattr(self, name, None) is not None:
                self.destroy_service(getattr(self, name))
                setattr(self, name, None)
        if getattr(self, "_mask_gc", None) is not None:
            self.destroy_guard_condition(self._mask_gc)
            self._mask_gc = None
        pubs = []
        for name in ("_vocab_pub", "_label_info_pub", "_diag_pub"):
            pubs.append(getattr(self, name, None))
            setattr(self, name, None)
        for cam in getattr(self, "_cams", {}).values():
            pubs += [out.publisher for out in cam.outputs if isinstance(out, Output)]
            cam.outputs = []
        for pub in pubs:
            if pub is not None:
                self._drop_publisher(pub)
        self._cams = {}
        device = self.segmenter.backbone.device if self.segmenter is not None else None
        if self.segmenter is not None:
            self.segmenter.close()
        self.segmenter = None
        free_memory(device)

    def _make_publisher(self, msg_type: Any, topic: str, qos: Any, **kwargs: Any) -> Any:
        """A publisher of an output (the lifecycle node makes lifecycle publishers)."""
        return self.create_publisher(msg_type, topic, qos, **kwargs)

    def _drop_publisher(self, publisher: Any) -> None:
        """Destroy a publisher made by _make_publisher."""
        self.destroy_publisher(publisher)

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

    # --- outputs -------------------------------------------------------------------------------

    def _output(self, cam: Camera, output: type[Output]) -> Any:
        """A publisher for one of the camera's outputs, with the output QoS."""
        topic = cam.out(output.leaf)
        return self._make_publisher(
            output.msg_type, topic, self._qos_out, **self._publisher_events(topic)
        )

    def _warn(self, text: str) -> None:
        """A warning from the publish thread, at most every 10 s."""
        self._logger.warning(text, throttle_duration_sec=10.0)

    def _create_mask_pub(self, camera: str, slug: str) -> Any:
        """A mask publisher; no QoS event handlers, so the executor never waits on it."""
        try:
            from rclpy.event_handler import PublisherEventCallbacks
        except ImportError:  # Humble
            from rclpy.qos_event import PublisherEventCallbacks
        return self._make_publisher(
            Image,
            self._cams[camera].out(f"masks/{slug}"),
            self._qos_out,
            event_callbacks=PublisherEventCallbacks(use_default_callbacks=False),
        )

    def _mask_subscribed(self, camera: str) -> set[str]:
        """Slugs under the camera's masks/ namespace that something in the graph subscribes to."""
        prefix = f"{self.get_fully_qualified_name()}/{self._cams[camera].prefix}masks/"
        return {
            name[len(prefix) :]
            for name, _ in self.get_topic_names_and_types()
            if name.startswith(prefix)
            and "/" not in name[len(prefix) :]
            and self.count_subscribers(name) > 0
        }

    def _sync_masks(self) -> None:
        """Executor callback (guard condition): bring the mask publishers in step."""
        if self._masks.sync():
            self._mask_gc.trigger()  # more to do: continue after the callbacks waiting now

    # --- diagnostics ---------------------------------------------------------------------------

    def _tick(self) -> None:
        """Once a second: input QoS, lazily made mask topics, /diagnostics."""
        self._check_input_qos()
        self._sync_masks()
        self._publish_diagnostics()

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def worker(self) -> FramePipeline:
        """The frame pipeline (tests and benchmarks look at its counters)."""
        return self._worker

    @property
    def slots(self) -> LatestFrameSlots:
        """The per-camera latest-frame slots."""
        return self._slots

    @property
    def cameras(self) -> dict[str, Camera]:
        """Camera state by name ('' for the single default camera)."""
        return self._cams

    @property
    def masks(self) -> MaskTopics:
        """The mask publishers (tests)."""
        return self._masks

    def reconfiguring(self) -> bool:
        """True while a vocabulary or method change is queued or being built."""
        reconfigurer = getattr(self, "_reconfigurer", None)  # none while unconfigured
        return reconfigurer is not None and not reconfigurer.idle()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop the worker (after the frame in hand) and cancel reconfiguration; True if both ended.

        The two threads are stopped together, so the wait is at most `timeout`, not twice it.
        """
        self._shut_down = True
        deadline = time.monotonic() + timeout
        ended = True
        reconfigurer = getattr(self, "_reconfigurer", None)  # absent when the constructor failed
        if reconfigurer is not None:
            reconfigurer.cancelled.set()  # a running text encoding stops at its next batch
        worker = getattr(self, "_worker", None)
        if worker is not None:
            ended &= worker.stop(max(0.0, deadline - time.monotonic()))
        if reconfigurer is not None:
            ended &= reconfigurer.stop(max(0.0, deadline - time.monotonic()))
        return ended

    def destroy_node(self) -> None:
        """Stop the threads (unless shutdown() did), then destroy the ROS entities."""
        if not getattr(self, "_shut_down", False):
            self.shutdown()
        masks = getattr(self, "_masks", None)
        if masks is not None:
            masks.close()
        super().destroy_node()
