"""The README's promise: `worklist serve --demo` gives a populated worklist; gunicorn
serves wsgi:app."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

WORKLIST = str(Path(sys.executable).with_name("worklist"))
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _token(username: str, env: dict[str, str]) -> str:
    """A bearer token made by the real console script (`worklist token create`)."""
    made = subprocess.run(
        [WORKLIST, "token", "create", username], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    return made.stdout.strip()


def _wait_for(url: str, deadline: float, process: subprocess.Popen) -> None:
    while time.monotonic() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:  # refused, reset, or (a loaded machine) no answer within 2 s
            time.sleep(0.2)
    output = process.stdout.read() if process.poll() is not None and process.stdout else ""
    raise AssertionError(f"{url} did not answer in time (exit code {process.poll()}): {output}")


@pytest.fixture
def env(database_url, tmp_path):  # type: ignore[no-untyped-def]
    return {
        **os.environ,
        "WORKLIST_DATABASE_URL": database_url,
        "WORKLIST_INSTANCE_PATH": str(tmp_path),
    }


def test_serve_with_demo_data_shows_a_populated_regional_worklist(env) -> None:
    port, hl7_port = _free_port(), _free_port()
    process = subprocess.Popen(
        [WORKLIST, "serve", "--demo", "--port", str(port), "--hl7-port", str(hl7_port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/healthz", time.monotonic() + 60, process)
        assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        token = _token("manager", env)
        status, body = _get(f"http://127.0.0.1:{port}/api/v1/studies?status=ready&limit=5", token)
        assert status == 200
        assert body["total"] > 100 and len(body["studies"]) == 5
        # The simulated RIS systems send orders over MLLP, and the listener applies them.
        admin = _token("admin", env)
        deadline, applied = time.monotonic() + 30, []
        while time.monotonic() < deadline and not applied:
            time.sleep(1)
            _, log = _get(f"http://127.0.0.1:{port}/api/v1/messages?state=applied", admin)
            applied = log["messages"]
        assert applied, "no order from the simulated RIS was applied"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert re.search(r"demo: loaded 8 trusts, 12 radiologists", output), output


def test_the_web_app_runs_under_gunicorn(env) -> None:
    subprocess.run(
        [WORKLIST, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=60
    )
    port = _free_port()
    process = subprocess.Popen(
        [WORKLIST, "web", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/healthz", time.monotonic() + 60, process)
        statuses = {_get(f"http://127.0.0.1:{port}/readyz")[0] for _ in range(6)}
        assert statuses == {200}
        assert _get(f"http://127.0.0.1:{port}/api/v1/me")[0] == 401
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "Booting worker" in output, output
