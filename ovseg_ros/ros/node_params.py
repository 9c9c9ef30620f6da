"""The node's parameters: declared with values, validated on change, applied off the image path.

A mixin of OvsegNode (node.py): the table of parameters is param_table.py; here they become rclpy
parameters (descriptors, ranges, every one with a value), a change is checked before it is
accepted (a rejection carries a short reason), cheap changes apply at once and vocabulary or
method changes are queued on the reconfiguration thread (reconfigure.py).
"""

from __future__ import annotations

import copy
import difflib
import threading
import time
from collections.abc import Callable
from typing import Any

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.exceptions import ParameterUninitializedException
from rclpy.parameter import Parameter

from ..engine.config import TEMPLATE_SETS
from ..engine.methods import create_method, make_params
from ..engine.text import excerpt, parse_background, parse_vocabulary
from . import diagnostics as D
from . import params as P

#: Exit codes of ovseg_node.
EXIT_OK = 0
EXIT_BAD_PARAMETERS = 2
EXIT_MODEL_LOAD = 3

_VOCAB_KEYS = ("vocabulary", "background_words", "templates")


class StartupError(RuntimeError):
    """The node cannot start; the message is one sentence of cause and remedy."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _param_value(param: Parameter) -> Any:
    """A parameter's value as plain Python (arrays as lists); None when not set."""
    value = param.value
    if param.type_ == Parameter.Type.NOT_SET:
        return None
    if isinstance(value, tuple) or type(value).__name__ in ("array", "ndarray"):
        value = list(value)
    return value


class ParameterHandling:
    """Parameter declaration, validation and application for OvsegNode."""

    def _declare_parameters(self) -> None:
        """Declare each parameter of param_table.py and each method hyper-parameter, with values."""
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
        for mp in self._method_params:
            descriptor = ParameterDescriptor(
                name=mp.name,
                description=mp.description,
                additional_constraints=f"method {mp.method}; run time",
                dynamic_typing=True,  # 3 is accepted for a float; make_params checks the type
            )
            self._declare(mp.name, mp.default, "", descriptor)

    def _declare(self, name: str, default: Any, kind: str, descriptor: ParameterDescriptor) -> None:
        """Declare one parameter with a value (an empty list is set typed, after declaring)."""
        try:
            if kind == "string_array" and not default:
                # [] has no type of its own: declare typed (writable), give it the typed empty
                # value, then the real descriptor, so that get / dump / rqt_reconfigure show []
                # rather than "not set" (rclpy then fails the whole bulk GetParameters).
                writable = copy.deepcopy(descriptor)
                writable.read_only = False
                param = self.declare_parameter(name, Parameter.Type.STRING_ARRAY, writable)
                if param.type_ == Parameter.Type.NOT_SET:
                    self.set_parameters([Parameter(name, Parameter.Type.STRING_ARRAY, [])])
                self.set_descriptor(name, descriptor)
            else:
                self.declare_parameter(name, default, descriptor)
        except Exception as exc:  # wrong type or range of a value from the params file
            raise StartupError(
                f"parameter {name!r}: {excerpt(exc, 200)} (expected {kind or 'a value'}; "
                f"{descriptor.additional_constraints})",
                EXIT_BAD_PARAMETERS,
            ) from exc

    def _warn_unknown_parameters(self) -> None:
        """A params-file or -p name the node does not have is a typo: say so, with a guess."""
        overrides = getattr(self, "_parameter_overrides", {}) or {}
        known = set(self._specs) | {mp.name for mp in self._method_params}
        for name in sorted(overrides):
            if name in known or name == "use_sim_time" or name.startswith("qos_overrides."):
                continue
            guess = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            self._logger.warning(
                f"unknown parameter {excerpt(name, 60)} (from the parameter file or -p) is "
                f"ignored{hint} (`ros2 param list /ovseg` lists the node's parameters)"
            )

    def _current_values(self) -> dict[str, Any]:
        """All declared parameter values by name."""
        values: dict[str, Any] = {}
        for name in list(self._specs) + [mp.name for mp in self._method_params]:
            try:
                value = _param_value(self.get_parameter(name))
            except ParameterUninitializedException:
                value = None
            if value is None and self._specs.get(name) and self._specs[name].kind == "string_array":
                value = []
            if value is not None:
                values[name] = value
        return values

    def _on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Validate a change; apply cheap ones now, queue vocabulary/method builds."""
        if self._reverting == threading.get_ident():
            return SetParametersResult(successful=True)  # this thread is undoing a failed change
        changes = {p.name: _param_value(p) for p in parameters}
        for name, value in list(changes.items()):
            if value is None and name in self._specs and self._specs[name].kind == "string_array":
                changes[name] = []
        try:
            apply = self._plan(changes)
        except ValueError as exc:
            reason = D.shorten(str(exc))
            self._logger.warning(
                f"rejected parameter change {D.shorten(', '.join(sorted(changes)), 120)}: {reason}"
            )
            return SetParametersResult(successful=False, reason=reason)
        apply()
        return SetParametersResult(successful=True)

    def _plan(self, changes: dict[str, Any]) -> Callable[[], None]:
        """Validate `changes` against the current values; return the function that applies them."""
        values = self._current_values()
        for key, value in changes.items():
            if value is None:
                raise ValueError(f"{key} needs a value")
            values[key] = value
        actions: list[Callable[[], None]] = []

        if any(k in changes for k in _VOCAB_KEYS):
            entries = values["vocabulary"]
            background = values["background_words"]
            templates = values["templates"]
            classes = parse_vocabulary(entries)  # ValueError: empty, duplicates, too long...
            parse_background(background, classes)
            if templates not in TEMPLATE_SETS:
                raise ValueError(
                    f"templates must be one of {list(TEMPLATE_SETS)}, got {excerpt(templates)}"
                )
            actions.append(lambda: self._request_vocabulary(entries, background, templates))

        method = values["method"]
        changed_methods = {mp.method for mp in self._method_params if mp.name in changes} | (
            {method} if "method" in changes else set()
        )
        for name in sorted(changed_methods):
            make_params(name, P.method_overrides(values, name))  # unknown name, type, range
            if name == method:
                candidate = create_method(name, P.method_overrides(values, name))
                self.segmenter.check(self.segmenter.config, candidate)  # tokens per crop
        if method in changed_methods:
            overrides = P.method_overrides(values, method)
            actions.append(lambda: self._request_method(method, overrides))

        engine_updates: dict[str, Any] = {}
        node_updates: dict[str, Any] = {}
        for key, value in changes.items():
            spec = self._specs.get(key)
            if spec is None or key in _VOCAB_KEYS or key == "method" or spec.owner == "lifecycle":
                continue  # (lifecycle.* are read when a transition happens)
            if spec.owner == "engine":
                engine_updates[spec.attr] = value
            else:
                node_updates[spec.attr] = value
        if engine_updates:
            candidate = self.segmenter.config.replace(**engine_updates)  # names the parameter
            self.segmenter.check(candidate)  # what depends on the model (patches per crop)
            actions.append(lambda: self.segmenter.update(**engine_updates))
            if "prob_threshold" in engine_updates:
                actions.append(self._republish_label_info)
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
        worker = getattr(self, "_worker", None)  # none yet in a configured, inactive node
        if worker is not None:
            worker.max_rate_hz = options.max_rate_hz
        if options.enabled != previous.enabled:
            if worker is not None:
                worker.set_enabled(options.enabled)
            self._logger.info("processing resumed" if options.enabled else "processing paused")
        if (options.publish_masks, options.masks_advertised) != (
            previous.publish_masks,
            previous.masks_advertised,
        ):
            with self._out_lock:
                if self._announced is not None:
                    self._set_mask_classes(self._announced)

    def _request_vocabulary(
        self, entries: list[str], background: list[str], templates: str
    ) -> None:
        def job() -> None:
            t0 = time.monotonic()
            self._logger.info(
                f"encoding a vocabulary of {len(entries)} classes ({templates} templates): "
                f"{D.names_summary(entries)}"
            )
            vocab = self.segmenter.build_vocabulary(
                entries, background, templates, progress=self._text_progress()
            )
            # A stop during the method's vocabulary binding (after the last prompt batch, e.g.
            # PEARL's text terms) still drops the build: it is never announced or used.
            self._reconfigurer.check()
            # Announced before it is used, and delivered (acknowledged by every subscriber of
            # ~/vocabulary, up to ACK_SECONDS) before its first label image can be published:
            # a client then never holds a label image whose class map it has not received.
            # Meanwhile outputs of the old map are discarded (they would break the stamp rule).
            with self._out_lock:
                self._announce(vocab)
            self._wait_for_delivery()
            self.segmenter.use_vocabulary(vocab, entries, background)
            self._change_error = ""
            self._logger.info(
                f"vocabulary v{vocab.version} in use ({time.monotonic() - t0:.2f} s): "
                f"{D.names_summary(vocab.names)}"
            )

        self._reconfigurer.submit("vocabulary", job)

    def _request_method(self, method: str, overrides: dict[str, Any]) -> None:
        def job() -> None:
            t0 = time.monotonic()
            self._reconfigurer.check()
            self.segmenter.set_method(method, overrides)
            self._change_error = ""
            self._logger.info(
                f"method {method} {overrides or ''} in use ({time.monotonic() - t0:.2f} s)"
            )

        self._reconfigurer.submit("method", job)

    def _on_reconfigure_error(self, kind: str, exc: Exception) -> None:
        """A queued change failed: say why, and put the parameters back to what is in use."""
        cfg = self.segmenter.config
        self._change_error = f"the last {kind} change failed and was undone: {D.shorten(str(exc))}"
        self._change_error_at = time.monotonic()
        self._logger.error(self._change_error)
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
            # The method in use, and its hyper-parameters as in use (a failed change of one of
            # them, e.g. a proxy weights file that does not load, must not stay set).
            restore = [Parameter("method", Parameter.Type.STRING, cfg.method)]
            for mp in self._method_params:
                if mp.method != cfg.method:
                    continue
                in_use = cfg.method_params.get(mp.field, mp.default)
                if self.get_parameter(mp.name).value != in_use:
                    restore.append(Parameter(mp.name, value=in_use))
        self._reverting = threading.get_ident()
        try:
            self.set_parameters(restore)
        finally:
            self._reverting = 0

    def _text_progress(
        self, cancel: Callable[[], bool] | None = None
    ) -> Callable[[int, int], None]:
        """Log encoding progress every 2 s; stop the encoding when cancelled or shutting down."""
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if cancel is not None and cancel():
                raise KeyboardInterrupt  # start-up interrupted by a stop signal
            reconfigurer = getattr(self, "_reconfigurer", None)
            if reconfigurer is not None:
                reconfigurer.check()
            now = time.monotonic()
            if done == total or now - last[0] > 2.0:
                last[0] = now
                self._logger.info(f"encoding text prompts: {done}/{total}")

        return progress
