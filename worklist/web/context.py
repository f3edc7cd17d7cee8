"""Per-request access to the runtime, the database session and the signed-in user."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import current_app, g, request
from sqlalchemy.orm import Session

from worklist.bootstrap import Runtime
from worklist.db.models import User
from worklist.errors import Forbidden

F = TypeVar("F", bound=Callable[..., Any])


def runtime() -> Runtime:
    return current_app.extensions["worklist.runtime"]  # type: ignore[no-any-return]


def db() -> Session:
    """The request's session; committed by the teardown when the view returned normally.

    Read committed (see `Runtime.read_committed_factory`): on SQLite a request queues for
    the write lock only once it writes, so pages never wait behind claims and HL7."""
    if "db" not in g:
        g.db = runtime().read_committed_factory()
    return g.db  # type: ignore[no-any-return]


def current_user() -> User:
    return g.user  # type: ignore[no-any-return]


def remote_addr() -> str | None:
    return request.remote_addr


def require_role(*roles: str) -> Callable[[F], F]:
    """Allow the view only to users with one of `roles` (admin may do everything)."""

    def decorate(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            user = current_user()
            if user.role != "admin" and user.role not in roles:
                raise Forbidden(f"this needs the role {' or '.join(roles)}")
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
