"""A background thread that builds new vocabularies and methods off the image path.

Nothing here imports rclpy. A newer request of a kind replaces a queued one of that kind; stop()
cancels the running job (jobs poll `cancelled`, e.g. between batches of text prompts) so that a
node can exit within seconds even in the middle of a 10,000-class vocabulary.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Cancelled(Exception):
    """A job noticed that the reconfiguration thread is stopping."""


class Reconfigurer:
    """A thread that runs queued jobs one at a time, newest request of each kind wins."""

    def __init__(self, on_error: Callable[[str, Exception], None]) -> None:
        """Start the thread; on_error(kind, exc) reports a job that raised (not Cancelled)."""
        self._cond = threading.Condition()
        self._pending: dict[str, Callable[[], None]] = {}
        self._busy: str | None = None
        self._stop = False
        self._on_error = on_error
        self.cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ovseg-reconfigure", daemon=True)
        self._thread.start()

    def submit(self, kind: str, job: Callable[[], None]) -> None:
        """Queue a job; a newer job of the same kind replaces one that has not started."""
        with self._cond:
            if self._stop:
                return
            self._pending[kind] = job
            self._cond.notify()

    def check(self) -> None:
        """Raise Cancelled when stop() was called (jobs call this between steps)."""
        if self.cancelled.is_set():
            raise Cancelled

    @property
    def busy(self) -> str | None:
        """The kind of job running now, or None."""
        return self._busy

    def pending(self) -> list[str]:
        """Kinds of jobs queued or running."""
        with self._cond:
            kinds = list(self._pending)
            busy = self._busy
        return ([busy] if busy else []) + kinds

    def has_pending(self, kind: str) -> bool:
        """Whether a job of this kind is queued (not yet started)."""
        with self._cond:
            return kind in self._pending

    def idle(self) -> bool:
        """True when nothing is queued or running."""
        with self._cond:
            return not self._pending and self._busy is None

    def stop(self, timeout: float = 30.0) -> bool:
        """Drop the queued jobs, cancel the running one, end the thread; True if it ended."""
        with self._cond:
            self._stop = True
            self._pending.clear()
            self.cancelled.set()
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

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
            except Cancelled:
                pass
            except Exception as exc:  # noqa: BLE001 - reported, the node keeps running
                if not self.cancelled.is_set():
                    self._on_error(kind, exc)
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()
