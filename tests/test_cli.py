"""The ``tasklet`` command, run as a real process: from this tree, and from an installed wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from tasklet.migrations import script_location
from tasklet.schema import TABLE_NAMES, VERSION_TABLE
from tests.support import Backend

pytestmark = pytest.mark.slow  # every test here spawns processes

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HEAD = ScriptDirectory(str(script_location())).get_current_head()
TASKLET_TABLES = set(TABLE_NAMES)


def run(
    command: list[str], env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def tasklet_module(*args: str) -> list[str]:
    return [sys.executable, "-m", "tasklet", *args]


def where(backend: Backend) -> str:
    """How the CLI names the backend's database in its messages."""
    url = make_url(backend.url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    shown = url.render_as_string(hide_password=True)
    return shown if backend.schema is None else f"{shown} (schema {backend.schema})"


# ------------------------------------------------------------- migrate from this tree


def test_migrate_creates_the_tables_in_an_empty_database(
    empty_backend: Backend, tmp_path: Path
) -> None:
    result = run(tasklet_module("migrate"), empty_backend.env, tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tasklet: upgraded {where(empty_backend)} from base to {HEAD} (head)\n"
    assert empty_backend.table_names() == TASKLET_TABLES | {VERSION_TABLE}


def test_console_script_migrates_an_empty_database(empty_backend: Backend, tmp_path: Path) -> None:
    result = run([str(BIN / "tasklet"), "migrate"], empty_backend.env, tmp_path)

    assert result.returncode == 0, result.stderr
    assert empty_backend.table_names() >= TASKLET_TABLES


def test_migrate_on_a_migrated_database_reports_nothing_to_do(
    backend: Backend, tmp_path: Path
) -> None:
    result = run(tasklet_module("migrate"), backend.env, tmp_path)

    assert result.returncode == 0, result.stderr
    assert (
        result.stdout == f"tasklet: {where(backend)} is already at {HEAD} (head): nothing to do\n"
    )


def test_migrate_down_base_removes_the_tables(backend: Backend, tmp_path: Path) -> None:
    result = run(tasklet_module("migrate", "--down", "base"), backend.env, tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tasklet: downgraded {where(backend)} from {HEAD} (head) to base\n"
    assert not backend.table_names() & TASKLET_TABLES


def test_migrate_down_without_a_revision_is_refused_and_drops_nothing(
    backend: Backend, tmp_path: Path
) -> None:
    result = run(tasklet_module("migrate", "--down"), backend.env, tmp_path)

    assert result.returncode == 2
    assert "--down needs a REVISION" in result.stderr
    assert backend.table_names() >= TASKLET_TABLES


def test_options_take_precedence_over_the_environment(
    empty_backend: Backend, tmp_path: Path
) -> None:
    env = {**empty_backend.env, "TASKLET_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nowhere"}
    env.pop("TASKLET_SCHEMA", None)
    options = ["--database-url", empty_backend.url]
    if empty_backend.schema is not None:
        options += ["--schema", empty_backend.schema]

    result = run(tasklet_module(*options, "migrate"), env, tmp_path)

    assert result.returncode == 0, result.stderr
    assert empty_backend.table_names() >= TASKLET_TABLES


# ------------------------------------------------------------- failures: one line, no traceback


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            "postgresql://tasklet:s3cret-pw@127.0.0.1:1/nowhere",
            "tasklet:***@127.0.0.1:1/nowhere",
            id="connection-refused",
        ),
        pytest.param(
            "postgresql://tasklet:s3cret-pw@no-such-host.invalid/nowhere",
            "tasklet:***@no-such-host.invalid/nowhere",
            id="unknown-host",
        ),
        pytest.param(
            "mysql://tasklet:s3cret-pw@127.0.0.1/nowhere",
            "mysql://tasklet:***@127.0.0.1/nowhere",
            id="driver-not-installed",
        ),
        pytest.param("tasklet:s3cret-pw@nowhere", "tasklet:***@nowhere", id="not-a-url"),
    ],
)
def test_unusable_database_url_exits_nonzero_naming_it_without_password_or_traceback(
    url: str, shown: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLET_")}

    result = run(tasklet_module("--database-url", url, "migrate"), env, tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("tasklet: ")
    assert shown in result.stderr
    assert "s3cret-pw" not in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_missing_sqlite_directory_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no-such-dir' / 'tasklet.db'}"
    env = {**os.environ, "TASKLET_DATABASE_URL": url}

    result = run(tasklet_module("migrate"), env, tmp_path)

    assert result.returncode == 1
    assert f"cannot reach the database at {url}" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_revision_exits_nonzero_without_traceback(backend: Backend, tmp_path: Path) -> None:
    result = run(tasklet_module("migrate", "no-such-revision"), backend.env, tmp_path)

    assert result.returncode == 1
    assert result.stderr == "tasklet: Can't locate revision identified by 'no-such-revision'\n"


# ------------------------------------------------------------- an installed wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a new virtualenv, outside this tree, where only the wheel is installed."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    built = run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(root / "dist"), str(REPO)],
        env,
        root,
        timeout=180,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (root / "dist").glob("tasklet-*.whl")
    venv = root / "venv"
    created = run([sys.executable, "-m", "venv", str(venv)], env, root)
    assert created.returncode == 0, created.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    installed = run([*pip, f"{wheel}[postgres]"], env, root, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv / "bin"


def outside_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_installed_wheel_carries_the_migrations_and_py_typed(
    installed: Path, tmp_path: Path
) -> None:
    code = (
        "import pathlib, tasklet, tasklet.migrations as m;"
        "print(pathlib.Path(tasklet.__file__).parent); print(m.script_location())"
    )
    result = run([str(installed / "python"), "-c", code], outside_env(dict(os.environ)), tmp_path)

    assert result.returncode == 0, result.stderr
    package, migrations = map(Path, result.stdout.split())
    assert package.is_relative_to(installed.parent)
    assert migrations == package / "_alembic"
    assert (package / "_alembic" / "env.py").is_file()
    assert [p.name for p in (package / "_alembic" / "versions").glob(f"{HEAD}_*.py")]
    assert (package / "py.typed").is_file()


def test_installed_console_script_migrates_an_empty_database(
    installed: Path, empty_backend: Backend, tmp_path: Path
) -> None:
    if empty_backend.schema is None:  # an existing, empty file
        database = make_url(empty_backend.url).database
        assert database is not None
        Path(database).touch()
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    result = run([str(installed / "tasklet"), "migrate"], outside_env(empty_backend.env), cwd)

    assert result.returncode == 0, result.stderr
    assert empty_backend.table_names() == TASKLET_TABLES | {VERSION_TABLE}
    assert list(cwd.iterdir()) == []


# ------------------------------------------------------------- worker commands

PROJECT_JOBS = """
from tasklet import job

@job(name="project.greet", queue="email")
def greet(name: str) -> str:
    return f"hello {name}"
"""


def project(tmp_path: Path, backend: Backend) -> tuple[Path, dict[str, str]]:
    """A user's project: a jobs module named in pyproject.toml, and nothing else."""
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "project_jobs.py").write_text(PROJECT_JOBS)
    (directory / "pyproject.toml").write_text('[tool.tasklet]\nimports = ["project_jobs"]\n')
    env = {k: v for k, v in backend.env.items() if k != "TASKLET_IMPORTS"}
    return directory, env


def test_workoff_finds_jobs_through_pyproject_and_runs_them(
    backend: Backend, tmp_path: Path
) -> None:
    directory, env = project(tmp_path, backend)
    sys.path.insert(0, str(directory))
    try:
        import project_jobs  # type: ignore[import-not-found]

        handle = project_jobs.greet.defer(name="Ada")
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("project_jobs", None)

    result = run([str(BIN / "tasklet"), "workoff", "-q", "email"], env, directory)

    assert result.returncode == 0, result.stderr
    assert f"job {handle.id} project.greet attempt 1 succeeded" in result.stderr
    import tasklet

    runs = tasklet.get_runs(handle.id)
    assert [(r.outcome, r.result) for r in runs] == [("succeeded", "hello Ada")]


def test_worker_names_a_module_that_does_not_import(backend: Backend, tmp_path: Path) -> None:
    result = run(tasklet_module("workoff", "--import", "no_such_module"), backend.env, tmp_path)

    assert result.returncode == 1
    assert "cannot import job module 'no_such_module'" in result.stderr
    assert "Traceback" not in result.stderr


def test_clear_deletes_queued_jobs_with_yes(backend: Backend, tmp_path: Path) -> None:
    from tasklet import get_job, job

    @job(name="cli.clear_me", queue="bulk")
    def clear_me() -> None: ...

    doomed = clear_me.defer()
    kept = clear_me.options(queue="other").defer()

    result = run(tasklet_module("clear", "-q", "bulk", "--yes"), backend.env, tmp_path)

    assert result.returncode == 0, result.stderr
    assert "deleted 1 queued jobs" in result.stdout
    assert get_job(doomed.id) is None and get_job(kept.id) is not None


def test_clear_refuses_without_confirmation(backend: Backend, tmp_path: Path) -> None:
    from tasklet import get_job, job

    @job(name="cli.keep_me")
    def keep_me() -> None: ...

    handle = keep_me.defer()
    result = run(tasklet_module("clear"), backend.env, tmp_path)

    assert result.returncode == 1
    assert "--yes" in result.stderr
    assert get_job(handle.id) is not None
