"""HTML pages: sign-in and the read-only regional worklist (the radiologist UI builds on it)."""

from __future__ import annotations

from collections import Counter
from functools import wraps
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, g, redirect, render_template, request, session, url_for
from sqlalchemy.orm import joinedload

from worklist.db.models import Alert, Study, Trust, User
from worklist.domain.study import StudyStatus
from worklist.services import accounts, audit, reports
from worklist.web.context import db, remote_addr, runtime

blueprint = Blueprint("ui", __name__, template_folder="templates")
PAGE_SIZE = 100


def login_required(view):  # type: ignore[no-untyped-def]
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        user_id = session.get("user_id")
        user = accounts.get_user(db(), user_id) if user_id else None
        if user is None or not user.active:
            return redirect(url_for("ui.login", next=request.path))
        g.user = user
        return view(*args, **kwargs)

    return wrapper


@blueprint.route("/login", methods=["GET", "POST"])
def login():  # type: ignore[no-untyped-def]
    error = None
    if request.method == "POST":
        username = request.form.get("username", "")
        password = request.form.get("password", "")
        user = db().scalar(sa.select(User).where(User.username == username))
        now = runtime().clock.now()
        if user is not None and user.active and accounts.check_password(user, password):
            session.clear()
            session["user_id"] = user.id
            session.permanent = True
            audit.record(db(), at=now, action="login", user=user, remote_addr=remote_addr())
            target = request.args.get("next", "")
            return redirect(
                target if target.startswith("/") and not target.startswith("//") else "/"
            )
        audit.record(
            db(),
            at=now,
            action="login_failed",
            detail={"username": username[:64]},
            remote_addr=remote_addr(),
        )
        db().commit()  # the 401 response would roll back; a failed sign-in must stay audited
        error = "Unknown user or wrong password."
    return render_template("login.html", error=error), 401 if error else 200


@blueprint.post("/logout")
def logout():  # type: ignore[no-untyped-def]
    session.clear()
    return redirect(url_for("ui.login"))


@blueprint.get("/")
@login_required
def worklist_page():  # type: ignore[no-untyped-def]
    """The regional worklist, read-only: what is waiting, where, and how urgent."""
    session_ = db()
    user: User = g.user
    now = runtime().clock.now()
    status = request.args.get("status", StudyStatus.READY.value)
    trust_code = request.args.get("trust", "")
    visible = accounts.visible_trust_ids(session_, user=user, on=now)
    query = (
        sa.select(Study)
        .join(Trust)
        .options(joinedload(Study.trust), joinedload(Study.patient), joinedload(Study.claimed_by))
        .order_by(Study.urgency.desc(), Study.id)
    )
    counts_query = (
        sa.select(Trust.code, Study.status, sa.func.count())
        .join(Study.trust)
        .group_by(Trust.code, Study.status)
    )
    if visible is not None:
        query = query.where(Study.trust_id.in_(visible))
        counts_query = counts_query.where(Study.trust_id.in_(visible))
    if status:
        query = query.where(Study.status == status)
    if trust_code:
        query = query.where(Trust.code == trust_code)
    studies = session_.scalars(query.limit(PAGE_SIZE)).unique().all()
    counts: Counter[tuple[str, str]] = Counter()
    for code, st, n in session_.execute(counts_query):
        counts[(code, st)] = n
    trust_codes = sorted({code for code, _ in counts})
    audit.record(
        session_,
        at=now,
        action="view_worklist",
        user=user,
        detail={"status": status, "trust": trust_code, "rows": len(studies)},
        remote_addr=remote_addr(),
    )
    return render_template(
        "worklist.html",
        alerts=_alerts_for(session_, user),
        user=user,
        studies=studies,
        now=now,
        status=status,
        trust_code=trust_code,
        statuses=[s.value for s in StudyStatus],
        trust_codes=trust_codes,
        counts=counts,
        tz=runtime().settings.tz,
    )


def _alerts_for(session_: sa.orm.Session, user: User) -> list[Alert]:
    """Managers see every open alert (urgent findings, parked reports); a radiologist sees
    the ones addressed to them (e.g. a claim the RIS took away)."""
    if user.role in {"manager", "admin"}:
        return reports.open_alerts(session_)[:50]
    return list(
        session_.scalars(
            sa.select(Alert)
            .where(Alert.user_id == user.id, Alert.acknowledged_at.is_(None))
            .order_by(Alert.id.desc())
            .limit(50)
        )
    )


@blueprint.post("/alerts/<int:alert_id>/acknowledge")
@login_required
def acknowledge_alert(alert_id: int):  # type: ignore[no-untyped-def]
    reports.acknowledge_alert(
        db(), alert_id=alert_id, user=g.user, now=runtime().clock.now(), remote_addr=remote_addr()
    )
    return redirect(url_for("ui.worklist_page"))
