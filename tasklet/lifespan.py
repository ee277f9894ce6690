"""Worker state: resources a worker process opens once and hands to every job it runs.

A lifespan is a generator function, sync or async, that sets resources up,
yields them as a mapping, and closes them after the yield::

    @tasklet.worker_lifespan
    async def resources():
        async with httpx.AsyncClient() as http:
            yield {"http": http}

    @job
    async def fetch(ctx: JobContext, url: str) -> int:
        return (await ctx.state["http"].get(url)).status_code

A worker runs every lifespan registered when it starts, in order, before it
registers and takes a job; if one raises, the worker stops with
:class:`WorkerStartupError` and takes none. They are closed in reverse order
after the last job has finished (a sync job whose thread outlived the grace
period is the exception: its thread cannot be stopped). Sync lifespans run in
a thread, so they may block.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, TypeVar

import anyio.to_thread

from .errors import TaskletError

__all__ = ["WorkerStartupError", "worker_lifespan"]

log = logging.getLogger("tasklet.worker")

L = TypeVar("L", bound=Callable[[], Any])

_lock = threading.Lock()
_lifespans: list[Callable[[], Any]] = []
#: The state of each worker running in this process, by worker id.
_states: dict[str, State] = {}


class WorkerStartupError(TaskletError):
    """A worker lifespan raised while starting; the worker stopped before taking any job."""


class State(Mapping[str, Any]):
    """``ctx.state``: what the worker's lifespans yielded, read-only."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            have = ", ".join(map(repr, self._values)) or "nothing"
            raise KeyError(
                f"the worker's state has no {key!r} (it has {have}): yield it from a "
                "function decorated with @tasklet.worker_lifespan in a module the worker imports"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"State({self._values!r})"


_EMPTY = State({})


def worker_lifespan(func: L) -> L:
    """Register a generator function (sync or async) that opens the worker's state.

    It yields once: a mapping (or None) whose items become ``ctx.state`` for
    every job the worker runs; code after the yield closes them at shutdown.
    """
    if not (inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func)):
        raise TypeError(
            f"@worker_lifespan takes a generator function that yields the state once, sync or "
            f"async (def resources(): yield {{'db': pool}}), not {func!r}"
        )
    with _lock:
        _lifespans.append(func)
    return func


def registered() -> list[Callable[[], Any]]:
    with _lock:
        return list(_lifespans)


def forget(func: Callable[[], Any]) -> None:
    """Unregister a lifespan (for tests and reloads)."""
    with _lock:
        if func in _lifespans:
            _lifespans.remove(func)


def state_of(worker_id: str | None) -> State:
    """The state of a worker running in this process (empty for an inline call)."""
    if worker_id is None:
        return _EMPTY
    return _states.get(worker_id, _EMPTY)


def _name(func: Callable[[], Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


async def _enter(stack: contextlib.AsyncExitStack, func: Callable[[], Any]) -> Any:
    name = _name(func)
    if inspect.isasyncgenfunction(func):
        acm = contextlib.asynccontextmanager(func)()
        value = await acm.__aenter__()

        async def close_async(*_: object) -> bool:
            try:
                await acm.__aexit__(None, None, None)
            except Exception:
                log.exception("worker lifespan %s raised while shutting down", name)
            return False

        stack.push_async_exit(close_async)
        return value
    cm = contextlib.contextmanager(func)()
    value = await anyio.to_thread.run_sync(cm.__enter__)

    async def close(*_: object) -> bool:
        try:
            await anyio.to_thread.run_sync(cm.__exit__, None, None, None)
        except Exception:
            log.exception("worker lifespan %s raised while shutting down", name)
        return False

    stack.push_async_exit(close)
    return value


@contextlib.asynccontextmanager
async def worker_state(worker_id: str) -> AsyncIterator[State]:
    """Open every registered lifespan for one worker; close them in reverse on exit."""
    lifespans = registered()
    if not lifespans:
        yield _EMPTY
        return
    values: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        for func in lifespans:
            try:
                value = await _enter(stack, func)
            except Exception as exc:
                raise WorkerStartupError(
                    f"worker lifespan {_name(func)} failed while starting: "
                    f"{type(exc).__qualname__}: {exc}; the worker took no jobs"
                ) from exc
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise WorkerStartupError(
                    f"worker lifespan {_name(func)} yielded {type(value).__qualname__}; it must "
                    "yield a mapping of names to resources (or None)"
                )
            clash = values.keys() & value.keys()
            if clash:
                raise WorkerStartupError(
                    f"worker lifespan {_name(func)} yields {', '.join(map(repr, sorted(clash)))}, "
                    "which another lifespan already yields: give each resource its own name"
                )
            values.update(value)
        state = _states[worker_id] = State(values)
        log.info("worker state ready: %s", ", ".join(values) or "(empty)")
        try:
            yield state
        finally:
            _states.pop(worker_id, None)
