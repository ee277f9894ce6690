"""The ``start``, ``stop``, ``restart`` and ``supervise`` commands (see tasklet.supervisor)."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import _config
from .errors import TaskletError
from .retention import format_duration
from .supervisor import StateDir, Supervisor, format_spec, parse_spec

#: How long ``start`` waits for the supervisor to take its lock before giving up.
START_TIMEOUT_S = 30.0


def worker_options(args: argparse.Namespace) -> list[str]:
    """The worker options of this command line, as each worker process is to get them."""
    options = [
        f"--concurrency={args.concurrency}",
        f"--grace={args.grace}",
        f"--poll={args.poll}",
        f"--heartbeat={args.heartbeat}",
        f"--lost-after={args.lost_after}",
        f"--sweep={args.sweep}",
    ]
    for status in ("succeeded", "failed", "cancelled"):
        options.append(f"--keep-{status}={format_duration(getattr(args, f'keep_{status}'))}")
    every = args.prune_every
    options.append(f"--prune-every={'never' if every is None else format_duration(every)}")
    if not args.schedules:
        options.append("--no-schedules")
    if args.log_level is not None:
        options.append(f"--log-level={args.log_level}")
    if args.metrics_port is not None:
        raise TaskletError(
            "--metrics-port would make every worker process bind the same port: run "
            "`tasklet worker --metrics-port N` per process, or one process per port"
        )
    return options + [f"--import={module}" for module in args.imports]


def process_alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _grace(options: list[str]) -> float:
    for option in options:
        if option.startswith("--grace="):
            return float(option.partition("=")[2])
    return 30.0


def _database_env() -> dict[str, str]:
    """The environment with this command's database, so workers use the same one."""
    settings = _config.settings()
    env = {**os.environ, _config.URL_ENV: settings.resolved_url()}
    schema = settings.resolved_schema()
    if schema is not None:
        env[_config.SCHEMA_ENV] = schema
    return env


def _checked(args: argparse.Namespace) -> tuple[StateDir, str, list[str]]:
    if args.queues:
        raise TaskletError("the queues come from -n QUEUE:COUNT,..., not from -q")
    if args.workers is None:
        raise TaskletError("say which workers to run: -n QUEUE:COUNT[,QUEUE:COUNT...]")
    return (
        StateDir(Path(args.state_dir)),
        format_spec(parse_spec(args.workers)),
        worker_options(args),
    )


def _launch(state: StateDir, spec: str, options: list[str]) -> int:
    running = state.running_pid()
    if running is not None:
        raise TaskletError(
            f"a supervisor already runs in {state.path} (pid {running}): "
            "`tasklet stop` or `tasklet restart` it, or pass another --state-dir"
        )
    state.path.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "tasklet", "supervise", f"--state-dir={state.path}"]
    with open(state.logfile, "ab") as output:
        process = subprocess.Popen(
            [*command, f"--workers={spec}", *options],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_database_env(),
            start_new_session=True,  # detached: no terminal signal reaches it
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while state.running_pid() != process.pid:
        code = process.poll()
        if code is not None:
            tail = state.logfile.read_text(errors="replace").splitlines()[-5:]
            raise TaskletError(
                f"the supervisor exited at once (code {code}); the end of {state.logfile}: "
                + " | ".join(tail)
            )
        if time.monotonic() > deadline:
            raise TaskletError(
                f"the supervisor did not start in {START_TIMEOUT_S:g}s: see {state.logfile}"
            )
        time.sleep(0.05)
    count = sum(n for _, n in parse_spec(spec))
    print(
        f"tasklet: started {count} workers ({spec}) under supervisor pid {process.pid}; "
        f"log: {state.logfile}"
    )
    return 0


def start(args: argparse.Namespace) -> int:
    state, spec, options = _checked(args)
    return _launch(state, spec, options)


def supervise(args: argparse.Namespace) -> int:
    state, spec, options = _checked(args)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    record = {
        "pid": os.getpid(),
        "spec": spec,
        "worker_options": options,
        "cwd": str(Path.cwd()),
        "started_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    with state.hold(record):
        return Supervisor(parse_spec(spec), options, grace_s=args.grace, env=_database_env()).run()


def _stop(state: StateDir, spec: str | None) -> bool:
    """Stop the supervisor of ``state``; False if none ran."""
    pid = state.running_pid()
    if pid is None:
        return False
    record = state.read_record()
    if spec is not None and record.get("spec") not in (None, format_spec(parse_spec(spec))):
        raise TaskletError(
            f"the supervisor in {state.path} runs {record['spec']}, not {spec}: "
            "run `tasklet stop` without -n to stop it"
        )
    os.kill(pid, signal.SIGTERM)
    timeout = _grace(record.get("worker_options", [])) + 20.0
    deadline = time.monotonic() + timeout
    while state.running_pid() is not None or process_alive(pid):
        if time.monotonic() > deadline:
            raise TaskletError(
                f"supervisor pid {pid} is still stopping after {timeout:g}s; see {state.logfile}"
            )
        time.sleep(0.05)
    print(f"tasklet: stopped supervisor pid {pid} and its workers")
    return True


def stop(args: argparse.Namespace) -> int:
    state = StateDir(Path(args.state_dir))
    if not _stop(state, args.workers):
        print(f"tasklet: no supervisor runs in {state.path}: nothing to stop")
    return 0


def restart(args: argparse.Namespace) -> int:
    """Stop, then start: with this command line's workers, or else those that ran."""
    state = StateDir(Path(args.state_dir))
    if args.workers is None:
        record = state.read_record()
        if not record:
            raise TaskletError(
                f"no supervisor runs in {state.path}: say which workers to start with -n"
            )
        spec, options = str(record["spec"]), list(record["worker_options"])
    else:
        _, spec, options = _checked(args)
    _stop(state, None)
    return _launch(state, spec, options)
