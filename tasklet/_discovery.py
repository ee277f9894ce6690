"""Finding the job functions: the modules a worker imports before it starts.

Modules come from ``[tool.tasklet] imports`` in ``pyproject.toml``, from
``$TASKLET_IMPORTS`` (comma-separated) and from ``--import``; the working
directory is importable, as with celery and rq. Only these modules are ever
imported: nothing named by a row in the database is.
"""

from __future__ import annotations

import importlib
import os
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

from .errors import TaskletError

IMPORTS_ENV = "TASKLET_IMPORTS"


def configured_modules(directory: Path, extra: Iterable[str] = ()) -> list[str]:
    """Job modules named by pyproject.toml in ``directory``, the environment, and ``extra``."""
    modules: list[str] = []
    pyproject = directory / "pyproject.toml"
    if pyproject.is_file():
        try:
            config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise TaskletError(f"cannot read {pyproject}: {exc}") from exc
        imports = config.get("tool", {}).get("tasklet", {}).get("imports", [])
        if not isinstance(imports, list) or not all(isinstance(m, str) for m in imports):
            raise TaskletError(
                f"[tool.tasklet] imports in {pyproject} must be a list of module names"
            )
        modules.extend(imports)
    modules.extend(m.strip() for m in os.environ.get(IMPORTS_ENV, "").split(",") if m.strip())
    modules.extend(extra)
    return list(dict.fromkeys(modules))


def import_modules(modules: Iterable[str], directory: Path) -> None:
    """Import each job module, with ``directory`` importable; a failure names the module."""
    path = str(directory.resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise TaskletError(
                f"cannot import job module {module!r}: {type(exc).__name__}: {exc}"
            ) from exc
