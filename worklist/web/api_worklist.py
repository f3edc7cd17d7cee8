"""JSON API of the worklist engine: the radiologist's worklist, next case, claims, priors,
and the manager's assign / reassign / return.

A thin edge: it reads the request, calls `worklist.services.worklist`, and shapes the
answer. A study of a trust the caller may not see answers 404 (the service raises
NotFound). Claims, views of a study and of priors are audited by the service.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Response, jsonify, request

from worklist.db.models import Assignment, Study, User
from worklist.domain.eligibility import Eligibility
from worklist.domain.priority import describe, tier_from_urgency
from worklist.errors import InvalidInput, NotFound
from worklist.services import accounts, audit, verification
from worklist.services import priors as priors_service
from worklist.services import worklist as service
from worklist.web.api import api_blueprint, page_args
from worklist.web.context import current_user, db, remote_addr, require_role, runtime
from worklist.web.schemas import iso, study_json

CSRF_EXEMPT = True

blueprint = api_blueprint("api_worklist")


def _lease() -> timedelta:
    return timedelta(minutes=runtime().settings.claim_lease_minutes)


def _now():  # type: ignore[no-untyped-def]
    return runtime().clock.now()


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise InvalidInput("send a JSON object")
    return body


def _csv(name: str) -> tuple[str, ...]:
    raw = request.args.get(name, "")
    return tuple(v.strip() for v in raw.split(",") if v.strip())


def entry_json(study: Study) -> dict[str, Any]:
    """A study as the worklist shows it: the study, and why it sits where it does now."""
    now = _now()
    data = study_json(study)
    explanation = study.priority_explanation or {}
    priority = data["priority"]
    priority["tier"] = tier_from_urgency(study.urgency) if study.urgency else None
    if study.due_at is not None:
        left = (study.due_at - now).total_seconds()
        priority["time_left_seconds"] = int(left)
        priority["breached"] = left < 0
    if explanation.get("due_at"):
        priority["description"] = describe(explanation, now, runtime().settings.tz)
    data["effort"] = study.effort
    # Critical work (e.g. a timing-critical order) is given even over a full session.
    priority["critical"] = explanation.get("critical") if study.critical else None
    return data


def assignment_json(row: Assignment) -> dict[str, Any]:
    return {
        "id": row.id,
        "study_id": row.study_id,
        "user": row_username(row.user_id),
        "kind": row.kind,
        "assigned_by": row_username(row.assigned_by_id),
        "started_at": iso(row.started_at),
        "expires_at": iso(row.expires_at),
        "ended_at": iso(row.ended_at),
        "end_reason": row.end_reason,
        "explanation": service.explained(
            row.explanation or {}, row.started_at, runtime().settings.tz
        ),
    }


def row_username(user_id: int | None) -> str | None:
    if user_id is None:
        return None
    user = db().get(User, user_id)
    return user.username if user else None


def eligibility_json(verdict: Eligibility) -> dict[str, Any]:
    return {
        "allowed": verdict.allowed,
        "reasons": [{"code": r.code.value, "message": r.message} for r in verdict.reasons],
    }


@blueprint.get("/worklist")
def get_worklist():  # type: ignore[no-untyped-def]
    """The caller's eligible studies in the system's order, their own claims first."""
    limit, offset = page_args()
    breached_arg = request.args.get("breached")
    max_tier_arg = request.args.get("max_tier")
    try:
        max_tier = int(max_tier_arg) if max_tier_arg else None
    except ValueError as exc:
        raise InvalidInput("max_tier must be a whole number") from exc
    filters = service.WorklistFilters(
        trusts=_csv("trust"),
        modalities=_csv("modality"),
        body_areas=_csv("body_area"),
        priority_classes=_csv("class"),
        max_tier=max_tier,
        breached=None if breached_arg is None else breached_arg.lower() in ("1", "true", "yes"),
    )
    session, user, now = db(), current_user(), _now()
    page = service.worklist(
        session, user=user, now=now, filters=filters, limit=limit, offset=offset
    )
    audit.record(
        session, at=now, action="view_worklist", user=user, object_type="worklist",
        detail={"studies": [s.id for s in page.studies], "mine": [s.id for s in page.mine]},
        remote_addr=remote_addr(),
    )  # fmt: skip
    return jsonify(
        limit=limit,
        offset=offset,
        has_more=page.has_more,
        next_case=eligibility_json(page.eligibility),
        free_choice=page.free_choice,
        mine=[entry_json(s) for s in page.mine],
        studies=[entry_json(s) for s in page.studies],
        removed=[
            {
                "study_id": a.study_id,
                "ended_at": iso(a.ended_at),
                "reason": a.end_reason,
            }
            for a in page.removed
        ],
    )


@blueprint.post("/worklist/next")
def next_case():  # type: ignore[no-untyped-def]
    """Claim the most urgent study the caller may report: 200 with it, 204 when none."""
    result = service.next_case(
        db(), user=current_user(), now=_now(), lease=_lease(), remote_addr=remote_addr()
    )
    if result.study is None:
        response = Response(status=204)
        response.headers["X-Worklist-Reason"] = result.reason
        return response
    assert result.assignment is not None
    return jsonify(
        study=entry_json(result.study),
        assignment=assignment_json(result.assignment),
        together=[entry_json(s) for s in result.together],
    )


@blueprint.get("/verification")
def get_verification_pool():  # type: ignore[no-untyped-def]
    """Preliminary reports awaiting verification that the caller may verify, in the system's
    order (empty for a radiologist without the right to finalise); next case offers them."""
    limit, _ = page_args()
    studies = verification.verification_pool(db(), user=current_user(), now=_now(), limit=limit)
    return jsonify(studies=[entry_json(s) for s in studies])


@blueprint.get("/studies/<int:study_id>")
def get_study(study_id: int):  # type: ignore[no-untyped-def]
    """One study with its priority explanation, claim history ("why me") and the caller's
    eligibility for it."""
    session, user, now = db(), current_user(), _now()
    study = service.get_study(
        session, study_id=study_id, user=user, now=now, remote_addr=remote_addr()
    )
    data = entry_json(study)
    data["assignments"] = [
        assignment_json(a) for a in service.assignment_history(session, study_id=study.id)
    ]
    data["eligibility"] = eligibility_json(
        service.eligibility_for(session, study=study, user=user, now=now)
    )
    return jsonify(data)


@blueprint.get("/studies/<int:study_id>/priors")
def get_priors(study_id: int):  # type: ignore[no-untyped-def]
    found = priors_service.priors(
        db(), study_id=study_id, user=current_user(), now=_now(), remote_addr=remote_addr()
    )
    return jsonify(
        study_id=study_id,
        priors=[
            {
                "id": p.study.id,
                "trust": p.trust_code,
                "accession_number": p.study.accession_number,
                "status": p.study.status,
                "modality": p.study.modality,
                "body_area": p.study.body_area,
                "procedure_name": p.study.procedure_name,
                "performed_at": iso(p.study.performed_at),
                "relevant": p.relevant,
                "relevance": p.relevance,
                "report": None
                if p.report_text is None
                else {
                    "kind": p.report_kind,
                    "text": p.report_text,
                    "signed_at": iso(p.report_signed_at),
                },
            }
            for p in found
        ],
    )


@blueprint.post("/studies/<int:study_id>/claim")
def claim(study_id: int):  # type: ignore[no-untyped-def]
    """Claim a chosen study (free-choice session or manager); renews one's own claim."""
    assignment = service.claim_study(
        db(), study_id=study_id, user=current_user(), now=_now(), lease=_lease(),
        remote_addr=remote_addr(),
    )  # fmt: skip
    study = db().get(Study, study_id)
    assert study is not None
    return jsonify(study=entry_json(study), assignment=assignment_json(assignment))


@blueprint.post("/studies/<int:study_id>/renew")
def renew(study_id: int):  # type: ignore[no-untyped-def]
    """Extend the caller's lease while they work on the report."""
    _visible(study_id)
    study = service.renew_claim(
        db(), study_id=study_id, user=current_user(), now=_now(), lease=_lease()
    )
    return jsonify(study_id=study.id, claim_expires_at=iso(study.claim_expires_at))


@blueprint.post("/studies/<int:study_id>/release")
def release(study_id: int):  # type: ignore[no-untyped-def]
    study = service.release_claim(
        db(), study_id=study_id, user=current_user(), reason=str(_body().get("reason") or ""),
        now=_now(), remote_addr=remote_addr(),
    )  # fmt: skip
    return jsonify(study=entry_json(study))


@blueprint.post("/studies/<int:study_id>/reading")
def reading(study_id: int):  # type: ignore[no-untyped-def]
    """Record one reading of a double-read study; answers the next stage."""
    stage = service.record_reading(
        db(), study_id=study_id, user=current_user(), outcome=str(_body().get("outcome") or ""),
        now=_now(), remote_addr=remote_addr(),
    )  # fmt: skip
    return jsonify(study_id=study_id, stage=stage)


def _assign(study_id: int):  # type: ignore[no-untyped-def]
    body = _body()
    username = body.get("username")
    if not username:
        raise InvalidInput("say who gets the study: {'username': ...}")
    session = db()
    to_user = accounts.user_by_name(session, str(username))
    assignment = service.assign_study(
        session, study_id=study_id, to_user=to_user, by=current_user(), now=_now(),
        lease=_lease(), note=body.get("note"), remote_addr=remote_addr(),
    )  # fmt: skip
    study = session.get(Study, study_id)
    assert study is not None
    return jsonify(study=entry_json(study), assignment=assignment_json(assignment))


@blueprint.post("/studies/<int:study_id>/assign")
@require_role("manager")
def assign(study_id: int):  # type: ignore[no-untyped-def]
    return _assign(study_id)


@blueprint.post("/studies/<int:study_id>/reassign")
@require_role("manager")
def reassign(study_id: int):  # type: ignore[no-untyped-def]
    return _assign(study_id)


@blueprint.post("/studies/<int:study_id>/return")
@require_role("manager")
def return_to_pool(study_id: int):  # type: ignore[no-untyped-def]
    study = service.return_to_pool(
        db(), study_id=study_id, by=current_user(), reason=str(_body().get("reason") or ""),
        now=_now(), remote_addr=remote_addr(),
    )  # fmt: skip
    return jsonify(study=entry_json(study))


def _visible(study_id: int) -> Study:
    study = db().get(Study, study_id)
    if study is None or not service.may_see_trust(
        db(), user=current_user(), trust_id=study.trust_id, now=_now()
    ):
        raise NotFound(f"no study {study_id}")
    return study


@blueprint.get("/agreements/expiring")
@require_role("manager")
def expiring_agreements():  # type: ignore[no-untyped-def]
    """Reporting agreements that end within `days` (default 30): the manager's warning list."""
    try:
        days = int(request.args.get("days", 30))
    except ValueError as exc:
        raise InvalidInput("days must be a whole number") from exc
    found = service.expiring_agreements(db(), now=_now(), within=timedelta(days=days))
    return jsonify(
        agreements=[
            {
                "username": username,
                "trust": agreement.trust_code,
                "starts_on": agreement.starts_on.isoformat() if agreement.starts_on else None,
                "ends_on": agreement.ends_on.isoformat() if agreement.ends_on else None,
            }
            for agreement, username in found
        ]
    )
