"""Probes for load balancers and orchestrators: /healthz (alive), /readyz (database at head)."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, jsonify

from worklist.db import migrate
from worklist.web.context import runtime

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    return jsonify(status="ok")


@blueprint.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    engine = runtime().engine
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        current = migrate.current_revision(engine)
        head = migrate.head_revision(engine)
    except sa.exc.SQLAlchemyError as exc:
        return jsonify(status="unavailable", database="unreachable", error=type(exc).__name__), 503
    if current != head:
        return (
            jsonify(status="unavailable", database="reachable", migration=current, head=head),
            503,
        )
    return jsonify(status="ok", database="reachable", migration=current)
