"""A worker lifespan that cannot start, for the CLI test; import as ``tests.lifespan_for_tests``."""

from __future__ import annotations

from collections.abc import Iterator

import tasklet


@tasklet.worker_lifespan
def unreachable() -> Iterator[dict[str, object]]:
    raise ConnectionError("cache at 127.0.0.1:1 refused the connection")
    yield {}  # pragma: no cover
