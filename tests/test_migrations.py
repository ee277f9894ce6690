"""tasklet's Alembic migrations, on a fresh SQLite file and a fresh Postgres schema.

The migrations must build exactly the tables of :mod:`tasklet.schema`, keep
their history in ``tasklet_alembic_version`` (never the application's
``alembic_version``), and be the same whether run as ``alembic upgrade head``
from a clone or as ``tasklet upgrade()`` / ``tasklet migrate``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, make_url

import tasklet
from tasklet import _config, job
from tasklet.migrations import _PG_LOCK_KEY, script_location, tasklet_objects_only
from tasklet.schema import TABLE_NAMES, VERSION_TABLE, metadata
from tests.conftest import POSTGRES_URL
from tests.support import Backend

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HEAD = ScriptDirectory(str(script_location())).get_current_head()
TASKLET_TABLES = set(TABLE_NAMES)


def version_rows(backend: Backend, table: str = VERSION_TABLE) -> list[str]:
    with backend.connect() as conn:
        return list(conn.execute(sa.text(f"SELECT version_num FROM {table}")).scalars())


def run(args: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def differences(backend: Backend, target: sa.MetaData) -> list[Any]:
    with backend.connect() as conn:
        if backend.schema is not None:  # reflection must look at the test's schema
            assert conn.exec_driver_sql("SELECT current_schema()").scalar() == backend.schema
        context = MigrationContext.configure(
            conn, opts={"include_object": tasklet_objects_only, "compare_type": True}
        )
        return list(compare_metadata(context, target))


# ------------------------------------------------------------- the schema itself


def test_migrated_database_matches_schema_metadata_exactly(backend: Backend) -> None:
    assert differences(backend, metadata) == []


def test_schema_comparison_reports_a_column_the_migrations_lack(backend: Backend) -> None:
    wrong = sa.MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.tables.values():
        table.to_metadata(wrong)
    sa.Table("workers", wrong, sa.Column("extra", sa.Integer()), extend_existing=True)

    diff = differences(backend, wrong)

    assert [(op[0], op[2], op[3].name) for op in diff] == [("add_column", "workers", "extra")]


def _describe(conn: Connection) -> dict[str, dict[str, Any]]:
    """What compare_metadata ignores: check constraints, index predicates, FK actions, defaults."""
    inspector = sa.inspect(conn)
    described = {}
    for name in sorted(TABLE_NAMES):
        described[name] = {
            "columns": [
                (c["name"], repr(c["type"]), c["nullable"], c.get("default"))
                for c in inspector.get_columns(name)
            ],
            "primary_key": inspector.get_pk_constraint(name),
            "foreign_keys": inspector.get_foreign_keys(name),
            "checks": sorted(
                (c["name"], c["sqltext"]) for c in inspector.get_check_constraints(name)
            ),
            "indexes": sorted(
                (
                    i["name"],
                    i["column_names"],
                    bool(i["unique"]),
                    {k: str(v) for k, v in i.get("dialect_options", {}).items()},
                )
                for i in inspector.get_indexes(name)
            ),
            "uniques": inspector.get_unique_constraints(name),
        }
    return described


@pytest.fixture
def created_by_metadata(empty_backend: Backend, tmp_path: Path) -> Iterator[Backend]:
    """A second database of the same kind where ``metadata.create_all`` made the tables."""
    if empty_backend.schema is None:
        other = Backend("sqlite", f"sqlite:///{tmp_path / 'create_all.db'}", None)
    else:
        other = Backend("postgres", POSTGRES_URL, f"t_{uuid.uuid4().hex[:12]}")
    engine = sa.create_engine(other.url)
    try:
        with engine.begin() as conn:
            if other.schema is not None:
                conn.exec_driver_sql(f'CREATE SCHEMA "{other.schema}"')
                conn.exec_driver_sql(f'SET LOCAL search_path TO "{other.schema}"')
            metadata.create_all(conn)
        yield other
    finally:
        if other.schema is not None:
            with engine.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{other.schema}" CASCADE')
        engine.dispose()


def test_migrations_build_the_same_constraints_and_indexes_as_create_all(
    empty_backend: Backend, created_by_metadata: Backend
) -> None:
    tasklet.upgrade()

    with empty_backend.connect() as migrated, created_by_metadata.connect() as created:
        described = _describe(migrated)
        assert described == _describe(created)
    assert any(checks for checks in (t["checks"] for t in described.values()))
    assert all(i[3] for i in described["jobs"]["indexes"])  # both are partial indexes


# ------------------------------------------------------------- up and down


def test_downgrade_to_base_removes_jobs_job_runs_and_workers(backend: Backend) -> None:
    assert backend.table_names() >= TASKLET_TABLES

    tasklet.downgrade("base")

    assert not TASKLET_TABLES & backend.table_names()
    assert version_rows(backend) == []


def test_upgrade_after_downgrade_recreates_tables_that_accept_jobs(backend: Backend) -> None:
    tasklet.downgrade("base")

    tasklet.upgrade()

    @job(name="migrations.recreated")
    def recreated(n: int) -> None: ...

    handle = recreated.defer(n=1)
    with backend.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, name, status FROM jobs")).all()
    assert [tuple(r) for r in rows] == [(handle.id, "migrations.recreated", "queued")]


def test_deferring_after_downgrade_says_to_run_tasklet_migrate(backend: Backend) -> None:
    tasklet.downgrade("base")

    @job(name="migrations.too_early")
    def too_early() -> None: ...

    with pytest.raises(tasklet.SchemaMissingError, match="tasklet migrate"):
        too_early.defer()


# ------------------------------------------------------------- version table


def test_progress_is_recorded_in_tasklet_alembic_version_not_alembic_version(
    backend: Backend,
) -> None:
    assert version_rows(backend) == [HEAD]
    assert "alembic_version" not in backend.table_names()


def test_application_alembic_version_is_untouched_by_tasklet_migrations(
    empty_backend: Backend,
) -> None:
    with empty_backend.connect() as conn:
        if empty_backend.schema is not None:  # the application's table beside tasklet's
            conn.exec_driver_sql(f'CREATE SCHEMA "{empty_backend.schema}"')
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('app_0042')")
        conn.commit()

    tasklet.upgrade()
    tasklet.downgrade("base")
    tasklet.upgrade()

    assert version_rows(empty_backend, "alembic_version") == ["app_0042"]
    assert version_rows(empty_backend) == [HEAD]


# ------------------------------------------------------------- alembic CLI from a clone


def alembic(backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    return run([str(BIN / "alembic"), *args], backend.env)


def tasklet_migrate(backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "tasklet", "migrate", *args], backend.env)


@pytest.mark.slow
def test_tasklet_migrate_after_alembic_upgrade_head_has_nothing_to_do(
    empty_backend: Backend,
) -> None:
    upgraded = alembic(empty_backend, "upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr

    @job(name="migrations.kept")
    def kept() -> None: ...

    handle = kept.defer()

    migrated = tasklet_migrate(empty_backend)

    assert migrated.returncode == 0, migrated.stderr
    assert f"already at {HEAD} (head): nothing to do" in migrated.stdout
    assert version_rows(empty_backend) == [HEAD]
    with empty_backend.connect() as conn:
        assert conn.execute(sa.text("SELECT id FROM jobs")).scalars().all() == [handle.id]


@pytest.mark.slow
def test_alembic_current_shows_head_after_tasklet_migrate(empty_backend: Backend) -> None:
    migrated = tasklet_migrate(empty_backend)
    assert migrated.returncode == 0, migrated.stderr

    current = alembic(empty_backend, "current")

    assert current.returncode == 0, current.stderr
    assert current.stdout.split() == [str(HEAD), "(head)"]


@pytest.mark.slow
def test_alembic_check_from_a_clone_finds_nothing_left_to_migrate(backend: Backend) -> None:
    checked = alembic(backend, "check")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "No new upgrade operations detected" in checked.stdout


@pytest.mark.slow
def test_offline_sql_targets_the_schema_and_touches_no_database(empty_backend: Backend) -> None:
    offline = alembic(empty_backend, "upgrade", "head", "--sql")
    assert offline.returncode == 0, offline.stderr
    assert "CREATE TABLE jobs" in offline.stdout
    if empty_backend.schema is None:
        path = make_url(empty_backend.url).database
        assert path is not None
        assert not Path(path).exists()
        with contextlib.closing(sqlite3.connect(path)) as raw:
            raw.executescript(offline.stdout)
    else:
        assert f'SET LOCAL search_path TO "{empty_backend.schema}"' in offline.stdout
        assert empty_backend.schema not in _schemas()
        import psycopg

        conninfo = make_url(POSTGRES_URL).set(drivername="postgresql")
        with psycopg.connect(conninfo.render_as_string(), autocommit=True) as raw:
            raw.execute(offline.stdout.encode())

    # The script, applied by hand, builds what tasklet migrate would have built.
    assert TASKLET_TABLES | {VERSION_TABLE} == empty_backend.table_names()
    assert differences(empty_backend, metadata) == []


def _schemas() -> set[str]:
    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_schema_names())
    finally:
        engine.dispose()


def test_alembic_ini_of_the_clone_loads_without_deprecation_warnings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # from_config prepends the clone
    config = Config(str(REPO / "alembic.ini"))

    script = ScriptDirectory.from_config(config)  # warnings are errors in this suite

    assert Path(script.dir) == REPO / "alembic"
    assert str(REPO) in sys.path


# ------------------------------------------------------------- concurrency


@pytest.mark.slow
@pytest.mark.postgres
def test_concurrent_migrators_both_succeed_and_migrate_once(fresh_schema: str) -> None:
    app = f"tasklet-test-{fresh_schema}"
    backend = Backend("postgres", f"{POSTGRES_URL}?application_name={app}", fresh_schema)
    command = [sys.executable, "-m", "tasklet", "migrate"]
    engine = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    procs: list[subprocess.Popen[str]] = []
    try:
        with engine.connect() as holder, engine.connect() as observer:
            # Hold the migrators' lock so both start and queue on it, then let them race.
            holder.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            procs = [
                subprocess.Popen(
                    command, env=backend.env, cwd=REPO, stdout=subprocess.PIPE, text=True
                )
                for _ in range(2)
            ]
            both_waiting = _wait_for_waiters(observer, app, procs, count=2)
            holder.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        engine.dispose()

    assert both_waiting, "the two migrators never ran at the same time"
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert sorted("nothing to do" in out for out in outputs) == [False, True], outputs
    plain = Backend("postgres", POSTGRES_URL, fresh_schema)
    assert version_rows(plain) == [HEAD]
    assert plain.table_names() >= TASKLET_TABLES


def _wait_for_waiters(
    observer: Connection, app: str, procs: list[subprocess.Popen[str]], count: int
) -> bool:
    """True once ``count`` of our migrators wait on an advisory lock; False if one exits first."""
    query = sa.text(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = :app"
    )
    while all(proc.poll() is None for proc in procs):
        if observer.execute(query, {"app": app}).scalar_one() >= count:
            return True
        # pg_locks offers no way to block until a waiter appears: poll it.
        observer.execute(sa.text("SELECT pg_sleep(0.02)"))
    return False


# ------------------------------------------------------------- living beside an application


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """The hook the README gives applications: autogenerate leaves tasklet's tables alone."""
    return not (type_ == "table" and name in TABLE_NAMES | {VERSION_TABLE})


def _application_diff(backend: Backend, hook: Any) -> list[tuple[str, str]]:
    app = sa.MetaData()
    sa.Table("users", app, sa.Column("id", sa.Integer(), primary_key=True))
    sa.Table("orders", app, sa.Column("id", sa.Integer(), primary_key=True))
    with backend.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE users (id INTEGER NOT NULL PRIMARY KEY)")
        conn.commit()
        opts = {} if hook is None else {"include_object": hook}
        context = MigrationContext.configure(conn, opts=opts)
        diff = compare_metadata(context, app)
    assert all(isinstance(op, tuple) for op in diff), diff  # no column changes to users
    return sorted((op[0], op[1].name) for op in diff)


def test_application_autogenerate_with_the_readme_hook_leaves_tasklet_tables_alone(
    backend: Backend,
) -> None:
    assert _application_diff(backend, include_object) == [("add_table", "orders")]


def test_application_autogenerate_without_a_hook_would_drop_tasklet_tables(
    backend: Backend,
) -> None:
    dropped = {name for kind, name in _application_diff(backend, None) if kind == "remove_table"}

    assert dropped == TASKLET_TABLES | {VERSION_TABLE}


APP_ENV = """
import sqlalchemy as sa
from alembic import context

import tasklet
from tasklet.schema import TABLE_NAMES, VERSION_TABLE

target_metadata = sa.MetaData()
sa.Table("users", target_metadata, sa.Column("id", sa.Integer(), primary_key=True))


def include_object(obj, name, type_, reflected, compare_to):
    return not (type_ == "table" and name in TABLE_NAMES | {VERSION_TABLE})


tasklet.upgrade()  # tasklet's tables, in a transaction of its own, before the app's
engine = sa.create_engine(context.config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    schema = context.config.get_main_option("schema")
    if schema:
        connection.exec_driver_sql(f'SET search_path TO "{schema}"')
        connection.commit()
    context.configure(
        connection=connection, target_metadata=target_metadata, include_object=include_object
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

APP_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "app_0001"
down_revision = None


def upgrade():
    op.create_table("users", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade():
    op.drop_table("users")
"""


def test_application_env_py_can_run_tasklet_upgrade_before_its_own_migrations(
    empty_backend: Backend, tmp_path: Path
) -> None:
    scripts = tmp_path / "app_migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(APP_ENV)
    (scripts / "versions" / "app_0001.py").write_text(APP_REVISION)
    config = Config()
    config.set_main_option("script_location", str(scripts))
    config.set_main_option("sqlalchemy.url", empty_backend.url)
    config.set_main_option("schema", empty_backend.schema or "")

    command.upgrade(config, "head")
    command.check(config)  # autogenerate, with the README's hook, proposes nothing

    assert version_rows(empty_backend, "alembic_version") == ["app_0001"]
    assert version_rows(empty_backend) == [HEAD]
    assert empty_backend.table_names() >= TASKLET_TABLES | {"users"}


# ------------------------------------------------ 0005: SQLite's CHECKs, edited in place

_JOB = (
    "INSERT INTO jobs (name, queue, priority, status, serializer, args, attempts, max_attempts,"
    " lost_count, run_at, created_at, lease) VALUES ('x', 'q', 0, 'queued', 'json', '{}', 0, 1,"
    " 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 0)"
)


def test_migrating_sqlite_rewrites_the_checks_in_place_keeping_every_row(
    sqlite_only: Backend,
) -> None:
    tasklet.downgrade("0004")
    with sqlite_only.connect() as conn:
        conn.exec_driver_sql(_JOB)
        conn.commit()
        version = conn.exec_driver_sql("PRAGMA schema_version").scalar_one()
    assert "status IN ('queued', 'running'" in sqlite_only.sqlite_create_statement("jobs")

    tasklet.upgrade()

    assert " IN (" not in sqlite_only.sqlite_create_statement("jobs")
    with sqlite_only.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM jobs").scalar_one() == 1
        # Bumped, so every open connection reads the new statement again.
        assert conn.exec_driver_sql("PRAGMA schema_version").scalar_one() > version
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar_one() == "ok"


def test_a_sqlite_that_refuses_schema_edits_stays_at_0004_and_says_why(
    sqlite_only: Backend,
) -> None:
    tasklet.downgrade("0004")
    engine = _config.database().engine

    def refuse_schema_edits(action: int, table: str | None, *_: object) -> int:
        denied = action == sqlite3.SQLITE_UPDATE and table == "sqlite_master"
        return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_authorizer(refuse_schema_edits)

    engine.dispose()
    sa.event.listen(engine, "connect", on_connect)
    try:
        with pytest.raises(RuntimeError, match="refused to edit the jobs table's CHECK"):
            tasklet.upgrade()
    finally:
        sa.event.remove(engine, "connect", on_connect)
        engine.dispose()

    assert version_rows(sqlite_only) == ["0004"]
    assert "status IN ('queued', 'running'" in sqlite_only.sqlite_create_statement("jobs")
