"""The web edge: JSON API under /api/v1, HTML pages, health probes."""

from __future__ import annotations

import logging
from datetime import timedelta

from flask import Flask
from flask_wtf.csrf import CSRFProtect

from worklist.bootstrap import Runtime, build_runtime
from worklist.config import Settings

logger = logging.getLogger(__name__)

# Blueprint modules, each owning one area of the API or UI. Add new areas here.
BLUEPRINT_MODULES = (
    "worklist.web.health",
    "worklist.web.api",
    "worklist.web.ui",
    "worklist.web.api_worklist",
    "worklist.web.api_reports",
    "worklist.web.api_messages",
    "worklist.web.api_templates",
)


def build_app(*, settings: Settings | None = None, runtime: Runtime | None = None) -> Flask:
    import importlib

    from worklist.web.errors import register_error_handlers

    if runtime is None:
        runtime = build_runtime(settings or Settings.from_env())
    settings = runtime.settings
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.is_production,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=12),
        JSON_SORT_KEYS=False,
    )
    app.extensions["worklist.runtime"] = runtime
    csrf = CSRFProtect(app)
    for name in BLUEPRINT_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # an area not written yet
        app.register_blueprint(module.blueprint)
        if getattr(module, "CSRF_EXEMPT", False):
            # Bearer-token APIs carry no cookies, so CSRF does not apply to them.
            csrf.exempt(module.blueprint)
    register_error_handlers(app)
    return app
