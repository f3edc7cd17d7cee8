"""Stored report templates and personal macros: who may manage them, and which one applies.

Templates are starting texts per procedure/modality with ``{{placeholders}}``, kept for one
trust or for the whole region (``trust_id`` None); managers and admins write them, everyone
reads those of the trusts they may see. Macros belong to one radiologist: typing the trigger
(".normchest") in a report inserts its text when the draft is saved, the report signed, or
the editor asks (`expand`). The rules that pick a template, fill placeholders and expand
macros are pure functions in `worklist.domain.reports`; this module validates input, stores
rows, audits template changes and falls back to the built-in templates when nothing stored fits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worklist.db.models import ReportMacro, ReportTemplateRow, Trust, User
from worklist.domain import reports as rules
from worklist.errors import Conflict, Forbidden, InvalidInput, NotFound
from worklist.services import accounts, audit

TEMPLATE_MANAGERS = frozenset({"manager", "admin"})
# The placeholders `template_values` fills; anything else in a template is a typo.
KNOWN_PLACEHOLDERS: frozenset[str] = frozenset(rules.template_values())
MAX_TEMPLATE_CHARS = 20_000
MAX_MACRO_CHARS = 20_000
MAX_EXPAND_CHARS = 100_000  # as long as a report may be
_MACRO_NAME = re.compile(r"^\.[a-z][a-z0-9_]{0,38}$")
_TEMPLATE_FIELDS = ("name", "text", "trust", "procedure_code", "modality", "active")


# --- validation ---------------------------------------------------------------------------


def _text(value: object, *, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"the {what} must be a string")
    if not value.strip():
        raise InvalidInput(f"the {what} is empty")
    if len(value) > limit:
        raise InvalidInput(f"the {what} is longer than {limit} characters")
    return value


def _optional_code(value: object, *, what: str, limit: int, upper: bool = False) -> str | None:
    """None or "" means "any"; otherwise a short code without spaces."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
        raise InvalidInput(f"{what} must be a code without spaces, or null for any")
    value = value.strip()
    if len(value) > limit:
        raise InvalidInput(f"{what} is longer than {limit} characters")
    return value.upper() if upper else value


def check_template_text(text: object) -> str:
    """A template's text: not empty, and every ``{{placeholder}}`` one that is filled in."""
    text = _text(text, what="template text", limit=MAX_TEMPLATE_CHARS)
    used = rules.unfilled_placeholders(text)
    unknown = sorted({name for name in used if name not in KNOWN_PLACEHOLDERS})
    if unknown:
        raise InvalidInput(
            f"unknown placeholder(s): {', '.join('{{' + n + '}}' for n in unknown)}; "
            f"known: {', '.join(sorted(KNOWN_PLACEHOLDERS))}"
        )
    rest = rules.fill_placeholders(text, {name: "\x00" for name in used}).text
    if "{{" in rest or "}}" in rest:
        raise InvalidInput(
            "a placeholder is malformed: write {{name}} with a known name, e.g. {{exam_date}}"
        )
    return text


def check_macro_name(name: object) -> str:
    """The trigger word as stored: lower case with its leading dot (".normchest")."""
    if not isinstance(name, str):
        raise InvalidInput("the macro name must be a string")
    word = name.strip().lower()
    if not word.startswith("."):
        word = "." + word
    if not _MACRO_NAME.match(word):
        raise InvalidInput(
            "a macro name is a dot and a word, e.g. .normchest: a letter first, then letters, "
            "digits or _, at most 39 characters"
        )
    return word


# --- templates ----------------------------------------------------------------------------


def _require_manager(user: User) -> None:
    if user.role not in TEMPLATE_MANAGERS:
        raise Forbidden("only managers and admins can change report templates")


def _trust_id_for(session: Session, code: object) -> int | None:
    if code is None or code == "":
        return None
    if not isinstance(code, str):
        raise InvalidInput("trust must be a trust code, or null for region-wide")
    trust_id = session.scalar(sa.select(Trust.id).where(Trust.code == code.strip()))
    if trust_id is None:
        raise InvalidInput(f"no trust {code!r}")
    return trust_id


def _trust_codes(session: Session, trust_ids: Iterable[int | None]) -> dict[int, str]:
    ids = {i for i in trust_ids if i is not None}
    if not ids:
        return {}
    return dict(session.execute(sa.select(Trust.id, Trust.code).where(Trust.id.in_(ids))).all())


def _readable_trusts(session: Session, user: User, now: datetime) -> set[int] | None:
    """None: every trust (managers, admins); otherwise the trusts the user reports for."""
    return accounts.visible_trust_ids(session, user=user, on=now)


def list_templates(
    session: Session,
    *,
    user: User,
    now: datetime,
    trust_code: str | None = None,
    include_inactive: bool = False,
) -> list[ReportTemplateRow]:
    """Templates the user may read: a radiologist sees region-wide ones and those of the
    trusts they report for; ``trust_code`` narrows to what applies to that trust."""
    query = sa.select(ReportTemplateRow).order_by(
        ReportTemplateRow.trust_id.is_not(None), ReportTemplateRow.name, ReportTemplateRow.id
    )
    visible = _readable_trusts(session, user, now)
    if visible is not None:
        query = query.where(
            sa.or_(ReportTemplateRow.trust_id.is_(None), ReportTemplateRow.trust_id.in_(visible))
        )
    if trust_code:
        trust_id = _trust_id_for(session, trust_code)
        query = query.where(
            sa.or_(ReportTemplateRow.trust_id.is_(None), ReportTemplateRow.trust_id == trust_id)
        )
    if not include_inactive or user.role not in TEMPLATE_MANAGERS:
        query = query.where(ReportTemplateRow.active.is_(True))
    return list(session.scalars(query))


def get_template(
    session: Session, *, template_id: int, user: User, now: datetime
) -> ReportTemplateRow:
    row = session.get(ReportTemplateRow, template_id)
    if row is None:
        raise NotFound(f"no template {template_id}")
    if user.role not in TEMPLATE_MANAGERS:
        visible = _readable_trusts(session, user, now)
        if not row.active or (
            row.trust_id is not None and visible is not None and row.trust_id not in visible
        ):
            raise NotFound(f"no template {template_id}")
    return row


def _refuse_duplicate_name(
    session: Session, *, name: str, trust_id: int | None, except_id: int | None = None
) -> None:
    query = sa.select(ReportTemplateRow.id).where(
        ReportTemplateRow.name == name,
        ReportTemplateRow.trust_id.is_(None)
        if trust_id is None
        else ReportTemplateRow.trust_id == trust_id,
    )
    if except_id is not None:
        query = query.where(ReportTemplateRow.id != except_id)
    if session.scalar(query) is not None:
        where = "region-wide" if trust_id is None else "for this trust"
        raise Conflict(f"a template named {name!r} already exists {where}")


def _flush_unique(session: Session, what: str) -> None:
    """A lost race on a unique key (the check above passed in both) is a Conflict; the
    caller rolls the transaction back, as for any error."""
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict(f"{what} already exists") from exc


def _template_audit(row: ReportTemplateRow, trust_code: str | None) -> dict[str, Any]:
    return {
        "name": row.name,
        "trust": trust_code,
        "procedure_code": row.procedure_code,
        "modality": row.modality,
        "active": row.active,
    }


def create_template(
    session: Session,
    *,
    user: User,
    now: datetime,
    name: object,
    text: object,
    trust_code: object = None,
    procedure_code: object = None,
    modality: object = None,
    active: object = True,
    remote_addr: str | None = None,
) -> ReportTemplateRow:
    """A new template (managers and admins); placeholders are checked against the known ones."""
    _require_manager(user)
    name = _text(name, what="template name", limit=100).strip()
    trust_id = _trust_id_for(session, trust_code)
    if not isinstance(active, bool):
        raise InvalidInput("active must be true or false")
    row = ReportTemplateRow(
        name=name,
        trust_id=trust_id,
        procedure_code=_optional_code(procedure_code, what="procedure_code", limit=64),
        modality=_optional_code(modality, what="modality", limit=16, upper=True),
        text=check_template_text(text),
        active=active,
        created_by_id=user.id,
        created_at=now,
        updated_at=now,
    )
    _refuse_duplicate_name(session, name=name, trust_id=trust_id)
    session.add(row)
    _flush_unique(session, f"a template named {name!r}")
    code = _trust_codes(session, [trust_id]).get(trust_id) if trust_id else None
    audit.record(
        session, at=now, action="template_create", user=user, object_type="report_template",
        object_id=row.id, detail=_template_audit(row, code), remote_addr=remote_addr,
    )  # fmt: skip
    return row


def _apply_template_changes(
    session: Session, row: ReportTemplateRow, changes: Mapping[str, object]
) -> None:
    if "name" in changes:
        row.name = _text(changes["name"], what="template name", limit=100).strip()
    if "trust" in changes:
        row.trust_id = _trust_id_for(session, changes["trust"])
    if "procedure_code" in changes:
        row.procedure_code = _optional_code(
            changes["procedure_code"], what="procedure_code", limit=64
        )
    if "modality" in changes:
        row.modality = _optional_code(changes["modality"], what="modality", limit=16, upper=True)
    if "text" in changes:
        row.text = check_template_text(changes["text"])
    if "active" in changes:
        if not isinstance(changes["active"], bool):
            raise InvalidInput("active must be true or false")
        row.active = changes["active"]
    if "name" in changes or "trust" in changes:
        _refuse_duplicate_name(session, name=row.name, trust_id=row.trust_id, except_id=row.id)


def update_template(
    session: Session,
    *,
    template_id: int,
    user: User,
    now: datetime,
    changes: Mapping[str, object],
    remote_addr: str | None = None,
) -> ReportTemplateRow:
    """Change the given fields (name, text, trust, procedure_code, modality, active)."""
    _require_manager(user)
    unknown = sorted(set(changes) - set(_TEMPLATE_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)}")
    row = get_template(session, template_id=template_id, user=user, now=now)
    with session.no_autoflush:  # a half-changed row must not reach the database before checks
        _apply_template_changes(session, row, changes)
    changed = [field for field in _TEMPLATE_FIELDS if field in changes]
    row.updated_at = now
    _flush_unique(session, f"a template named {row.name!r}")
    code = _trust_codes(session, [row.trust_id]).get(row.trust_id) if row.trust_id else None
    audit.record(
        session, at=now, action="template_update", user=user, object_type="report_template",
        object_id=row.id, detail={**_template_audit(row, code), "changed": changed},
        remote_addr=remote_addr,
    )  # fmt: skip
    return row


def delete_template(
    session: Session, *, template_id: int, user: User, now: datetime, remote_addr: str | None = None
) -> None:
    """Remove a template. Signed reports keep their text: nothing refers to a template."""
    _require_manager(user)
    row = get_template(session, template_id=template_id, user=user, now=now)
    code = _trust_codes(session, [row.trust_id]).get(row.trust_id) if row.trust_id else None
    audit.record(
        session, at=now, action="template_delete", user=user, object_type="report_template",
        object_id=row.id, detail={**_template_audit(row, code), "text": row.text},
        remote_addr=remote_addr,
    )  # fmt: skip
    session.delete(row)
    session.flush()


def templates_for(session: Session, trust_id: int | None) -> list[rules.ReportTemplate]:
    """The active stored templates that may apply to a study of ``trust_id``: the trust's own
    and the region-wide ones, as domain values (oldest first, so ties go to the older)."""
    query = (
        sa.select(ReportTemplateRow, Trust.code)
        .outerjoin(Trust, Trust.id == ReportTemplateRow.trust_id)
        .where(ReportTemplateRow.active.is_(True))
        .order_by(ReportTemplateRow.id)
    )
    if trust_id is None:
        query = query.where(ReportTemplateRow.trust_id.is_(None))
    else:
        query = query.where(
            sa.or_(ReportTemplateRow.trust_id.is_(None), ReportTemplateRow.trust_id == trust_id)
        )
    return [
        rules.ReportTemplate(
            name=row.name,
            text=row.text,
            procedure_code=row.procedure_code,
            modality=row.modality,
            trust_code=code,
        )
        for row, code in session.execute(query).all()
    ]


def template_for_study(
    session: Session,
    *,
    trust_id: int | None,
    trust_code: str | None,
    procedure_code: str | None,
    modality: str | None,
    defaults: Sequence[rules.ReportTemplate] = (),
) -> rules.ReportTemplate | None:
    """The most specific stored template for the study; the built-in ``defaults`` only when no
    stored one fits (so a region that writes its own generic template replaces ours)."""
    for candidates in (templates_for(session, trust_id), defaults):
        chosen = rules.choose_template(
            candidates, procedure_code=procedure_code, modality=modality, trust_code=trust_code
        )
        if chosen is not None:
            return chosen
    return None


def template_json(row: ReportTemplateRow, trust_code: str | None) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "trust": trust_code,
        "procedure_code": row.procedure_code,
        "modality": row.modality,
        "text": row.text,
        "placeholders": list(dict.fromkeys(rules.unfilled_placeholders(row.text))),
        "active": row.active,
        "created_by_id": row.created_by_id,
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "updated_at": row.updated_at.isoformat() if row.updated_at else None,
    }


def templates_json(session: Session, rows: Sequence[ReportTemplateRow]) -> list[dict[str, Any]]:
    codes = _trust_codes(session, (r.trust_id for r in rows))
    return [template_json(r, codes.get(r.trust_id) if r.trust_id else None) for r in rows]


# --- macros -------------------------------------------------------------------------------


def _require_reporter(user: User) -> None:
    if user.role not in rules.SIGNING_ROLES:
        raise Forbidden(f"a {user.role} writes no reports, so has no macros")


def macros_of(session: Session, *, user_id: int) -> dict[str, str]:
    """The user's macros as `expand_macros` wants them: trigger word without its dot -> text."""
    rows = session.execute(
        sa.select(ReportMacro.name, ReportMacro.text).where(ReportMacro.user_id == user_id)
    ).all()
    return {name.lstrip("."): text for name, text in rows}


def expand(session: Session, *, user: User, text: object) -> str:
    """``text`` with the user's macros expanded (unknown ".words" are left alone)."""
    if not isinstance(text, str):
        raise InvalidInput("text must be a string")
    if len(text) > MAX_EXPAND_CHARS:
        raise InvalidInput(f"the text is longer than {MAX_EXPAND_CHARS} characters")
    if "." not in text:
        return text
    macros = macros_of(session, user_id=user.id)
    return rules.expand_macros(text, macros) if macros else text


def list_macros(session: Session, *, user: User) -> list[ReportMacro]:
    return list(
        session.scalars(
            sa.select(ReportMacro).where(ReportMacro.user_id == user.id).order_by(ReportMacro.name)
        )
    )


def _own_macro(session: Session, *, macro_id: int, user: User) -> ReportMacro:
    """One of the user's macros; anyone else's is "not found" (we do not say it exists)."""
    row = session.get(ReportMacro, macro_id)
    if row is None or row.user_id != user.id:
        raise NotFound(f"no macro {macro_id}")
    return row


def _refuse_nesting(
    session: Session, *, user: User, name: str, text: str, except_id: int | None
) -> None:
    """A macro's text may not hold a trigger of the user's macros (itself included), and its
    trigger may not appear in their other macros: so expanding is done in one pass and
    saving an expanded draft again never grows it."""
    others = list(
        session.execute(
            sa.select(ReportMacro.name, ReportMacro.text).where(
                ReportMacro.user_id == user.id,
                ReportMacro.id != except_id if except_id is not None else sa.true(),
            )
        ).all()
    )
    table = {other.lstrip("."): "\x00" for other, _ in others}
    table[name.lstrip(".")] = "\x00"
    if rules.expand_macros(text, table) != text:
        raise InvalidInput("a macro's text cannot use a macro trigger; write the text out")
    mine = {name.lstrip("."): "\x00"}
    for other, other_text in others:
        if rules.expand_macros(other_text, mine) != other_text:
            raise InvalidInput(f"your macro {other} uses the trigger {name}; choose another name")


def create_macro(
    session: Session, *, user: User, name: object, text: object, now: datetime
) -> ReportMacro:
    _require_reporter(user)
    name = check_macro_name(name)
    text = _text(text, what="macro text", limit=MAX_MACRO_CHARS)
    if session.scalar(
        sa.select(ReportMacro.id).where(ReportMacro.user_id == user.id, ReportMacro.name == name)
    ):
        raise Conflict(f"you already have a macro {name}")
    _refuse_nesting(session, user=user, name=name, text=text, except_id=None)
    row = ReportMacro(user_id=user.id, name=name, text=text, created_at=now, updated_at=now)
    session.add(row)
    _flush_unique(session, f"the macro {name}")
    audit.record(
        session, at=now, action="macro_create", user=user, object_type="report_macro",
        object_id=row.id, detail={"name": name},
    )  # fmt: skip
    return row


def update_macro(
    session: Session,
    *,
    user: User,
    macro_id: int,
    now: datetime,
    name: object = None,
    text: object = None,
) -> ReportMacro:
    _require_reporter(user)
    row = _own_macro(session, macro_id=macro_id, user=user)
    new_name = row.name if name is None else check_macro_name(name)
    new_text = row.text if text is None else _text(text, what="macro text", limit=MAX_MACRO_CHARS)
    if new_name != row.name and session.scalar(
        sa.select(ReportMacro.id).where(
            ReportMacro.user_id == user.id, ReportMacro.name == new_name
        )
    ):
        raise Conflict(f"you already have a macro {new_name}")
    _refuse_nesting(session, user=user, name=new_name, text=new_text, except_id=row.id)
    row.name, row.text, row.updated_at = new_name, new_text, now
    _flush_unique(session, f"the macro {new_name}")
    audit.record(
        session, at=now, action="macro_update", user=user, object_type="report_macro",
        object_id=row.id, detail={"name": new_name},
    )  # fmt: skip
    return row


def delete_macro(session: Session, *, user: User, macro_id: int, now: datetime) -> None:
    row = _own_macro(session, macro_id=macro_id, user=user)
    audit.record(
        session, at=now, action="macro_delete", user=user, object_type="report_macro",
        object_id=row.id, detail={"name": row.name},
    )  # fmt: skip
    session.delete(row)
    session.flush()


def macro_json(row: ReportMacro) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "text": row.text,
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "updated_at": row.updated_at.isoformat() if row.updated_at else None,
    }
