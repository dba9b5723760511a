"""Logs people can read: no carriage-return frames off a terminal, one format with the process
and policy version, JSON for shippers, no Alembic chatter. Each case runs in a child process, as
the real ones do, with stderr going to a file (not a TTY)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _run(code: str, log: Path, **env: str) -> str:
    with log.open("wb") as out:
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=out, stderr=out,
                       env={**os.environ, **env}, timeout=240, check=True)
    return log.read_text()


def test_progress_bar_in_a_log_is_lines_without_carriage_returns(tmp_path: Path) -> None:
    code = """
import time
from flywheel import hf_progress, logs
logs.configure("info", "text", "worker")
logs.set_policy("policy-3")
hf_progress.LOG_INTERVAL_S = 0.25
for _ in hf_progress.tqdm(range(40), desc="ppo", leave=False):
    time.sleep(0.025)
for _ in range(50):  # a cycle's many short bars: too short to show progress, silent
    bar = hf_progress.tqdm(total=7, desc="reward")
    bar.update(7)
    bar.close()
"""
    text = _run(code, tmp_path / "progress.log")
    assert "\r" not in text
    lines = [line for line in text.splitlines() if "flywheel.progress" in line]
    assert 2 <= len(lines) <= 5, text  # one a quarter second at most, not one a step
    assert all(" INFO worker[policy-3] flywheel.progress: " in line for line in lines)
    assert "ppo: 40/40 (100%)" in lines[-1] and "it/s" in lines[-1]
    assert "<" in lines[0]  # elapsed<remaining, the ETA
    assert not any("reward" in line for line in lines)


@pytest.mark.slow
def test_demo_model_build_log_has_no_carriage_returns(tmp_path: Path) -> None:
    """The real thing: the demo model's training bar and transformers' save bars, to a file."""
    code = ("import sys; from flywheel import hf_progress; from flywheel.cli import main; "
            "hf_progress.LOG_INTERVAL_S = 0.5; "  # the tiny build is over in seconds
            f"sys.exit(main(['demo-model', '--out', {str(tmp_path / 'model')!r}, "
            "'--preset', 'tiny']))")
    text = _run(code, tmp_path / "build.log")
    assert "\r" not in text
    assert "demo-model[-] flywheel.progress: demo model:" in text
    assert "Writing model shards" not in text  # transformers' own bar: terminals only


def test_json_lines_carry_process_and_policy(tmp_path: Path) -> None:
    code = """
import logging
from flywheel import logs
logs.configure("info", "json", "server:8001")
logs.set_policy(lambda: "policy-2+policy-3")
logging.getLogger("server.hotswap").warning("swapped %s", "policy-2")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("x").exception("boom")
"""
    lines = [json.loads(line) for line in _run(code, tmp_path / "json.log").splitlines()]
    assert lines[0]["process"] == "server:8001" and lines[0]["policy"] == "policy-2+policy-3"
    assert lines[0]["level"] == "WARNING" and lines[0]["logger"] == "server.hotswap"
    assert lines[0]["message"] == "swapped policy-2" and lines[0]["ts"].endswith("Z")
    assert "ZeroDivisionError" in lines[1]["exc"]


def test_migrations_log_without_alembic_chatter(tmp_path: Path) -> None:
    code = f"""
from flywheel import logs
from feedback_store.migrate import upgrade
logs.configure("info", "text", "db")
upgrade("sqlite:///{tmp_path / 'f.db'}")
upgrade("sqlite:///{tmp_path / 'f.db'}")
"""
    text = _run(code, tmp_path / "db.log")
    assert "Running upgrade" in text
    for chatter in ("setup plugin", "Context impl", "Will assume"):
        assert chatter not in text, text
    # One line per migration: a docstring's later lines would come unprefixed.
    assert all(" INFO db[-] alembic.runtime.migration: Running upgrade" in line
               for line in text.splitlines()), text


def test_access_lines_leave_out_query_strings(tmp_path: Path) -> None:
    """A key sent in a query string is refused, and must not be written down either: uvicorn's
    own access line, at debug level, for a real request."""
    code = """
import threading, time, urllib.request
import uvicorn
from flywheel import logs
logs.configure("debug", "text", "server:8002")

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 401, "headers": []})
    await send({"type": "http.response.body", "body": b""})

server = uvicorn.Server(uvicorn.Config(app, port=0, log_config=None, access_log=True,
                                       log_level="debug", lifespan="off"))
thread = threading.Thread(target=server.run)
thread.start()
while not server.started:
    time.sleep(0.01)
port = server.servers[0].sockets[0].getsockname()[1]
try:
    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/policies?api_key=sekrit-admin-key")
except Exception:
    pass
server.should_exit = True
thread.join()
"""
    log = _run(code, tmp_path / "access.log")
    assert "GET /v1/policies HTTP/1.1" in log and "401" in log
    assert "sekrit" not in log
