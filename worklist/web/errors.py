"""The one map from WorklistError to HTTP status, for the JSON API and the HTML pages."""

from __future__ import annotations

import logging

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from worklist.errors import Conflict, Forbidden, InvalidInput, NotFound, WorklistError

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[WorklistError], int] = {
    InvalidInput: 400,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
}


def status_for(error: WorklistError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 422


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in {"/healthz", "/readyz"}


def register_error_handlers(app: Flask) -> None:
    @app.after_request
    def _commit(response):  # type: ignore[no-untyped-def]
        # Commit before the response leaves, so a failed commit is an error the client sees.
        session = g.get("db")
        if session is not None and response.status_code < 400 and not g.get("rollback"):
            session.commit()
        return response

    @app.teardown_request
    def _close_session(exc: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            session.rollback()  # no-op after a commit; undoes a failed request
            session.close()

    @app.errorhandler(WorklistError)
    def _worklist_error(error: WorklistError):  # type: ignore[no-untyped-def]
        g.rollback = True
        status = status_for(error)
        if _wants_json():
            return jsonify(error=type(error).__name__, message=str(error)), status
        return f"<h1>{status}</h1><p>{error}</p>", status

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):  # type: ignore[no-untyped-def]
        g.rollback = True
        if _wants_json():
            return jsonify(error=error.name, message=error.description), error.code
        return error

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):  # type: ignore[no-untyped-def]
        g.rollback = True
        logger.exception("unhandled error on %s %s", request.method, request.path)
        if _wants_json():
            return jsonify(error="InternalError", message="internal error; see the server log"), 500
        return "<h1>500</h1><p>Internal error; see the server log.</p>", 500
