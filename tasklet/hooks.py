"""Lifecycle hooks: ``before_perform``, ``after_success``, ``after_failure``.

Hooks observe; they do not decide. Register them for every job here, or for one
job with the decorators of the same name on the job::

    @tasklet.before_perform
    def log_start(ctx: JobContext) -> None: ...

    @send_welcome.after_failure
    async def alert(ctx: JobContext, error: BaseException) -> None:
        if not ctx.will_retry: ...

On the way in, global hooks run before the job's own, in the order they were
registered; on the way out the order is reversed. A ``before_perform`` hook
that raises fails the attempt (it is retried like any failure). An ``after_*``
hook that raises is logged with its name and changes nothing. Sync hooks run
in a worker thread, so they never block the event loop.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread

from .context import JobContext

__all__ = ["Hooks", "after_failure", "after_success", "before_perform"]

log = logging.getLogger("tasklet.hooks")

BeforeHook = Callable[[JobContext], Awaitable[None] | None]
SuccessHook = Callable[[JobContext, Any], Awaitable[None] | None]
FailureHook = Callable[[JobContext, BaseException], Awaitable[None] | None]
H = TypeVar("H", bound=Callable[..., Any])


@dataclass
class Hooks:
    """The hooks of one job, or the global ones."""

    before_perform: list[BeforeHook] = field(default_factory=list)
    after_success: list[SuccessHook] = field(default_factory=list)
    after_failure: list[FailureHook] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.before_perform or self.after_success or self.after_failure)


GLOBAL = Hooks()


def before_perform(hook: H) -> H:
    """Register ``hook(ctx)`` to run before every job's attempt."""
    GLOBAL.before_perform.append(hook)
    return hook


def after_success(hook: H) -> H:
    """Register ``hook(ctx, result)`` to run after every successful attempt."""
    GLOBAL.after_success.append(hook)
    return hook


def after_failure(hook: H) -> H:
    """Register ``hook(ctx, error)`` to run after every failed attempt; see ``ctx.will_retry``."""
    GLOBAL.after_failure.append(hook)
    return hook


async def _call(hook: Callable[..., Any], *args: Any) -> None:
    if inspect.iscoroutinefunction(hook):
        await hook(*args)
        return
    result = await anyio.to_thread.run_sync(hook, *args)
    if inspect.isawaitable(result):
        await result


def _name(hook: Callable[..., Any]) -> str:
    return f"{getattr(hook, '__module__', '?')}.{getattr(hook, '__qualname__', repr(hook))}"


async def run_before(job_hooks: Hooks, ctx: JobContext) -> None:
    """Global then per-job ``before_perform`` hooks; the first that raises fails the attempt."""
    for hook in (*GLOBAL.before_perform, *job_hooks.before_perform):
        await _call(hook, ctx)


async def run_after_success(job_hooks: Hooks, ctx: JobContext, result: Any) -> None:
    await _run_after((*GLOBAL.after_success, *job_hooks.after_success), ctx, result)


async def run_after_failure(job_hooks: Hooks, ctx: JobContext, error: BaseException) -> None:
    await _run_after((*GLOBAL.after_failure, *job_hooks.after_failure), ctx, error)


async def _run_after(hooks: tuple[Callable[..., Any], ...], ctx: JobContext, value: Any) -> None:
    for hook in reversed(hooks):
        try:
            await _call(hook, ctx, value)
        except Exception:
            log.exception(
                "hook %s failed after job %s (%s); ignored", _name(hook), ctx.job_id, ctx.name
            )
