"""HL7 software we did not write, each in its own environment under /tmp, for tests that prove
our messages are read by others. python-hl7 must never enter .venv: its import name `hl7` would
shadow our own hl7/ package. Tests skip with the reason when a tool cannot be installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

NPM_PACKAGES = ("node-hl7-client@3.2.0", "simple-hl7@3.3.0")
THIRD_PARTY = Path(os.environ.get("WORKLIST_THIRD_PARTY_DIR", "/tmp/worklist-third-party"))

# An MLLP server on python-hl7: prints its port, then one JSON line per message received
# (MSH-10, OBR-25, every OBX-5 unescaped), and acknowledges each with AA.
PYTHON_HL7_SERVER = r"""
import asyncio, json, sys
from hl7.mllp import start_hl7_server

async def process(reader, writer):
    while not writer.is_closing():
        try:
            msg = await reader.readmessage()
        except asyncio.IncompleteReadError:
            break
        print(json.dumps({"control": str(msg.segment('MSH')[10]),
                          "status": str(msg.segment('OBR')[25]),
                          "obx5": [msg.unescape(str(s[5])) for s in msg.segments('OBX')]}),
              flush=True)
        writer.writemessage(msg.create_ack())
        await writer.drain()
    writer.close()

async def main():
    server = await start_hl7_server(process, host="127.0.0.1", port=0, encoding=sys.argv[1])
    async with server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

asyncio.run(main())
"""


def node_env() -> Path:
    """node-hl7-client and simple-hl7 (npm) installed under /tmp, never in the project."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node/npm not installed: cannot check the ORU with node-hl7-client")
    where = THIRD_PARTY / "node"
    if not (where / "node_modules" / "node-hl7-client").is_dir():
        where.mkdir(parents=True, exist_ok=True)
        (where / "package.json").write_text('{"name": "wl-third-party", "private": true}')
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", *NPM_PACKAGES],
            cwd=where, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"npm install failed (registry unreachable?): {done.stderr[-300:]}")
    return where


def python_hl7() -> Path:
    """The python of a venv holding python-hl7 0.4.5 (PyPI `hl7`)."""
    venv = THIRD_PARTY / "python-hl7"
    python = venv / "bin" / "python"
    if not python.exists():
        made = subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            pytest.skip(f"cannot make a venv for python-hl7: {made.stderr[-300:]}")
    # -I: isolated, so our own hl7/ package in the working directory cannot answer instead
    if subprocess.run([str(python), "-I", "-c", "import hl7.mllp"], capture_output=True,
                      cwd="/tmp").returncode != 0:  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "hl7==0.4.5"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"pip install hl7 into {venv} failed: {done.stderr[-300:]}")
    return python


@contextmanager
def python_hl7_server(encoding: str = "utf-8") -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Run PYTHON_HL7_SERVER; yields its port and the process (read its stdout lines)."""
    server = subprocess.Popen(
        [str(python_hl7()), "-I", "-u", "-c", PYTHON_HL7_SERVER, encoding],
        cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        yield int(server.stdout.readline()), server
    finally:
        server.kill()
        server.wait(10)
