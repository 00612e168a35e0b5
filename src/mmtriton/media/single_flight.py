"""Single-flight: concurrent loads of one key run once; the others wait for that one's result or error.

Works across event loops and threads (a MediaLoader is shared by every loop of a model instance): the shared
result is a ``concurrent.futures.Future`` and each waiter is woken on its own loop. An error reaches every
waiter and is not remembered: the next load of the key runs again. If the running load is cancelled (its
client went away), the waiters do not inherit the cancellation: one of them runs the load instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _LeaderCancelled(Exception):
    """Set on the shared future when the load running it was cancelled: waiters retry."""


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key → (the shared outcome, the leader's ``where``: error texts name it and are re-named per waiter)
        self._running: dict[str, tuple[concurrent.futures.Future[T], str]] = {}

    def in_flight(self) -> int:
        with self._lock:
            return len(self._running)

    async def run(self, key: str, where: str, load: Callable[[], Awaitable[T]]) -> T:
        """``await load()`` unless a load of ``key`` is already running, then its outcome instead.

        ``load`` must publish its result (say, into a cache) before returning, so that a caller arriving after
        it finishes finds the result there rather than starting a second load."""
        while True:
            with self._lock:
                running = self._running.get(key)
                if running is None:
                    shared: concurrent.futures.Future[T] = concurrent.futures.Future()
                    self._running[key] = (shared, where)
                    break
            outcome, leader_where = running
            try:
                return await _wait(outcome)
            except _LeaderCancelled:
                continue
            except Exception as exc:
                renamed = _renamed(exc, leader_where, where)
                if renamed is exc:
                    raise
                raise renamed from exc
        try:
            value = await load()
        except BaseException as exc:
            self._finish(key, shared)
            # A cancelled leader cancels only itself; anything else is every waiter's outcome too.
            shared.set_exception(_LeaderCancelled() if isinstance(exc, asyncio.CancelledError) else exc)
            raise
        self._finish(key, shared)
        shared.set_result(value)
        return value

    def _finish(self, key: str, shared: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            if self._running.get(key, (None,))[0] is shared:
                del self._running[key]


async def _wait(shared: concurrent.futures.Future[T]) -> T:
    """Await a concurrent future from this loop without letting this waiter's cancellation cancel it for all
    (``asyncio.wrap_future`` would propagate it)."""
    loop = asyncio.get_running_loop()
    mine: asyncio.Future[T] = loop.create_future()

    def copy(done: concurrent.futures.Future[T]) -> None:
        if mine.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            mine.set_exception(exc)
        else:
            mine.set_result(done.result())

    def wake(done: concurrent.futures.Future[T]) -> None:
        try:
            loop.call_soon_threadsafe(copy, done)
        except RuntimeError:
            pass  # that waiter's loop is closed: nobody is waiting there any more

    shared.add_done_callback(wake)
    return await mine


def _renamed(exc: Exception, leader_where: str, where: str) -> Exception:
    """The leader's error as this waiter's: same class, its text naming this waiter's item."""
    text = str(exc)
    prefix = f"{leader_where}:"
    if not text.startswith(prefix):
        return exc
    try:
        return type(exc)(f"{where}:{text[len(prefix):]}")
    except Exception:  # a class whose constructor takes something else: pass the original on
        return exc
