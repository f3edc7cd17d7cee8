"""The report lifecycle as pure rules: who may sign what, and what each signed version means.

A study's report goes draft -> preliminary (e.g. a trainee's or an out-of-hours
reporter's, to be verified) -> final (signed by a radiologist with the right to
finalise) -> addenda (after final; the signed versions are never edited). Each
signed version goes back to the trust's RIS as an ORU^R01 whose OBR-25 / OBX-11
result status (HL7 tables 0123 / 0085) says P, F or C.

Also here: report templates per procedure/modality with ``{{placeholders}}``,
personal macros, and splitting an impression out of the report text. Nothing
in this module does I/O; the service (`worklist.services.reports`) turns a
refusal into an error and owns the transaction.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from zoneinfo import ZoneInfo


class VersionKind(StrEnum):
    """What a signed report version is."""

    PRELIMINARY = "preliminary"  # needs verification; RIS sees OBR-25 P
    FINAL = "final"  # verified; RIS sees OBR-25 F
    ADDENDUM = "addendum"  # after final; the whole report is resent with OBR-25 C


# OBR-25 (table 0123) and OBX-11 (table 0085) for the ORU of each kind of version.
RESULT_STATUS: dict[VersionKind, str] = {
    VersionKind.PRELIMINARY: "P",
    VersionKind.FINAL: "F",
    VersionKind.ADDENDUM: "C",
}

# Study status (worklist.domain.study.StudyStatus values) after a version of each kind is signed.
STUDY_STATUS_AFTER: dict[VersionKind, str] = {
    VersionKind.PRELIMINARY: "preliminary",
    VersionKind.FINAL: "final",
    VersionKind.ADDENDUM: "final",
}

SIGNING_ROLES = frozenset({"radiologist", "manager"})
_STOPPED_BY_RIS = {"cancelled": "cancelled", "discontinued": "discontinued"}
_REPORTABLE_STATUSES = frozenset({"ready", "preliminary"})


def result_status(kind: VersionKind | str) -> str:
    """OBR-25 / OBX-11 for a signed version: P preliminary, F final, C addendum (correction)."""
    return RESULT_STATUS[VersionKind(kind)]


@dataclass(frozen=True)
class Signer:
    """The person asking to sign (or edit) a report."""

    user_id: int
    role: str  # radiologist | manager | admin | integration
    can_finalise: bool = False


@dataclass(frozen=True)
class StudyFacts:
    """What the rules need to know about the study being reported."""

    status: str  # a worklist.domain.study.StudyStatus value
    claimed_by_id: int | None = None
    claim_expires_at: datetime | None = None
    status_reason: str | None = None  # e.g. the cancellation reason the RIS sent (ORC-16)


@dataclass(frozen=True)
class Decision:
    """Yes, or no with a reason a person can read. ``kind`` names the refusal for the edge."""

    allowed: bool
    reason: str = ""
    kind: str = ""  # "" | "forbidden" | "conflict" | "invalid"

    def __bool__(self) -> bool:
        return self.allowed


ALLOWED = Decision(True)


def _refuse(kind: str, reason: str) -> Decision:
    return Decision(False, reason, kind)


def holds_claim(signer: Signer, study: StudyFacts, now: datetime) -> bool:
    """True when the signer's claim on the study is current (an expired lease counts as none)."""
    if study.claimed_by_id is None or study.claimed_by_id != signer.user_id:
        return False
    return study.claim_expires_at is None or study.claim_expires_at > now


def _stopped_reason(study: StudyFacts) -> Decision | None:
    word = _STOPPED_BY_RIS.get(str(study.status))
    if word is None:
        return None
    why = f": {study.status_reason}" if study.status_reason else ""
    return _refuse("conflict", f"the RIS {word} this study{why}; the report cannot be signed")


def may_edit_draft(signer: Signer, study: StudyFacts, now: datetime) -> Decision:
    """A draft belongs to the claim holder; a manager may also write it (e.g. to take it over)."""
    if signer.role not in SIGNING_ROLES:
        return _refuse("forbidden", f"a {signer.role} cannot write reports")
    stopped = _stopped_reason(study)
    if stopped is not None:
        return stopped
    if str(study.status) == "final":
        return _refuse("conflict", "the report is final; write an addendum instead")
    if signer.role != "manager" and not holds_claim(signer, study, now):
        return _refuse(
            "forbidden", "only the radiologist who holds the claim can write this report"
        )
    return ALLOWED


def may_sign(
    kind: VersionKind | str,
    signer: Signer,
    study: StudyFacts,
    signed_so_far: Sequence[VersionKind | str],
    text: str,
    now: datetime,
) -> Decision:
    """Whether ``signer`` may sign a version of ``kind`` now, and if not, why not.

    Preliminary and final need the claim (or the manager role) and a study that
    is on the worklist or has a preliminary report; final also needs
    ``can_finalise``. An addendum needs a final report and no claim (the claim
    was released when the final was signed). A study the RIS cancelled or
    discontinued is refused with the reason the RIS gave.
    """
    kind = VersionKind(kind)
    kinds = [VersionKind(k) for k in signed_so_far]
    if signer.role not in SIGNING_ROLES:
        return _refuse("forbidden", f"a {signer.role} cannot sign reports")
    if not text or not text.strip():
        return _refuse("invalid", "an empty report cannot be signed")
    stopped = _stopped_reason(study)
    if stopped is not None:
        return stopped
    has_final = VersionKind.FINAL in kinds
    if kind is VersionKind.ADDENDUM:
        if not has_final:
            return _refuse("conflict", "an addendum follows a final report; sign the report first")
        return ALLOWED
    if has_final:
        return _refuse("conflict", "the report is already final; add an addendum instead")
    if str(study.status) not in _REPORTABLE_STATUSES:
        return _refuse("conflict", f"a study that is {study.status} cannot be reported")
    if signer.role != "manager" and not holds_claim(signer, study, now):
        return _refuse("forbidden", "only the radiologist who holds the claim can sign this report")
    if kind is VersionKind.FINAL and not signer.can_finalise:
        return _refuse(
            "forbidden", "you may sign preliminary reports only; a final needs a verifier"
        )
    return ALLOWED


def study_status_after(kind: VersionKind | str) -> str:
    return STUDY_STATUS_AFTER[VersionKind(kind)]


def releases_claim(kind: VersionKind | str) -> bool:
    """Signing a preliminary or final report ends the claim; an addendum never had one."""
    return VersionKind(kind) is not VersionKind.ADDENDUM


# --- impression ---------------------------------------------------------------------------

_IMPRESSION_HEADING = re.compile(
    r"^\s*(impression|conclusion|opinion|summary)\s*:?\s*(.*)$", re.IGNORECASE
)


def split_impression(text: str) -> tuple[str, str]:
    """Split report text at its last "Impression:"/"Conclusion:"/"Opinion:" heading line.

    Returns (body, impression); impression is "" when there is no such heading.
    Trusts that want the impression in its own OBX (OBX-3 impression code) use it.
    """
    lines = normalise_newlines(text).split("\n")
    for i in range(len(lines) - 1, -1, -1):
        m = _IMPRESSION_HEADING.match(lines[i])
        if m:
            rest = [m.group(2)] if m.group(2).strip() else []
            impression = "\n".join(rest + lines[i + 1 :]).strip("\n")
            body = "\n".join(lines[:i]).rstrip("\n")
            return body, impression
    return text, ""


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- templates and macros -----------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class ReportTemplate:
    """A starting text for a report; None in a key field means "any"."""

    name: str
    text: str
    procedure_code: str | None = None
    modality: str | None = None
    trust_code: str | None = None


def choose_template(
    templates: Iterable[ReportTemplate],
    *,
    procedure_code: str | None,
    modality: str | None,
    trust_code: str | None = None,
) -> ReportTemplate | None:
    """The most specific template that fits: procedure beats modality beats generic; a
    trust-specific one beats a regional one at the same level. Ties: first given wins."""
    best: tuple[int, int] | None = None
    chosen: ReportTemplate | None = None
    for i, t in enumerate(templates):
        if t.procedure_code is not None and t.procedure_code != procedure_code:
            continue
        if t.modality is not None and (modality is None or t.modality.upper() != modality.upper()):
            continue
        if t.trust_code is not None and t.trust_code != trust_code:
            continue
        score = (
            (4 if t.procedure_code is not None else 0)
            + (2 if t.modality is not None else 0)
            + (1 if t.trust_code is not None else 0)
        )
        key = (score, -i)
        if best is None or key > best:
            best, chosen = key, t
    return chosen


@dataclass(frozen=True)
class FilledText:
    text: str
    unfilled: tuple[str, ...] = field(default=())  # placeholders with no value, left visible


def fill_placeholders(text: str, values: Mapping[str, object]) -> FilledText:
    """Replace ``{{name}}`` with values[name]; unknown or empty ones stay visible so the
    radiologist sees what still needs writing (and signing refuses nothing silently)."""
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        value = values.get(name)
        if value is None or value == "":
            if name not in missing:
                missing.append(name)
            return m.group(0)
        return str(value)

    return FilledText(_PLACEHOLDER.sub(sub, text), tuple(missing))


def unfilled_placeholders(text: str) -> list[str]:
    """Placeholders still in a text (e.g. to warn before signing)."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(text)]


_MACRO = re.compile(r"(?<![\w.])\.([A-Za-z][A-Za-z0-9_]*)\b")


def expand_macros(text: str, macros: Mapping[str, str]) -> str:
    """Expand a radiologist's personal macros: ``.normalcxr`` becomes its stored text.

    Only known macro names expand (case-insensitive), so "e.g." and ".5 cm" are left alone.
    """
    table = {name.lower(): body for name, body in macros.items()}

    def sub(m: re.Match[str]) -> str:
        return table.get(m.group(1).lower(), m.group(0))

    return _MACRO.sub(sub, text)


def template_values(
    *,
    patient_name: str = "",
    birth_date: object = None,
    procedure_name: str = "",
    modality: str = "",
    exam_time: datetime | None = None,
    clinical_details: str = "",
    radiologist: str = "",
    accession_number: str = "",
    timezone: str = "Europe/London",
) -> dict[str, object]:
    """The standard placeholders a template may use (dates as the trust's wall clock reads)."""
    if exam_time is not None and exam_time.tzinfo is not None:
        exam_time = exam_time.astimezone(ZoneInfo(timezone))
    return {
        "patient_name": patient_name,
        "birth_date": birth_date.isoformat() if hasattr(birth_date, "isoformat") else birth_date,
        "procedure": procedure_name,
        "modality": modality,
        "exam_date": exam_time.strftime("%d/%m/%Y") if exam_time else "",
        "clinical_details": clinical_details,
        "radiologist": radiologist,
        "accession_number": accession_number,
    }
