"""Regional radiology reporting worklist.

`create_app(settings=None)` is the only place a Flask app is built. It starts no
threads: the HL7 listener and the scheduler are separate processes (`worklist
hl7-listen`, `worklist scheduler`), or threads of `worklist serve`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from worklist.bootstrap import Runtime
    from worklist.config import Settings


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> Flask:
    from worklist.web import build_app

    return build_app(settings=settings, runtime=runtime)
