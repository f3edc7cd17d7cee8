"""People and API tokens: creating accounts, their permissions and credentials, and
authenticating bearer tokens (only a token's SHA-256 is ever stored)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from worklist.db import driver
from worklist.db.models import ApiToken, Credential, DutySession, ReportingPermission, Trust, User
from worklist.domain.eligibility import LONDON
from worklist.errors import Conflict, InvalidInput, NotFound

ROLES = ("radiologist", "manager", "admin", "integration")
TOKEN_PREFIX = "wl_"


@dataclass(frozen=True)
class CredentialSpec:
    """`MODALITY[:BODY_AREA]` as typed on the command line (CT, MR:NEURO)."""

    modality: str
    body_area: str | None = None

    @classmethod
    def parse(cls, text: str) -> CredentialSpec:
        modality, _, body_area = text.partition(":")
        modality = modality.strip().upper()
        if not modality or not modality.isalnum():
            raise InvalidInput(
                f"credential {text!r} is not MODALITY[:BODY_AREA], e.g. CT or MR:NEURO"
            )
        return cls(modality=modality, body_area=body_area.strip().upper() or None)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def trust_by_code(session: Session, code: str) -> Trust:
    trust = session.scalar(sa.select(Trust).where(Trust.code == code.upper()))
    if trust is None:
        raise NotFound(f"no trust with code {code!r}")
    return trust


def user_by_name(session: Session, username: str) -> User:
    user = session.scalar(sa.select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"no user {username!r}")
    return user


def add_user(
    session: Session,
    *,
    username: str,
    role: str,
    now: datetime,
    full_name: str | None = None,
    password: str | None = None,
    trust_codes: Iterable[str] = (),
    credentials: Iterable[CredentialSpec] = (),
    on_duty_hours: float | None = None,
    home_trust_code: str | None = None,
    professional_id: str | None = None,
    can_finalise: bool = True,
) -> User:
    """Create an account; radiologists get trusts, credentials and an optional duty session."""
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not username or len(username) > 64:
        raise InvalidInput("username must be 1 to 64 characters")
    if session.scalar(sa.select(User.id).where(User.username == username)) is not None:
        raise Conflict(f"user {username!r} already exists")
    trusts = [trust_by_code(session, code) for code in trust_codes]
    home = (
        trust_by_code(session, home_trust_code)
        if home_trust_code
        else (trusts[0] if trusts else None)
    )
    user = User(
        username=username,
        full_name=full_name,
        role=role,
        password_hash=generate_password_hash(password) if password else None,
        home_trust_id=home.id if home else None,
        professional_id=professional_id,
        can_finalise=can_finalise,
        created_at=now,
    )
    user.permissions = [ReportingPermission(trust_id=t.id) for t in trusts]
    user.credentials = [
        Credential(modality=c.modality, body_area=c.body_area) for c in set(credentials)
    ]
    if on_duty_hours:
        user.duty_sessions = [
            DutySession(
                starts_at=now, ends_at=now + timedelta(hours=on_duty_hours), location="hospital"
            )
        ]
    session.add(user)
    session.flush()
    return user


def check_password(user: User, password: str) -> bool:
    return bool(user.password_hash) and check_password_hash(user.password_hash or "", password)


def create_token(session: Session, *, user: User, now: datetime, name: str | None = None) -> str:
    """Issue a new bearer token; the plain token is returned once and never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, token_hash=hash_token(token), name=name, created_at=now))
    session.flush()
    return token


def get_user(session: Session, user_id: int) -> User | None:
    """The user with this id: a request's first query. Through the driver
    (`worklist.db.driver`), which costs half the CPU of the ORM's `get` (~0.15 ms of a
    next-case claim's ~1.3 on PostgreSQL)."""
    found = session.identity_map.get(session.identity_key(User, user_id))
    if found is not None:
        return found  # type: ignore[no-any-return]
    names, rows = driver.rows(session, _USER_BY_ID, {"user_id": user_id})
    return driver.loaded(session, User, dict(zip(names, rows[0], strict=True))) if rows else None


_USER_BY_ID = sa.select(User).where(User.id == driver.param("user_id", sa.Integer()))


#: A token's last use is recorded to this precision: writing it on every call cost each
#: API request an UPDATE (and a row lock that concurrent calls with one token queue on).
LAST_USED_PRECISION = timedelta(minutes=1)


def authenticate_token(session: Session, *, token: str, now: datetime) -> User | None:
    """The active user behind a bearer token, or None for an unknown or revoked one.

    One query (the token with its user); the token's last use is written only when the
    stored one is more than `LAST_USED_PRECISION` old."""
    found = session.execute(
        sa.select(ApiToken, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None))
    ).first()
    if found is None:
        return None
    row, user = found
    if not user.active:
        return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_PRECISION:
        row.last_used_at = now
    return user


def revoke_token(session: Session, *, token: str, now: datetime) -> None:
    row = session.scalar(sa.select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    if row is None:
        raise NotFound("no such token")
    row.revoked_at = now


#: Roles that see every trust's studies; a radiologist sees those of their agreements.
SEES_EVERY_TRUST = frozenset({"manager", "admin"})


def permission_in_force(user_id: Any, today: Any) -> sa.ColumnElement[bool]:
    """The user's reporting agreements in force on `today` (a London date), as SQL: the
    one definition of which trusts a radiologist may see. Values or SQL expressions."""
    return sa.and_(
        ReportingPermission.user_id == user_id,
        sa.or_(ReportingPermission.starts_on.is_(None), ReportingPermission.starts_on <= today),
        sa.or_(ReportingPermission.ends_on.is_(None), ReportingPermission.ends_on >= today),
    )


def visible_trust_ids(
    session: Session, *, user: User, on: datetime | None = None
) -> set[int] | None:
    """The trusts whose studies `user` may see; None means every trust (managers, admins).

    A radiologist sees only trusts they hold a reporting agreement for (current on `on`,
    by the London date).
    """
    if user.role in SEES_EVERY_TRUST:
        return None
    if on is None:
        query = sa.select(ReportingPermission.trust_id).where(
            ReportingPermission.user_id == user.id
        )
    else:
        today = on.astimezone(LONDON).date()
        query = sa.select(ReportingPermission.trust_id).where(permission_in_force(user.id, today))
    return set(session.scalars(query))
