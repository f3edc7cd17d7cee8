"""JSON API for report templates and personal macros (under /api/v1, bearer token).

GET    /templates?trust=RW6&include_inactive=true   templates the caller may read
POST   /templates       {"name", "text", "trust": code|null, "procedure_code", "modality",
                         "active"}                  managers and admins
GET    /templates/<id>
PUT    /templates/<id>  any of the POST fields      managers and admins
DELETE /templates/<id>                              managers and admins
GET    /macros                                      the caller's own macros
POST   /macros          {"name": ".normchest", "text": ...}
PUT    /macros/<id>     {"name"?, "text"?}          own macros only (anyone else's is 404)
DELETE /macros/<id>
POST   /macros/expand   {"text": ...}               the text with the caller's macros expanded
"""

from __future__ import annotations

from typing import Any

from flask import jsonify, request

from worklist.errors import InvalidInput
from worklist.services import templates
from worklist.web.api import api_blueprint
from worklist.web.context import current_user, db, remote_addr, require_role, runtime

CSRF_EXEMPT = True
blueprint = api_blueprint("templates_api")


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidInput("send a JSON object")
    return body


def _one_template(row):  # type: ignore[no-untyped-def]
    return templates.templates_json(db(), [row])[0]


@blueprint.get("/templates")
def list_templates():  # type: ignore[no-untyped-def]
    include_inactive = request.args.get("include_inactive", "").lower() in ("1", "true", "yes")
    rows = templates.list_templates(
        db(), user=current_user(), now=runtime().clock.now(),
        trust_code=request.args.get("trust") or None, include_inactive=include_inactive,
    )  # fmt: skip
    return jsonify(
        templates=templates.templates_json(db(), rows),
        placeholders=sorted(templates.KNOWN_PLACEHOLDERS),
    )


@blueprint.post("/templates")
@require_role("manager")
def create_template():  # type: ignore[no-untyped-def]
    body = _body()
    unknown = sorted(set(body) - {"name", "text", "trust", "procedure_code", "modality", "active"})
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)}")
    row = templates.create_template(
        db(), user=current_user(), now=runtime().clock.now(), name=body.get("name"),
        text=body.get("text"), trust_code=body.get("trust"),
        procedure_code=body.get("procedure_code"), modality=body.get("modality"),
        active=body.get("active", True), remote_addr=remote_addr(),
    )  # fmt: skip
    return jsonify(_one_template(row)), 201


@blueprint.get("/templates/<int:template_id>")
def get_template(template_id: int):  # type: ignore[no-untyped-def]
    row = templates.get_template(
        db(), template_id=template_id, user=current_user(), now=runtime().clock.now()
    )
    return jsonify(_one_template(row))


@blueprint.put("/templates/<int:template_id>")
@require_role("manager")
def update_template(template_id: int):  # type: ignore[no-untyped-def]
    row = templates.update_template(
        db(), template_id=template_id, user=current_user(), now=runtime().clock.now(),
        changes=_body(), remote_addr=remote_addr(),
    )  # fmt: skip
    return jsonify(_one_template(row))


@blueprint.delete("/templates/<int:template_id>")
@require_role("manager")
def delete_template(template_id: int):  # type: ignore[no-untyped-def]
    templates.delete_template(
        db(), template_id=template_id, user=current_user(), now=runtime().clock.now(),
        remote_addr=remote_addr(),
    )  # fmt: skip
    return "", 204


@blueprint.get("/macros")
def list_macros():  # type: ignore[no-untyped-def]
    rows = templates.list_macros(db(), user=current_user())
    return jsonify(macros=[templates.macro_json(m) for m in rows])


@blueprint.post("/macros")
def create_macro():  # type: ignore[no-untyped-def]
    body = _body()
    row = templates.create_macro(
        db(), user=current_user(), name=body.get("name"), text=body.get("text"),
        now=runtime().clock.now(),
    )  # fmt: skip
    return jsonify(templates.macro_json(row)), 201


@blueprint.put("/macros/<int:macro_id>")
def update_macro(macro_id: int):  # type: ignore[no-untyped-def]
    body = _body()
    unknown = sorted(set(body) - {"name", "text"})
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)}")
    row = templates.update_macro(
        db(), user=current_user(), macro_id=macro_id, now=runtime().clock.now(),
        name=body.get("name"), text=body.get("text"),
    )  # fmt: skip
    return jsonify(templates.macro_json(row))


@blueprint.delete("/macros/<int:macro_id>")
def delete_macro(macro_id: int):  # type: ignore[no-untyped-def]
    templates.delete_macro(db(), user=current_user(), macro_id=macro_id, now=runtime().clock.now())
    return "", 204


@blueprint.post("/macros/expand")
def expand():  # type: ignore[no-untyped-def]
    """For the editor: the text as it will be saved and signed."""
    body = _body()
    if "text" not in body:
        raise InvalidInput("missing field: text")
    return jsonify(text=templates.expand(db(), user=current_user(), text=body["text"]))
