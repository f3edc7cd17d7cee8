"""JSON API for reports and their delivery to the RIS (under /api/v1, bearer token).

PUT  /studies/<id>/report            {"text": ...}                  autosave the draft
GET  /studies/<id>/report                                           draft and signed versions
GET  /studies/<id>/report/template                                  starting text for the study
POST /studies/<id>/report/sign       {"status": "preliminary"|"final", "urgent_finding": false,
                                      "text": optional (defaults to the saved draft)}
POST /studies/<id>/addenda           {"text": ..., "urgent_finding": false}
GET  /studies/<id>/deliveries                                       each ORU: state, attempts, ACK
GET  /deliveries?state=parked&trust=RW6                             managers and admins
POST /deliveries/<id>/resend                                        managers and admins
GET  /alerts  POST /alerts/<id>/acknowledge                         managers and admins
"""

from __future__ import annotations

from typing import Any

from flask import jsonify, request

from worklist.db.models import Study
from worklist.errors import InvalidInput, NotFound
from worklist.services import delivery, reports
from worklist.services import worklist as worklist_service
from worklist.web.api import api_blueprint, page_args
from worklist.web.context import current_user, db, remote_addr, require_role, runtime
from worklist.web.schemas import iso

CSRF_EXEMPT = True
blueprint = api_blueprint("api_reports")


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidInput("send a JSON object")
    return body


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false")
    return value


def _signed_json(signed: reports.Signed) -> dict[str, Any]:
    return {
        "version": reports.version_json(signed.version),
        "delivery": delivery.delivery_json(signed.outbound),
        "alert_id": signed.alert.id if signed.alert else None,
    }


@blueprint.get("/studies/<int:study_id>/report")
def get_report(study_id: int):  # type: ignore[no-untyped-def]
    view = reports.get_report(
        db(), study_id=study_id, user=current_user(), now=runtime().clock.now()
    )
    return jsonify(
        study_id=view.study_id,
        status=view.status,
        draft_text=view.draft_text,
        draft_saved_at=iso(view.draft_saved_at),
        versions=[reports.version_json(v) for v in view.versions],
    )


@blueprint.get("/studies/<int:study_id>/report/template")
def template(study_id: int):  # type: ignore[no-untyped-def]
    """The starting text for this study (procedure/modality template, placeholders filled)."""
    start = reports.starting_text(
        db(), study_id=study_id, user=current_user(), now=runtime().clock.now()
    )
    return jsonify(template=start.template, text=start.text, unfilled=list(start.unfilled))


@blueprint.put("/studies/<int:study_id>/report")
def save_draft(study_id: int):  # type: ignore[no-untyped-def]
    body = _body()
    if "text" not in body:
        raise InvalidInput("missing field: text")
    report = reports.save_draft(
        db(), study_id=study_id, user=current_user(), text=body["text"],
        now=runtime().clock.now(), remote_addr=remote_addr(),
    )  # fmt: skip
    return jsonify(
        study_id=study_id,
        status=report.status,
        draft_saved_at=iso(report.draft_saved_at),
        text=report.draft_text,  # macros expanded: the editor shows what was stored
    )


@blueprint.post("/studies/<int:study_id>/report/sign")
def sign(study_id: int):  # type: ignore[no-untyped-def]
    body = _body()
    text = body.get("text")
    if text is not None and not isinstance(text, str):
        raise InvalidInput("text must be a string")
    signed = reports.sign_report(
        db(), study_id=study_id, user=current_user(), status=str(body.get("status", "")),
        urgent_finding=_flag(body, "urgent_finding"), text=text, now=runtime().clock.now(),
        remote_addr=remote_addr(),
    )  # fmt: skip
    return jsonify(_signed_json(signed)), 201


@blueprint.post("/studies/<int:study_id>/addenda")
def addendum(study_id: int):  # type: ignore[no-untyped-def]
    body = _body()
    if not isinstance(body.get("text"), str):
        raise InvalidInput("missing field: text")
    signed = reports.add_addendum(
        db(), study_id=study_id, user=current_user(), text=body["text"],
        urgent_finding=_flag(body, "urgent_finding"), now=runtime().clock.now(),
        remote_addr=remote_addr(),
    )  # fmt: skip
    return jsonify(_signed_json(signed)), 201


@blueprint.get("/studies/<int:study_id>/deliveries")
def study_deliveries(study_id: int):  # type: ignore[no-untyped-def]
    session = db()
    study = session.get(Study, study_id)
    now = runtime().clock.now()
    if study is None or not worklist_service.may_see_trust(
        session, user=current_user(), trust_id=study.trust_id, now=now
    ):
        raise NotFound(f"no study {study_id}")
    rows = delivery.deliveries_for_study(session, study_id=study_id)
    return jsonify(
        study_id=study_id,
        deliveries=[
            delivery.delivery_json(m, delivery.delivery_history(session, message_id=m.id))
            for m in rows
        ],
    )


@blueprint.get("/deliveries")
@require_role("manager")
def list_deliveries():  # type: ignore[no-untyped-def]
    limit, _ = page_args()
    rows = delivery.list_deliveries(
        db(), state=request.args.get("state"), trust_code=request.args.get("trust"), limit=limit
    )
    return jsonify(deliveries=[delivery.delivery_json(m) for m in rows])


@blueprint.post("/deliveries/<int:message_id>/resend")
@require_role("manager")
def resend(message_id: int):  # type: ignore[no-untyped-def]
    message = delivery.resend(
        db(), message_id=message_id, user=current_user(), now=runtime().clock.now(),
        remote_addr=remote_addr(),
    )  # fmt: skip
    return jsonify(delivery.delivery_json(message)), 201


@blueprint.get("/alerts")
@require_role("manager")
def alerts():  # type: ignore[no-untyped-def]
    return jsonify(
        alerts=[
            {"id": a.id, "kind": a.kind, "study_id": a.study_id, "trust_id": a.trust_id,
             "message": a.message, "created_at": iso(a.created_at)}
            for a in reports.open_alerts(db())
        ]
    )  # fmt: skip


@blueprint.post("/alerts/<int:alert_id>/acknowledge")
@require_role("manager")
def acknowledge(alert_id: int):  # type: ignore[no-untyped-def]
    alert = reports.acknowledge_alert(
        db(), alert_id=alert_id, user=current_user(), now=runtime().clock.now(),
        remote_addr=remote_addr(),
    )  # fmt: skip
    return jsonify(id=alert.id, acknowledged_at=iso(alert.acknowledged_at))
