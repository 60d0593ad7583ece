"""The one way widgets run work off the GUI thread.

:class:`Jobs` starts a function (or a generator function, whose items stream to the main
thread) in a napari worker. Its outcome comes back *as a value*: errors are caught in the
thread and handed to ``on_error`` on the main thread, because napari 0.9's own handler of a
worker's ``errored`` signal fails when a viewer is current. Starting a job makes the earlier one
stale (its late items and outcome are dropped), and once the widget is destroyed or
:meth:`Jobs.stop` was called nothing reaches it any more (no "Internal C++ object already
deleted"). Each job gets its own ``threading.Event`` (:attr:`Jobs.cancel`, passed to the function
as ``cancel=`` with ``pass_cancel=True``), set when the job is dropped or stopped.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Callable


class _Error:
    def __init__(self, error: BaseException):
        self.error = error


def _call(func, *args, **kwargs):
    try:
        return func(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - handed to on_error on the main thread
        return _Error(e)


def _iterate(func, *args, **kwargs):
    try:
        result = yield from func(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return _Error(e)
    return result


class Jobs:
    """Background jobs of one widget, one at a time (see the module docstring)."""

    def __init__(self, widget) -> None:
        self.worker = None
        self.cancel = threading.Event()
        self._token = 0
        self._alive = True
        try:
            widget.destroyed.connect(self.stop)
        except (AttributeError, RuntimeError):
            pass

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def start(self, func: Callable, *args: Any, on_done: Callable | None = None,
              on_error: Callable[[BaseException], Any] | None = None, on_item: Callable | None = None,
              on_finished: Callable | None = None, pass_cancel: bool = False, **kwargs: Any):
        """Run ``func(*args, **kwargs)`` in a worker; returns the (started) worker."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            self.cancel.set()
            self.worker.quit()
        self._token += 1
        token = self._token
        self.cancel = threading.Event()
        if pass_cancel:
            kwargs["cancel"] = self.cancel
        wrapper = _iterate if inspect.isgeneratorfunction(func) else _call
        w = create_worker(wrapper, func, *args, _start_thread=False, _ignore_errors=True, **kwargs)

        def current() -> bool:
            return self._alive and token == self._token

        def returned(value):
            if not current():
                return
            if isinstance(value, _Error):
                if on_error is not None:
                    on_error(value.error)
            elif on_done is not None:
                on_done(value)

        def finished():
            if self.worker is w:
                self.worker = None
            if current() and on_finished is not None:
                on_finished()

        if on_item is not None and hasattr(w, "yielded"):
            w.yielded.connect(lambda item: current() and on_item(item))
        w.returned.connect(returned)
        w.finished.connect(finished)
        self.worker = w
        w.start()
        return w

    def drop(self) -> None:
        """Make the running job stale (its results are ignored) and ask it to stop."""
        self._token += 1
        self.cancel.set()
        if self.worker is not None:
            self.worker.quit()

    def stop(self, *_: Any) -> None:
        """No job of this widget may touch it any more (the widget is going away)."""
        self._alive = False
        self.drop()
