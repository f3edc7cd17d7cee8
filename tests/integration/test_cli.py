"""The `worklist` command as an operator runs it: a real process against the test database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKLIST = str(Path(sys.executable).with_name("worklist"))


@pytest.fixture
def run(database_url, tmp_path):  # type: ignore[no-untyped-def]
    env = {
        **os.environ,
        "WORKLIST_DATABASE_URL": database_url,
        "WORKLIST_INSTANCE_PATH": str(tmp_path),
    }

    def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [WORKLIST, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60
        )

    return _run


def test_an_operator_adds_a_trust_a_radiologist_and_a_token_then_uses_the_api(run, app) -> None:
    added = run(
        "trust",
        "add",
        "--code",
        "RW6",
        "--name",
        "Pennine Acute",
        "--sending-facility",
        "RW6",
        "--sending-application",
        "CRIS",
        "--ris-host",
        "10.1.2.3",
        "--ris-port",
        "6661",
    )
    assert added.returncode == 0, added.stderr
    assert "added trust RW6" in added.stdout
    listed = run("trust", "list")
    assert (
        "RW6" in listed.stdout and "CRIS/RW6" in listed.stdout and "10.1.2.3:6661" in listed.stdout
    )

    user = run(
        "user",
        "add",
        "asingh",
        "--role",
        "radiologist",
        "--password-stdin",
        "--trust",
        "RW6",
        "--credential",
        "CT",
        "--credential",
        "MR:NEURO",
        "--on-duty",
        stdin="correct horse\n",
    )
    assert user.returncode == 0, user.stderr
    token = run("token", "create", "asingh")
    assert token.returncode == 0 and token.stdout.startswith("wl_")

    me = app.test_client().get(
        "/api/v1/me", headers={"Authorization": f"Bearer {token.stdout.strip()}"}
    )
    assert me.status_code == 200
    assert me.json["trusts"] == ["RW6"] and me.json["credentials"] == ["CT", "MR:NEURO"]


def test_every_command_has_help(run) -> None:
    for command in (
        ["serve"],
        ["web"],
        ["hl7-listen"],
        ["scheduler"],
        ["db", "upgrade"],
        ["demo"],
        ["trust", "add"],
        ["trust", "list"],
        ["user", "add"],
        ["token", "create"],
    ):
        result = run(*command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "usage: worklist" in result.stdout


def test_bad_arguments_give_a_sentence_and_exit_code_2(run) -> None:
    result = run("user", "add", "bob", "--role", "wizard")
    assert result.returncode == 2
    assert "invalid choice: 'wizard'" in result.stderr
    result = run("serve", "--port", "99999")
    assert result.returncode == 2 and "out of range" in result.stderr


def test_a_request_that_cannot_be_done_exits_1_and_says_why(run) -> None:
    result = run("user", "add", "bob", "--role", "radiologist", "--trust", "XYZ")
    assert result.returncode == 1
    assert "no trust with code 'XYZ'" in result.stderr
    result = run("token", "create", "nobody")
    assert result.returncode == 1 and "no user 'nobody'" in result.stderr
    result = run("user", "add", "bob", "--role", "radiologist", "--credential", "C T!")
    assert result.returncode == 1 and "MODALITY[:BODY_AREA]" in result.stderr


def test_a_short_password_is_refused(run) -> None:
    result = run("user", "add", "bob", "--role", "admin", "--password-stdin", stdin="short\n")
    assert result.returncode == 1 and "at least 8 characters" in result.stderr


def test_a_configuration_error_exits_3(run, monkeypatch) -> None:
    monkeypatch.setenv("WORKLIST_ENV", "production")
    monkeypatch.delenv("WORKLIST_SECRET_KEY", raising=False)
    result = subprocess.run([WORKLIST, "trust", "list"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and "WORKLIST_SECRET_KEY must be set" in result.stderr


def test_db_upgrade_reports_the_revision(run) -> None:
    result = run("db", "upgrade")
    assert result.returncode == 0 and "database at revision" in result.stdout
    assert run("db", "current").returncode == 0
