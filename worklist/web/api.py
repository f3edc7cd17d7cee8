"""The JSON API's front door: bearer-token authentication for everything under /api/v1,
and the foundation endpoints (who am I, trusts, study listing)."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, g, jsonify, request
from sqlalchemy.orm import joinedload

from worklist.db.models import Patient, Study, Trust
from worklist.errors import InvalidInput
from worklist.services import accounts, trusts
from worklist.web.context import current_user, db, require_role, runtime
from worklist.web.schemas import study_json, trust_json, user_json

CSRF_EXEMPT = True
MAX_PAGE_SIZE = 500


def _unauthorised(message: str):  # type: ignore[no-untyped-def]
    response = jsonify(error="Unauthorized", message=message)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Bearer realm="worklist"'
    return response


def _authenticate():  # type: ignore[no-untyped-def]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _unauthorised("send an API token as 'Authorization: Bearer TOKEN'")
    user = accounts.authenticate_token(db(), token=token.strip(), now=runtime().clock.now())
    if user is None:
        return _unauthorised("the API token is unknown or revoked")
    g.user = user
    return None


def api_blueprint(name: str) -> Blueprint:
    """A blueprint under /api/v1 whose every view needs a valid bearer token (g.user)."""
    bp = Blueprint(name, __name__, url_prefix="/api/v1")
    bp.before_request(_authenticate)
    return bp


def page_args() -> tuple[int, int]:
    """`limit` and `offset` query arguments, validated."""
    try:
        limit = int(request.args.get("limit", 50))
        offset = int(request.args.get("offset", 0))
    except ValueError as exc:
        raise InvalidInput("limit and offset must be whole numbers") from exc
    if not 1 <= limit <= MAX_PAGE_SIZE or offset < 0:
        raise InvalidInput(f"limit must be 1 to {MAX_PAGE_SIZE} and offset 0 or more")
    return limit, offset


blueprint = api_blueprint("api")


@blueprint.get("/me")
def me():  # type: ignore[no-untyped-def]
    return jsonify(user_json(current_user()))


@blueprint.get("/trusts")
def list_trusts():  # type: ignore[no-untyped-def]
    return jsonify(trusts=[trust_json(t) for t in trusts.list_trusts(db())])


@blueprint.post("/trusts")
@require_role("admin")
def add_trust():  # type: ignore[no-untyped-def]
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidInput("send a JSON object")
    missing = [k for k in ("code", "name", "sending_facility") if not body.get(k)]
    if missing:
        raise InvalidInput(f"missing field(s): {', '.join(missing)}")
    trust = trusts.add_trust(
        db(),
        code=str(body["code"]),
        name=str(body["name"]),
        sending_facility=str(body["sending_facility"]),
        sending_application=body.get("sending_application"),
        ris_host=body.get("ris_host"),
        ris_port=body.get("ris_port"),
        ack_mode=body.get("ack_mode", "original"),
        now=runtime().clock.now(),
    )
    return jsonify(trust_json(trust)), 201


@blueprint.get("/studies")
def list_studies():  # type: ignore[no-untyped-def]
    """Studies the caller may see, most urgent first; filter by status, trust, modality."""
    session = db()
    limit, offset = page_args()
    query = (
        sa.select(Study)
        .join(Trust)
        .options(joinedload(Study.trust), joinedload(Study.patient), joinedload(Study.claimed_by))
        .order_by(Study.urgency.desc(), Study.id)
    )
    visible = accounts.visible_trust_ids(session, user=current_user(), on=runtime().clock.now())
    if visible is not None:
        query = query.where(Study.trust_id.in_(visible))
    if status := request.args.get("status"):
        query = query.where(Study.status.in_(status.split(",")))
    if trust := request.args.get("trust"):
        query = query.where(Trust.code.in_(trust.upper().split(",")))
    if modality := request.args.get("modality"):
        query = query.where(Study.modality.in_(modality.upper().split(",")))
    if nhs := request.args.get("nhs_number"):
        query = query.join(Patient, Study.patient_id == Patient.id).where(Patient.nhs_number == nhs)
    total = session.scalar(sa.select(sa.func.count()).select_from(query.order_by(None).subquery()))
    studies = session.scalars(query.limit(limit).offset(offset)).unique().all()
    return jsonify(
        total=total, limit=limit, offset=offset, studies=[study_json(s) for s in studies]
    )
