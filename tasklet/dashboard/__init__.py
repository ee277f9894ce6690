"""tasklet's web dashboard: queues, jobs, runs and workers, with retry, cancel and pause.

Needs the ``dashboard`` extra (``pip install 'tasklet[dashboard]'``). Run it
with ``tasklet dashboard``, or mount it in a Starlette or FastAPI app::

    from tasklet.dashboard import create_app
    app.mount("/jobs", create_app())
"""

from __future__ import annotations

import ipaddress

from ._app import DashboardError, create_app

__all__ = ["DashboardError", "create_app", "is_loopback", "serve"]


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume the network can reach it


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    username: str | None = None,
    password: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve the dashboard until Ctrl-C or SIGTERM.

    Bound to loopback, pages are open to this machine and actions need the
    credentials; bound to anything else, every page needs them, and the
    dashboard refuses to start without them.
    """
    import uvicorn

    app = create_app(username=username, password=password, public_reads=is_loopback(host))
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), lifespan="off")
