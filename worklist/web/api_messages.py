"""JSON API of the inbound HL7 message log and error queue (admin only).

* ``GET /api/v1/messages`` — search: ``trust``, ``accession``, ``patient``,
  ``control_id``, ``state`` (comma-separated), ``since``/``until`` (ISO 8601;
  without an offset, the region's local time), ``limit``/``offset``;
* ``GET /api/v1/messages/<id>`` — one message with its raw text and the ACK sent;
* ``PUT /api/v1/messages/<id>`` — correct a failed or rejected message
  (JSON ``{"raw": "MSH|..."}`` or a text/plain body);
* ``POST /api/v1/messages/<id>/replay`` — apply it now, exactly once.

A thin edge over `worklist.services.messages`; edits and replays are audited there.
"""

from __future__ import annotations

from datetime import datetime

from flask import jsonify, request

from worklist.errors import InvalidInput
from worklist.services import messages as service
from worklist.web.api import api_blueprint, page_args
from worklist.web.context import current_user, db, require_role, runtime

CSRF_EXEMPT = True

blueprint = api_blueprint("api_messages")


def _time(name: str) -> datetime | None:
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise InvalidInput(f"{name} must be an ISO 8601 date/time, not {raw!r}") from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=runtime().settings.tz)
    return value


@blueprint.get("/messages")
@require_role("admin")
def list_messages():  # type: ignore[no-untyped-def]
    limit, offset = page_args()
    states = [s.strip() for s in request.args.get("state", "").split(",") if s.strip()]
    session = db()
    rows = service.list_messages(
        session,
        trust_code=request.args.get("trust") or None,
        accession_number=request.args.get("accession") or None,
        patient_identifier=request.args.get("patient") or None,
        control_id=request.args.get("control_id"),
        state=states or None,
        since=_time("since"),
        until=_time("until"),
        limit=limit,
        offset=offset,
    )
    codes = service.trust_codes(session, rows)
    return jsonify(
        messages=[service.message_json(r, trust_code=codes.get(r.trust_id or 0)) for r in rows],
        limit=limit,
        offset=offset,
    )


@blueprint.get("/messages/<int:message_id>")
@require_role("admin")
def show_message(message_id: int):  # type: ignore[no-untyped-def]
    session = db()
    row = service.get_message(session, message_id)
    codes = service.trust_codes(session, [row])
    return jsonify(service.message_json(row, trust_code=codes.get(row.trust_id or 0), full=True))


@blueprint.put("/messages/<int:message_id>")
@require_role("admin")
def edit_message(message_id: int):  # type: ignore[no-untyped-def]
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("raw"), str):
            raise InvalidInput('send {"raw": "MSH|..."} or the message as text/plain')
        raw: str | bytes = body["raw"]
    else:
        raw = request.get_data()
    session = db()
    row = service.edit_message(
        session, message_id, raw=raw, now=runtime().clock.now(), user=current_user()
    )
    codes = service.trust_codes(session, [row])
    return jsonify(service.message_json(row, trust_code=codes.get(row.trust_id or 0), full=True))


@blueprint.post("/messages/<int:message_id>/replay")
@require_role("admin")
def replay_message(message_id: int):  # type: ignore[no-untyped-def]
    session = db()
    rt = runtime()
    row = service.replay_message(
        session,
        message_id,
        directory=service.TrustDirectory(rt.settings),
        now=rt.clock.now(),
        user=current_user(),
    )
    codes = service.trust_codes(session, [row])
    return jsonify(service.message_json(row, trust_code=codes.get(row.trust_id or 0)))
