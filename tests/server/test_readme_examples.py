"""The README's API examples, run as written against a live `flywheel serve` (the tiny real
model): every curl answers 2xx, and the `openai` SDK example prints what it says it prints.

Only the address changes (localhost:8000 -> the test server's port) and the placeholders the
README elides (`chatcmpl-…`: an answer of this server; `3f2a…`: a fresh Idempotency-Key)."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

README = Path(__file__).parents[2] / "README.md"

pytestmark = pytest.mark.slow


def _blocks(language: str) -> list[str]:
    """The README's code blocks in `language` within "The API by example"."""
    text = README.read_text()
    section = text.split("## The API by example", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def _on(url: str, code: str, completion_id: str) -> str:
    address = url.removeprefix("http://").replace("127.0.0.1", "localhost")
    return (code.replace("http://localhost:8000", url).replace("localhost:8000", address)
            .replace("chatcmpl-…", completion_id).replace("3f2a…", str(uuid.uuid4())))


def _an_answer(url: str) -> str:
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "flywheel", "messages": [{"role": "user", "content": "Hello?"}], "n": 3,
        "max_tokens": 8, "user": "alice"})
    response.raise_for_status()
    return str(response.json()["id"])


def test_the_curl_examples_answer_2xx(live_server: str, tmp_path: Path) -> None:
    [block] = [b for b in _blocks("bash") if "curl" in b]
    # Each curl also prints its status on a line of its own.
    script = ('curl() { command curl -w "\\nstatus %{http_code}\\n" "$@"; }\n'
              + _on(live_server, block, _an_answer(live_server)))
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    statuses = re.findall(r"^status (\d+)$", run.stdout, flags=re.M)
    assert len(statuses) == block.count("curl "), run.stdout
    assert all(s.startswith("2") for s in statuses), run.stdout


def test_the_sdk_example_prints_what_it_says(live_server: str, tmp_path: Path) -> None:
    [block] = _blocks("python")
    run = subprocess.run([sys.executable, "-c", _on(live_server, block, "")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    first, *rest = run.stdout.splitlines()
    assert first.startswith("policy-0 [")  # the version, then the two answers
    assert re.fullmatch(r"\[\d+ tokens\]", rest[-1]), run.stdout  # the stream's usage line
    assert "None" not in run.stdout
