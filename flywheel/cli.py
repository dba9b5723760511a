"""The `flywheel` command: up, serve, worker, db upgrade, demo-model."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.settings import Settings, load_settings

if TYPE_CHECKING:
    from flywheel.supervisor import DataDirLock, Supervisor

log = logging.getLogger("flywheel")

PRIVATE_UMASK = 0o077
UP_MIN_NEW_FEEDBACK = "16"  # `flywheel up` trains after a handful of feedback events
UP_CANARY_FRACTION = "0.5"  # under `up`: half the requests while a canary runs
OPENMP_SPINS = "1000"  # GOMP_SPINCOUNT unless the environment sets it (main)


def _configure_logging(settings: Settings, process: str) -> None:
    """Every process logs in one format (flywheel/logs.py), named and with its policy version."""
    from flywheel import logs

    logs.configure(settings.log_level, settings.log_format, process)


def _serving(app: object) -> str | None:
    """The version a server serves (and its canary), for its log lines."""
    engine = getattr(getattr(getattr(app, "state", None), "flywheel", None), "engine", None)
    if engine is None:
        return None
    canary = getattr(engine, "canary_version", None)
    return f"{engine.policy_version}+{canary}" if canary else engine.policy_version


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    if getattr(args, "config", None):
        os.environ["FLYWHEEL_CONFIG"] = str(args.config)
    for name in ("host", "port", "data_dir"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    settings = load_settings(**overrides)
    _make_private(settings.data_dir)
    return settings


def _make_private(folder: Path) -> None:
    """A data folder made before files were private: closed to other users, when it is ours."""
    with contextlib.suppress(OSError):
        if folder.is_dir() and folder.stat().st_uid == os.getuid():
            folder.chmod(folder.stat().st_mode & 0o700)


def cmd_serve(args: argparse.Namespace) -> int:
    """The API server alone (one per replica)."""
    import uvicorn

    from server.app import create_app

    settings = _settings(args)
    _configure_logging(settings, f"server:{settings.port}")
    from server.engines import unavailable

    if missing := unavailable(settings):
        print(f"flywheel serve: {missing}", file=sys.stderr)
        return 2
    app = create_app(settings)
    from flywheel import logs

    logs.set_policy(lambda: _serving(app))
    # No access log line per request unless debugging (/metrics counts requests by route and
    # status); uvicorn already picks httptools and uvloop when installed (uvicorn[standard]).
    from server.slow_clients import header_timeout_protocol

    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.log_level.lower() == "debug", timeout_graceful_shutdown=30,
                http=header_timeout_protocol(settings.header_timeout_s),
                log_config=None)  # uvicorn's lines in our format (flywheel/logs.py)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """The trainer worker alone."""
    from trainer_worker.worker import run_worker

    settings = _settings(args)
    _configure_logging(settings, "worker")
    return run_worker(settings)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from feedback_store.migrate import upgrade

    settings = _settings(args)
    _configure_logging(settings, "db")
    upgrade(settings.database_url)
    log.info("database at head: %s", _redact(settings.database_url))
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from flywheel import logs
    from flywheel.demo_model import build_demo_model

    logs.configure("info", os.environ.get("FLYWHEEL_LOG_FORMAT", "text"), "demo-model")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"{out} already exists and is not empty", file=sys.stderr)
        return 1
    build_demo_model(out, preset=args.preset, seed=args.seed, progress=True)
    print(f"demo model written to {out}")
    return 0


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def cmd_up(args: argparse.Namespace) -> int:
    """Everything on one machine: migrate, demo model, embedded Redis, server and worker."""
    from flywheel.supervisor import DataDirLock, InUseError, check_port_free

    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLYWHEEL_TRAIN__MIN_NEW_FEEDBACK", UP_MIN_NEW_FEEDBACK)
    # Under `up`, users decide what ships: candidates start as canaries, and a version users
    # rate significantly better than the active one is rolled back to.
    os.environ.setdefault("FLYWHEEL_CANARY__AUTO", "true")
    os.environ.setdefault("FLYWHEEL_CANARY__AUTO_ROLLBACK", "true")
    # One machine, a few raters: a canary takes half the requests, each rater sees both arms
    # (canary.unit "auto"), and the within-rater comparison has the most thumbs on both sides.
    os.environ.setdefault("FLYWHEEL_CANARY__FRACTION", UP_CANARY_FRACTION)
    settings = _settings(args, data_dir=data_dir)
    _configure_logging(settings, "up")
    from server.engines import unavailable

    if missing := unavailable(settings):
        print(f"flywheel up: {missing}", file=sys.stderr)
        return 2

    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
        check_port_free(settings.host, settings.port)
    except InUseError as exc:
        lock.release()
        print(f"flywheel up: {exc}", file=sys.stderr)
        return 1
    try:
        return _up(settings, data_dir, lock)
    finally:
        lock.release()


def _up(settings: Settings, data_dir: Path, lock: DataDirLock) -> int:
    """Migrate, build the demo model if needed, then run Redis, the server and the worker."""
    from feedback_store.migrate import upgrade
    from flywheel.embedded_redis import EmbeddedRedis
    from flywheel.supervisor import Supervisor

    upgrade(settings.database_url)
    model_dir = Path(settings.model)
    if not (model_dir / "config.json").exists():
        if os.environ.get("FLYWHEEL_MODEL"):
            print(f"FLYWHEEL_MODEL={model_dir} has no config.json", file=sys.stderr)
            return 1
        from flywheel.demo_model.cache import cached_demo_model

        cached_demo_model(model_dir, progress=True)
        log.info("demo model in %s", model_dir)

    env = dict(os.environ, FLYWHEEL_DATA_DIR=str(data_dir), FLYWHEEL_HOST=settings.host,
               FLYWHEEL_PORT=str(settings.port))
    # The children hold the data dir's lock too: a new `up` waits for the last of them.
    supervisor = Supervisor(env, keep_fds=[lock.fileno()])
    redis_server = None
    try:
        if not settings.redis_url:
            redis_server = EmbeddedRedis(data_dir / "redis")
            redis_server.start()
            env["FLYWHEEL_REDIS_URL"] = redis_server.url
            log.info("embedded Redis at %s", redis_server.url)
        if supervisor.stopping:
            return 0
        supervisor.spawn("server", [sys.executable, "-m", "flywheel.cli", "serve"])
        supervisor.spawn("worker", [sys.executable, "-m", "flywheel.cli", "worker"])
        _announce_when_ready(settings, supervisor)
        # A child that dies is started again, the other left running (and so is the embedded
        # Redis); wait() returns 0 on Ctrl-C/SIGTERM/SIGHUP, non-zero once a child keeps dying
        # right after its start.
        return supervisor.wait(also=[] if redis_server is None else
                               [redis_server.restart_if_exited])
    finally:
        supervisor.stop()
        if redis_server is not None:
            redis_server.stop()  # last: the children may use it until they exit
            log.info("stopped the embedded Redis")


def _announce_when_ready(settings: Settings, supervisor: Supervisor) -> None:
    """Print one line once the server answers /readyz: the API's and the console's URLs."""
    import threading
    import urllib.request

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = f"http://{host}:{settings.port}"

    def watch() -> None:
        while not supervisor.stopping:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            return
        line = (f"Flywheel is ready: chat {base}/, API {base}/v1, console {base}/console "
                "(Ctrl-C stops everything)")
        if settings.log_format == "json":
            log.info("%s", line)  # a log shipper reads JSON lines only
        else:
            print(line, flush=True)

    threading.Thread(target=watch, name="ready-line", daemon=True).start()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run everything on this machine")
    up.add_argument("--host", default=None, help="address to bind (127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="port to bind (8000)")
    up.add_argument("--data-dir", default="./.flywheel", help="where state lives (./.flywheel)")
    up.add_argument("--config", default=None, help="YAML settings file")
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run the API server")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--config", default=None)
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run the trainer worker")
    worker.add_argument("--config", default=None)
    worker.set_defaults(func=cmd_worker)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_sub.add_parser("upgrade", help="alembic upgrade head")
    db_upgrade.add_argument("--config", default=None)
    db_upgrade.set_defaults(func=cmd_db_upgrade)

    demo = sub.add_parser("demo-model", help="build the demo base model")
    demo.add_argument("--out", required=True, help="output directory")
    demo.add_argument("--preset", default="demo", choices=["demo", "tiny"])
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # What Flywheel writes (the database and its WAL, checkpoints, models, logs) is readable by
    # the user running it alone: files 0600, folders 0700.
    os.umask(PRIVATE_UMASK)
    # Torch's OpenMP threads spin while they wait for work (libgomp: 300,000 turns). Beside
    # another job, or a server beside the trainer on two cores, spinning threads take the
    # cores from those with work: the demo model trained 2.4x faster beside a two-thread job
    # with a short spin, as fast alone (docs/benchmarks.md, "The first answer"). Read when
    # torch loads, so set before; every process `flywheel` starts inherits it.
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINS)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
