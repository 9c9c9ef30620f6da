"""`ovseg_lifecycle_node`: the node as a managed (lifecycle) node, as nav2 users run theirs.

The same node as OvsegNode (same parameters, topics, services and behaviour while active), with
the standard ROS 2 state machine (`ros2 lifecycle set /ovseg configure`, nav2's
lifecycle_manager):

* unconfigured: only the parameters exist (set them freely; they are checked at configure);
* configure: load the model and the vocabulary, create the publishers (lifecycle publishers for
  every output) and services; a failure is one sentence in the log and the node stays
  unconfigured;
* activate: announce the class map, subscribe the cameras, start the inference thread;
* deactivate: unsubscribe, finish the frame in hand, stop the thread and give back what frames
  used (activations, the GPU allocator's cache); the model stays loaded so activation is
  instant, unless `lifecycle.unload_on_deactivate` is true: then deactivation also releases the
  model (as cleanup does) and activation loads it again;
* cleanup: release everything configure made (model, vocabulary, publishers, threads);
* shutdown: from any state, releasing whatever is held.

`lifecycle.autostart` makes the node configure and activate itself at start-up (the launch file's
`lifecycle:=true autostart:=true`); without it, a lifecycle manager drives the transitions.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from ..engine.text import excerpt
from . import params as P
from .node import EXIT_BAD_PARAMETERS, OvsegNode, StartupError

SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE


class OvsegLifecycleNode(OvsegNode, LifecycleNode):
    """OvsegNode driven by the lifecycle state machine (see the module docstring)."""

    _MANAGED = True

    def __init__(
        self,
        *,
        backbone: Any = None,
        node_name: str = "ovseg",
        cancel: Callable[[], bool] | None = None,
        **node_kwargs: Any,
    ) -> None:
        """Declare the parameters (lifecycle.* too); nothing is loaded before configure.

        `backbone` and `cancel` are kept for configure (see OvsegNode).
        """
        self._backbone = backbone
        self._cancel = cancel
        self._publishing = False  # lifecycle publishers enabled (between activate and deactivate)
        self.last_error = ""  # the sentence of the last failed transition
        self.last_exit_code = 0  # and the exit code ovseg_node would have given for it
        super().__init__(node_name=node_name, **node_kwargs)
        self._guard_change_state()

    def _guard_change_state(self) -> None:
        """A transition the current state does not have is refused, never raised.

        rclpy before Kilted (Jazzy's 7.1) raises RCLError from the change_state service for,
        e.g., `activate` while unconfigured; raised in the executor, it would end the node. The
        request is answered with success=False instead, as later rclpy does, and logged.
        """
        service = getattr(self, "_service_change_state", None)
        if service is None:
            return
        answer = service.callback

        def guarded(request: Any, response: Any) -> Any:
            before = self.state
            try:
                return answer(request, response)
            except Exception as exc:  # noqa: BLE001 - RCLError of an unregistered transition
                transition = request.transition.label or f"id {request.transition.id}"
                self._logger.warning(
                    f"transition {transition} refused in state {before}: {excerpt(exc, 120)}"
                )
                response.success = False
                return response

        service.callback = guarded

    # --- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The lifecycle state's label: unconfigured, inactive, active or finalized."""
        return self._state_machine.current_state[1]

    def lifecycle_options(self) -> P.LifecycleOptions:
        """The lifecycle.* parameters now."""
        return P.lifecycle_options(self._current_values())

    # --- transitions ---------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model and the vocabulary; create publishers and services."""
        return self._try("configure", lambda: self._configure(self._backbone, self._cancel))

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Enable the publishers, announce the class map, subscribe, start the thread."""
        if self.segmenter is None:  # unloaded by the last deactivation
            result = self._try("activate", lambda: self._configure(self._backbone, self._cancel))
            if result != SUCCESS:
                return result
        result = LifecycleNode.on_activate(self, state)
        if result != SUCCESS:
            return result
        self._publishing = True
        return self._try("activate", self._activate, cleanup=False)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop taking frames and free what they used (and the model, if asked)."""
        self._deactivate()
        self._publishing = False
        result = LifecycleNode.on_deactivate(self, state)
        if self.lifecycle_options().unload_on_deactivate:
            self._logger.info("releasing the model (lifecycle.unload_on_deactivate)")
            self._cleanup()
        return result

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything configure made."""
        self._cleanup()
        self._logger.info("cleaned up: model, vocabulary and topics released")
        return LifecycleNode.on_cleanup(self, state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """From any state: stop and release whatever is held."""
        if self._active:
            self._deactivate()
            self._publishing = False
        self._cleanup()
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """A transition raised: release everything and go back to unconfigured."""
        self._logger.error(f"a transition from {state.label} failed; releasing everything")
        if self._active:
            self._deactivate()
        self._publishing = False
        self._cleanup()
        return SUCCESS

    def _try(
        self, what: str, step: Callable[[], None], cleanup: bool = True
    ) -> TransitionCallbackReturn:
        """Run a transition's work; a StartupError or stop request is FAILURE with its sentence."""
        try:
            step()
        except StartupError as exc:
            self.last_error, self.last_exit_code = str(exc), exc.exit_code
        except KeyboardInterrupt:  # a stop signal during the vocabulary encoding
            self.last_error, self.last_exit_code = "stopped while loading", 0
        except Exception as exc:  # noqa: BLE001 - a bug: say so (rclpy would hide it)
            self._logger.error(f"{what} raised:\n{traceback.format_exc()}")
            self.last_error = f"{what} raised {type(exc).__name__}: {excerpt(exc, 200)}"
            self.last_exit_code = EXIT_BAD_PARAMETERS
        else:
            self.last_error = ""
            return SUCCESS
        self._logger.error(f"{what} failed: {self.last_error}")
        if cleanup:
            self._cleanup()
        return FAILURE

    # --- publishers ------------------------------------------------------------------------------

    def _make_publisher(self, msg_type: Any, topic: str, qos: Any, **kwargs: Any) -> Any:
        """A lifecycle publisher: it sends only while the node is active."""
        pub = self.create_lifecycle_publisher(msg_type, topic, qos, **kwargs)
        if self._publishing:  # made while active (a mask topic someone subscribed to)
            pub.on_activate(None)
        return pub

    def _drop_publisher(self, publisher: Any) -> None:
        self.destroy_lifecycle_publisher(publisher)

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop the threads (the runner calls this on a stop signal, in any state)."""
        if not self._active:
            self._shut_down = True
            reconfigurer = getattr(self, "_reconfigurer", None)
            if reconfigurer is not None:
                reconfigurer.cancelled.set()
                return reconfigurer.stop(timeout)
            return True
        return super().shutdown(timeout)
