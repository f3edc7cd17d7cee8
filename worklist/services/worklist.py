"""The regional worklist: prioritising ready studies and deciding who reports what.

Use cases that own their transaction's work (the caller commits):
  * prioritise one study / every ready study (scheduler job `reprioritise_job`);
  * a radiologist's worklist (eligible studies in order, filters, paging);
  * next case (pull): ONE atomic claim of the most urgent eligible study;
  * claim a chosen study (free-choice sessions and managers), release with a reason,
    manager assign / reassign / return to the pool;
  * leases: renew, expire (job `expire_claims_job`); claims on studies the RIS
    cancelled or held end and say why;
  * double reading; keeping a patient's unread studies with one reader.
(Auto-assignment is `worklist.services.auto_assignment`; priors `worklist.services.priors`.)

Claiming is one conditional statement: `UPDATE study SET claimed_by_id = :user ...
WHERE id = (SELECT id ... ORDER BY urgency DESC, id DESC LIMIT 1 FOR UPDATE SKIP
LOCKED) AND claimed_by_id IS NULL AND status = 'ready' RETURNING ...`. On
PostgreSQL concurrent claimers skip each other's locked rows instead of queueing;
SQLite ignores FOR UPDATE, but a transaction takes SQLite's write lock (BEGIN
IMMEDIATE, in turn: `worklist.db.sqlite_writers`) before its first write, which
serialises writers, and the conditional WHERE is the portable guarantee that no study
is claimed twice.
Every assignment, with why it was made and which studies or people were
skipped and why, is an `Assignment` row ("why me").
"""

from __future__ import annotations

import functools
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from worklist.db import driver
from worklist.db.models import (
    Assignment,
    AuditEvent,
    Patient,
    ReportingPermission,
    Study,
    Trust,
    User,
)
from worklist.domain.eligibility import (
    LONDON,
    PAEDIATRIC,
    Eligibility,
    Radiologist,
    RefusalCode,
    ReportingAgreement,
    StudyToRead,
    agreements_expiring,
    current_session,
    may_report,
)
from worklist.domain.priority import (
    DESCRIBED_KEYS,
    MAX_TIER,
    OrderFacts,
    Priority,
    RuleSet,
    default_rules,
    describe,
    described,
    effort_for,
    parse_rules_json,
    prioritise,
    tier_from_urgency,
    urgency_floor,
)
from worklist.domain.study import StudyStatus
from worklist.errors import Conflict, Forbidden, InvalidInput, NotFound
from worklist.services import accounts, audit, reader_facts
from worklist.services.pool import (
    PRELIMINARY,
    WORKLIST_ORDER,
    pool_values,
    shared_pool,
    unclaimed,
    unclaimed_unindexed,
)

logger = logging.getLogger(__name__)

READY = StudyStatus.READY.value
DEFAULT_LEASE = timedelta(minutes=30)
#: Pathway flags whose studies need two independent readings (NHS Breast Screening).
DOUBLE_READ_PATHWAYS = frozenset({"double_read", "breast_screening", "bsp"})
#: Refusals the worklist page ignores: it shows what you could report, on duty or not.
#: The most pool rows the worklist page reads in one step (an IN list of ids follows).
MAX_WALK_CHUNK = 1000
_LIST_IGNORES = frozenset({RefusalCode.OFF_DUTY, RefusalCode.OVER_CAPACITY})
_STOPPED_CLAIM_REASONS = {
    StudyStatus.CANCELLED.value: "cancelled: the RIS cancelled the order",
    StudyStatus.DISCONTINUED.value: "cancelled: the RIS discontinued the order",
    StudyStatus.ON_HOLD.value: "held: the RIS put the order on hold",
}
MAX_EXPLAINED_SKIPS = 10
#: Claims are held on ready studies, and on preliminary ones being verified.


# --- rules ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _default_rules() -> RuleSet:
    return default_rules()


@functools.lru_cache(maxsize=4)
def _rules_file(path: str, mtime: float) -> RuleSet:
    with open(path, encoding="utf-8") as handle:
        return parse_rules_json(handle.read())


def rules_for(settings: Any = None) -> RuleSet:
    """The rules in force: a JSON rules document, or the UK defaults.

    The document's path comes from `settings.priority_rules_path` when Settings has
    that field, else from WORKLIST_PRIORITY_RULES. It is re-read when the file
    changes, so a region edits its rules without a release; an invalid document
    raises PriorityRulesError listing every problem.
    """
    path = getattr(settings, "priority_rules_path", None) if settings is not None else None
    path = path or os.environ.get("WORKLIST_PRIORITY_RULES")
    if path:
        return _rules_file(str(path), os.stat(path).st_mtime)
    return _default_rules()


# --- prioritising -------------------------------------------------------------------


def order_facts(study: Study, trust_code: str | None, birth_date: date | None = None) -> OrderFacts:
    return OrderFacts(
        trust_code=trust_code,
        order_priority=study.order_priority,
        patient_class=study.patient_class,
        modality=study.modality,
        body_area=study.body_area,
        procedure_code=study.procedure_code,
        pathway=study.pathway,
        referral_at=study.referral_at,
        requested_at=study.requested_at,
        performed_at=study.performed_at,
        images_available_at=study.images_available_at,
        ready_at=study.ready_at,
        patient_birth_date=birth_date,
    )


def _priority_values(priority: Priority, effort: float) -> dict[str, Any]:
    """The study columns prioritisation sets."""
    return {
        "priority_class": priority.class_code,
        "due_at": priority.due_at,
        "urgency": priority.urgency,
        "priority_explanation": priority.explanation(),
        "effort": effort,
        "critical": priority.critical is not None,
        "paediatric": priority.paediatric,
    }


def _apply_priority(study: Study, priority: Priority, effort: float) -> bool:
    values = _priority_values(priority, effort)
    changed = any(getattr(study, name) != value for name, value in values.items())
    if changed:
        for name, value in values.items():
            setattr(study, name, value)
    return changed


def prioritise_study(
    session: Session, *, study: Study, now: datetime, rules: RuleSet | None = None
) -> Priority:
    """(Re)compute one study's class, due time, urgency, effort and explanation.

    Call when an order arrives or changes; the scheduler also sweeps every ready study.
    """
    rules = rules or rules_for()
    code, birth_date = session.execute(
        sa.select(Trust.code, Patient.birth_date)
        .select_from(Trust)
        .outerjoin(Patient, Patient.id == study.patient_id)
        .where(Trust.id == study.trust_id)
    ).one()
    facts = order_facts(study, code, birth_date)
    priority = prioritise(facts, rules, now)
    _apply_priority(study, priority, effort_for(facts, rules))
    return priority


def reprioritise(
    session: Session,
    *,
    now: datetime,
    rules: RuleSet | None = None,
    study_ids: Sequence[int] | None = None,
    batch_size: int = 2000,
) -> int:
    """Recompute every ready study (or just `study_ids`, any status); returns how many changed.

    The orders service calls it with the studies an HL7 message touched; the
    scheduler sweeps every ready study (`reprioritise_job`, a transaction per batch).
    Urgency only moves when an ageing step is crossed (or the order or rules
    changed), so most rows are read and left alone.
    """
    ids = list(study_ids) if study_ids is not None else ready_study_ids(session)
    return sum(
        reprioritise_batch(session, now=now, rules=rules, study_ids=ids[i : i + batch_size])
        for i in range(0, len(ids), batch_size)
    )


def ready_study_ids(session: Session) -> list[int]:
    """Every ready study's id (an index-only read of ix_study_status_urgency)."""
    return list(session.scalars(sa.select(Study.id).where(Study.status == READY)))


def reprioritise_batch(
    session: Session, *, now: datetime, rules: RuleSet | None, study_ids: Sequence[int]
) -> int:
    """Core reads and one executemany UPDATE of the studies whose priority changed: the
    apply worker calls this for every batch of messages, where loading ORM objects and
    flushing a row at a time cost a fifth of the batch."""
    rules = rules or rules_for()
    codes = trust_codes(session)
    session.flush()  # the rows as the unit of work has them
    rows = session.execute(
        sa.select(*_REPRIORITISE_COLUMNS, Patient.birth_date)
        .join(Patient, Patient.id == Study.patient_id)
        .where(Study.id.in_(list(study_ids)))
    )
    changes = []
    for row in rows:
        facts = order_facts(row, codes.get(row.trust_id), row.birth_date)  # type: ignore[arg-type]
        values = _priority_values(prioritise(facts, rules, now), effort_for(facts, rules))
        if any(getattr(row, name) != value for name, value in values.items()):
            changes.append((row.id, values))
    if not changes:
        return 0
    session.connection().execute(
        _PRIORITY_UPDATE,
        [{"study_id": study_id, **{f"new_{k}": v for k, v in values.items()}}
         for study_id, values in changes],
    )  # fmt: skip
    for study_id, values in changes:  # studies the session holds see what was written
        study = session.identity_map.get(session.identity_key(Study, study_id))
        if study is not None:
            for name, value in values.items():
                set_committed_value(study, name, value)
    return len(changes)


_PRIORITY_COLUMN_NAMES = (
    "priority_class", "due_at", "urgency", "priority_explanation", "effort", "critical",
    "paediatric",
)  # fmt: skip
_REPRIORITISE_COLUMNS = [
    Study.__table__.c[name]
    for name in (
        "id", "trust_id", "order_priority", "patient_class", "modality", "body_area",
        "procedure_code", "pathway", "referral_at", "requested_at", "performed_at",
        "images_available_at", "ready_at", *_PRIORITY_COLUMN_NAMES,
    )
]  # fmt: skip
_PRIORITY_UPDATE = (
    sa.update(Study.__table__)
    .where(Study.__table__.c.id == sa.bindparam("study_id"))
    .values({name: sa.bindparam(f"new_{name}") for name in _PRIORITY_COLUMN_NAMES})
)


def reprioritise_job(runtime: Any, batch_size: int = 2000) -> None:
    """The scheduler's sweep: one short transaction per batch, so that on SQLite claims
    are never held up behind the whole sweep."""
    rules = rules_for(runtime.settings)
    with runtime.session() as session:
        ids = ready_study_ids(session)
    changed = 0
    for start in range(0, len(ids), batch_size):
        with runtime.session() as session:
            changed += reprioritise_batch(
                session, now=runtime.clock.now(), rules=rules,
                study_ids=ids[start : start + batch_size],
            )  # fmt: skip
    if changed:
        logger.info("reprioritised %d of %d ready studies", changed, len(ids))


# --- studies to read -----------------------------------------------------------------


def needs_double_reading(study: Study) -> bool:
    return (study.pathway or "").strip().lower() in DOUBLE_READ_PATHWAYS


def readings_of(session: Session, study_ids: Iterable[int]) -> dict[int, list[Assignment]]:
    """Double-read readings recorded so far, per study, in order."""
    ids = list(study_ids)
    found: dict[int, list[Assignment]] = defaultdict(list)
    if not ids:
        return found
    rows = session.scalars(
        sa.select(Assignment).where(Assignment.study_id.in_(ids)).order_by(Assignment.id)
    )
    for row in rows:
        if "reading" in (row.explanation or {}):
            found[row.study_id].append(row)
    return found


def _exclusions(readings: Sequence[Assignment], user: User) -> dict[int, str]:
    excluded = {
        r.user_id: f"gave reading {r.explanation['reading']['number']} of this double read"
        for r in readings
    }
    if _double_read_stage(readings) == "arbitration" and not user.can_finalise:
        excluded.setdefault(user.id, "arbitration of a double read needs a consultant")
    return excluded


def study_to_read(
    study: Study, *, user: User, trust_code: str | None, readings: Sequence[Assignment] = ()
) -> StudyToRead:
    return StudyToRead(
        study_id=study.id,
        trust_id=study.trust_id,
        trust_code=trust_code,
        modality=study.modality,
        body_area=study.body_area,
        subspecialty=PAEDIATRIC if study.paediatric else None,
        tier=tier_from_urgency(study.urgency),
        critical=bool(study.critical),
        effort=study.effort,
        claimed_by_id=study.claimed_by_id,
        exclusions=_exclusions(readings, user) if readings else {},
    )


def trust_codes(session: Session) -> dict[int, str]:
    return dict(session.execute(sa.select(Trust.id, Trust.code)).all())


# --- the radiologist's worklist -------------------------------------------------------


@dataclass(frozen=True)
class WorklistFilters:
    trusts: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    body_areas: tuple[str, ...] = ()
    priority_classes: tuple[str, ...] = ()
    max_tier: int | None = None
    breached: bool | None = None


@dataclass
class WorklistPage:
    studies: list[Study]
    mine: list[Study]
    has_more: bool
    eligibility: Eligibility  # of the radiologist for next case right now (duty, capacity)
    free_choice: bool
    removed: list[Assignment] = field(default_factory=list)


def worklist(
    session: Session,
    *,
    user: User,
    now: datetime,
    filters: WorklistFilters | None = None,
    limit: int = 50,
    offset: int = 0,
) -> WorklistPage:
    """The studies `user` may report, in the system's order, with their own claims first."""
    filters = filters or WorklistFilters()
    radiologist = reader_facts.radiologist_facts(session, user=user, now=now)
    codes = trust_codes(session)
    dialect = session.get_bind().dialect.name
    values = pool_values(radiologist, now)
    walk_filters = _walk_filters(filters, codes)
    row_terms = _row_filters(filters, now)
    wanted = offset + limit + 1
    accepted: list[Study] = []
    if not _filters_can_match(radiologist, filters, codes, now):
        wanted = 0  # e.g. a modality they hold no credential for: skip walking the pool
    # The SQL already applies the agreement and credential rules, so nearly every row
    # fetched is shown; read a little more than a page, and more only when rows drop out.
    chunk = wanted + 10
    after: tuple[float, int] | None = None  # the last (urgency, id) walked
    while len(accepted) < wanted:
        # Ids first (ix_study_ready_pool covers that query on both databases), each chunk
        # going on from where the last stopped; then the rows that pass the filters on
        # columns outside that index.
        if after is not None:
            values["after_urgency"], values["after_id"] = after
        walk = _page_walk(dialect, walk_filters, continues=after is not None, chunk=chunk)
        walked = driver.rows(session, walk, values)[1]
        ids = [study_id for study_id, _ in walked]
        by_id = {
            s.id: s for s in session.scalars(sa.select(Study).where(Study.id.in_(ids), *row_terms))
        }
        rows = [by_id[i] for i in ids if i in by_id]
        readings = readings_of(session, [s.id for s in rows if needs_double_reading(s)])
        for study in rows:
            facts = study_to_read(
                study, user=user, trust_code=codes.get(study.trust_id),
                readings=readings.get(study.id, ()),
            )  # fmt: skip
            verdict = may_report(radiologist, facts, now)
            if not (verdict.codes - _LIST_IGNORES):
                accepted.append(study)
        if len(ids) < chunk:
            break
        after = (walked[-1][1], walked[-1][0])
        chunk = min(chunk * 2, MAX_WALK_CHUNK)
    held = session.scalars(reader_facts.held_by(user.id))
    mine = sorted(
        (s for s in held if s.status in reader_facts.HELD_STATUSES),
        key=lambda s: (-s.urgency, -s.id),
    )
    slot = current_session(radiologist.sessions, now)
    removed = session.scalars(
        sa.select(Assignment)
        .where(
            Assignment.user_id == user.id,
            Assignment.ended_at >= now - timedelta(hours=12),
            sa.or_(
                Assignment.end_reason.like("cancelled%"),
                Assignment.end_reason.like("held%"),
                Assignment.end_reason.like("discontinued%"),
                Assignment.end_reason.like("reassigned%"),
                Assignment.end_reason.like("returned%"),
                Assignment.end_reason.like("expired%"),
            ),
        )
        .order_by(Assignment.ended_at.desc())
        .limit(20)
    ).all()
    probe = StudyToRead(study_id=0, trust_id=-1, modality=None)
    duty = may_report(radiologist, probe, now)
    duty = Eligibility(
        reasons=tuple(
            r for r in duty.reasons
            if r.code in (RefusalCode.OFF_DUTY, RefusalCode.OVER_CAPACITY, RefusalCode.INACTIVE)
        ),
        session=duty.session,
    )  # fmt: skip
    return WorklistPage(
        studies=accepted[offset : offset + limit],
        mine=list(mine),
        has_more=len(accepted) > offset + limit,
        eligibility=duty,
        free_choice=bool(slot and slot.free_choice),
        removed=list(removed),
    )


def _filters_can_match(
    radiologist: Radiologist, filters: WorklistFilters, codes: dict[int, str], now: datetime
) -> bool:
    """False when a filter excludes every trust or modality the radiologist may report:
    the SQL would otherwise walk the whole ready pool to find nothing."""
    today = now.astimezone(LONDON).date()
    if filters.trusts:
        agreed = {codes.get(a.trust_id, "") for a in radiologist.agreements if a.in_force(today)}
        if not agreed & {c.upper() for c in filters.trusts}:
            return False
    if filters.modalities:
        held = {c.modality.strip().upper() for c in radiologist.credentials}
        if "*" not in held and not held & {m.upper() for m in filters.modalities}:
            return False
    return True


#: A page's filters on columns of ix_study_ready_pool: (filter, its values) pairs.
WalkFilters = tuple[tuple[str, tuple[Any, ...]], ...]


def _walk_filters(filters: WorklistFilters, codes: dict[int, str]) -> WalkFilters:
    """The page's filters on columns of ix_study_ready_pool, which the walk checks in the
    index itself, as `_page_walk` takes them."""
    found: dict[str, tuple[Any, ...]] = {}
    if filters.trusts:
        wanted = {c.upper() for c in filters.trusts}
        found["trust"] = tuple(sorted(i for i, c in codes.items() if c in wanted)) or (-1,)
    if filters.modalities:
        found["modality"] = tuple(sorted({m.upper() for m in filters.modalities}))
    if filters.body_areas:
        found["body_area"] = tuple(sorted({b.upper() for b in filters.body_areas}))
    if filters.max_tier is not None:
        found["urgency_above"] = (urgency_floor(filters.max_tier),)
    return tuple(sorted(found.items()))


@functools.lru_cache(maxsize=512)
def _page_walk(
    dialect: str, filters: WalkFilters, *, continues: bool, chunk: int
) -> sa.Select[tuple[int, float]]:
    """The page's walk of the ready pool: the next `chunk` (id, urgency), after
    (after_urgency, after_id) when it `continues`.

    Next case's statement for every radiologist (`shared_pool`), their trusts and
    credentials as parameters, so it is built once a process for each set of filters, not
    for each radiologist. The filters' values are written in, as the chunk is: a page
    offers few (its trusts, modalities, body areas, tiers), and tested as parameters on
    every row walked they cost SQLite ~25 ms more at the p99 of pages filtered to a
    body area (the walk passes many rows); written in, a prepared plan also knows them."""
    trust = Study.trust_id if dialect == "postgresql" else Study.trust_id + sa.literal_column("0")
    terms = {
        "trust": lambda values: trust.in_(values),
        "modality": lambda values: Study.modality.in_(values),
        "body_area": lambda values: sa.func.upper(Study.body_area).in_(values),
        "urgency_above": lambda values: Study.urgency > values[0],
    }
    query = shared_pool(dialect).with_only_columns(Study.id, Study.urgency)
    query = query.where(*(terms[name](values) for name, values in filters))
    if continues:
        after = sa.tuple_(
            driver.param("after_urgency", Study.urgency.type),
            driver.param("after_id", sa.Integer()),
        )
        query = query.where(sa.tuple_(Study.urgency, Study.id) < after)
    return query.limit(sa.literal_column(str(int(chunk))))


def _row_filters(filters: WorklistFilters, now: datetime) -> list[sa.ColumnElement[bool]]:
    """The filters on columns outside ix_study_ready_pool, checked on the rows the walk
    found, never in the walk: given `due_at <= now` in it, PostgreSQL underestimated the
    matches, read every row of the radiologist's pool and sorted them (0.9 s at 100,000
    ready studies) instead of walking the index in order until a page was full."""
    terms: list[sa.ColumnElement[bool]] = []
    if filters.priority_classes:
        terms.append(Study.priority_class.in_(filters.priority_classes))
    if filters.breached is True:
        terms.append(Study.due_at <= now)
    elif filters.breached is False:
        terms.append(Study.due_at > now)
    return terms


# --- claiming ----------------------------------------------------------------------------


@dataclass
class ClaimResult:
    """The outcome of next case / auto-assignment: the study claimed, or why nothing was."""

    study: Study | None
    assignment: Assignment | None = None
    reason: str = ""
    together: list[Study] = field(default_factory=list)  # same patient, claimed with it


def conditional_claim(
    session: Session, *, study: Study, user_id: int, now: datetime, lease: timedelta,
    expected_holder: int | None = None,
) -> bool:  # fmt: skip
    """The one claim statement: succeeds only if the study is still ready and free."""
    statement = _conditional_claim_update(expected_holder is not None)
    values = {"study_id": study.id, "claimer_id": user_id, "claim_now": now,
              "lease_ends": now + lease}  # fmt: skip
    if expected_holder is not None:
        values["expected_holder"] = expected_holder
    if not driver.rows(session, statement, values)[1]:
        return False
    # The row now holds exactly these values; tell the ORM without reading it back.
    for name, value in (
        ("claimed_by_id", user_id), ("claimed_at", now), ("claim_expires_at", now + lease),
        ("updated_at", now),
    ):  # fmt: skip
        set_committed_value(study, name, value)
    return True


def _claim_values() -> dict[str, Any]:
    """What a claim sets: the claimer, the time and the lease's end, as per-call values."""
    now = driver.param("claim_now", Study.claimed_at.type)
    return {
        "claimed_by_id": driver.param("claimer_id", sa.Integer()),
        "claimed_at": now,
        "claim_expires_at": driver.param("lease_ends", Study.claim_expires_at.type),
        "updated_at": now,
    }


@functools.cache
def _conditional_claim_update(expects_holder: bool) -> sa.Update:
    holder = (
        Study.claimed_by_id == driver.param("expected_holder", sa.Integer())
        if expects_holder
        else Study.claimed_by_id.is_(None)
    )
    return (
        sa.update(Study.__table__)
        .where(
            Study.id == driver.param("study_id", sa.Integer()),
            Study.status == sa.literal_column(f"'{READY}'"),
            holder,
        )
        .values(_claim_values())
        .returning(Study.id)
    )


def _open_assignment(session: Session, study_id: int) -> Assignment | None:
    return session.scalar(
        sa.select(Assignment)
        .where(Assignment.study_id == study_id, Assignment.ended_at.is_(None))
        .order_by(Assignment.id.desc())
        .limit(1)
    )


def _priority_summary(study: Study) -> dict[str, Any]:
    """The study's priority when it was handed out. The line a radiologist reads is made
    from the explanation when shown (`explained`): next case writes this summary in SQL
    (`_claim_update`), where the rules' wording cannot be."""
    return {
        "accession_number": study.accession_number,
        "tier": tier_from_urgency(study.urgency),
        "class": study.priority_class,
        "due_at": study.due_at.isoformat() if study.due_at else None,
        "explanation": described(study.priority_explanation or {}),
    }


def explained(explanation: dict[str, Any], at: datetime, tz: Any = None) -> dict[str, Any]:
    """An assignment's explanation as shown: its priority summary with the line the
    rules' explanation reads as at `at` (when it was handed out)."""
    priority = explanation.get("priority")
    if not isinstance(priority, dict) or "text" in priority:
        return explanation  # none, or written with its line (before 2026-12-07)
    rules = priority.get("explanation") or {}
    text = describe(rules, at, tz) if rules.get("due_at") else None
    return {**explanation, "priority": {**priority, "text": text}}


#: Why a patient's other waiting study went with the one pulled (Python and SQL).
SAME_PATIENT = "same patient as {}, kept with one reader"


def record_assignment(
    session: Session,
    *,
    study: Study,
    user: User,
    kind: str,
    now: datetime,
    lease: timedelta,
    why: str,
    by: User | None = None,
    extra: dict[str, Any] | None = None,
    remote_addr: str | None = None,
) -> Assignment:
    return record_assignments(
        session, [(study, why, extra or {})], user=user, kind=kind, now=now, lease=lease,
        by=by, remote_addr=remote_addr,
    )[0]  # fmt: skip


Handed = tuple[Study, str, dict[str, Any]]  # a study handed out, why, and what else to explain


def record_assignments(
    session: Session,
    handed: Sequence[Handed],
    *,
    user: User,
    kind: str,
    now: datetime,
    lease: timedelta,
    by: User | None = None,
    remote_addr: str | None = None,
) -> list[Assignment]:
    """The assignment and audit rows of studies handed to `user` at once (a study, why,
    and what else to explain), in that order."""
    action = "claim" if kind == "pull" else "assign"
    actor = by or user
    common = {
        "user_id": user.id, "kind": kind, "assigned_by_id": by.id if by else None,
        "started_at": now, "expires_at": now + lease,
    }  # fmt: skip
    explanations = [
        {"why": why, "priority": _priority_summary(study), **extra} for study, why, extra in handed
    ]
    details = [
        {"kind": kind, "to": user.username, "accession_number": study.accession_number,
         "why": why}
        for study, why, _ in handed
    ]  # fmt: skip
    if _on_postgresql(session):
        new_ids = _insert_assignments_and_audit(
            session,
            {
                **common, "at": now, "actor_id": actor.id, "actor_name": actor.username,
                "action": action, "remote_addr": remote_addr,
                "handed": driver.json([
                    {"study_id": study.id, "explanation": explanation,
                     "object_id": str(study.id), "detail": detail}
                    for (study, _, _), explanation, detail in zip(
                        handed, explanations, details, strict=True
                    )
                ]),
            },
            [study.id for study, _, _ in handed],
        )  # fmt: skip
    else:
        # SQLite: each study's two rows (no data-modifying CTEs), through the driver (the
        # same rows as the ORM and `audit.record` would write, without the unit of work's
        # bookkeeping inside the write lock).
        new_ids = []
        for (study, _, _), explanation, detail in zip(handed, explanations, details, strict=True):
            values = {**common, "study_id": study.id, "explanation": driver.json(explanation)}
            new_ids.append(driver.rows(session, _ASSIGNMENT_INSERT, values)[1][0][0])
            audit.insert(
                session, at=now, action=action, user=actor, object_type="study",
                object_id=study.id, detail=detail, remote_addr=remote_addr,
            )  # fmt: skip
    # As if loaded (no second INSERT), without the instrumented constructor's events.
    return [
        driver.loaded(session, Assignment, {
            "id": new_id, "ended_at": None, "end_reason": None, **common,
            "study_id": study.id, "explanation": explanation,
        })
        for new_id, (study, _, _), explanation in zip(new_ids, handed, explanations, strict=True)
    ]  # fmt: skip


#: What an assignment insert writes (SQLite's, see `record_assignments`; `_rows_for`).
_ASSIGNED = ("study_id", "user_id", "kind", "assigned_by_id", "started_at", "expires_at",
             "explanation")  # fmt: skip
_ASSIGNMENT_INSERT = (
    sa.insert(Assignment.__table__)
    .values({name: driver.param(name, Assignment.__table__.c[name].type) for name in _ASSIGNED})
    .returning(Assignment.__table__.c.id)
)


def _rows_for(
    source: sa.FromClause, *, study_id: sa.ColumnElement[Any], explanation: sa.ColumnElement[Any],
    object_id: sa.ColumnElement[Any], detail: sa.ColumnElement[Any],
    user_id: sa.ColumnElement[Any], kind: sa.ColumnElement[Any],
    assigned_by_id: sa.ColumnElement[Any], started_at: sa.ColumnElement[Any],
    expires_at: sa.ColumnElement[Any], at: sa.ColumnElement[Any],
    actor_id: sa.ColumnElement[Any], actor_name: sa.ColumnElement[Any],
    action: sa.ColumnElement[Any], remote_addr: sa.ColumnElement[Any],
) -> tuple[sa.CTE, sa.CTE]:  # fmt: skip
    """PostgreSQL: the assignment row (returning id, study_id, explanation) and the audit
    row (what `audit.record` writes) of each row of `source`, as two data-modifying CTEs."""
    table = Assignment.__table__
    assignment = (
        sa.insert(table)
        .from_select(
            _ASSIGNED,
            sa.select(
                study_id, user_id, kind, assigned_by_id, started_at, expires_at, explanation
            ).select_from(source),
        )  # fmt: skip
        .returning(table.c.id, table.c.study_id, table.c.explanation)
        .cte("assignment_rows")
    )
    event = audit.insert_from(
        sa.select(at, actor_id, actor_name, action, sa.literal_column("'study'"), object_id,
                  detail, remote_addr).select_from(source)
    ).cte("audit_rows")  # fmt: skip
    return assignment, event


@functools.cache
def _assignments_and_audit_insert() -> sa.Select[tuple[int, int]]:
    """Built once (building the CTEs' column collections costs more than running them).

    The per-study values go in as one JSON array of objects, made rows by
    jsonb_to_recordset: one SQL text (one prepared statement) however many studies are
    handed out together, and one JSON document to send. Four arrays, one of them of
    JSON documents, cost psycopg a third of a claim's client time in this statement."""
    table = Assignment.__table__
    handed = (
        sa.func.jsonb_to_recordset(driver.param("handed", postgresql.JSONB()))
        .table_valued(
            sa.column("study_id", sa.Integer()),
            sa.column("explanation", postgresql.JSONB()),
            sa.column("object_id", sa.String()),
            sa.column("detail", postgresql.JSONB()),
        )
        .render_derived(with_types=True)
    )
    events = AuditEvent.__table__
    common = ("user_id", "kind", "assigned_by_id", "started_at", "expires_at")
    assignment, event = _rows_for(
        handed, study_id=handed.c.study_id, explanation=handed.c.explanation,
        object_id=handed.c.object_id, detail=handed.c.detail,
        **{n: driver.param(n, table.c[n].type) for n in common},
        at=driver.param("at", events.c.at.type),
        actor_id=driver.param("actor_id", events.c.user_id.type),
        actor_name=driver.param("actor_name", events.c.username.type),
        action=driver.param("action", events.c.action.type),
        remote_addr=driver.param("remote_addr", events.c.remote_addr.type),
    )  # fmt: skip
    return sa.select(assignment.c.id, assignment.c.study_id).add_cte(event)


def _insert_assignments_and_audit(
    session: Session, values: dict[str, Any], study_ids: list[int]
) -> list[int]:
    """PostgreSQL: the assignments and their audit rows in ONE statement (two
    data-modifying CTEs), one round trip however many; the new ids, in the studies'
    order. The audit rows are those `audit.record` writes."""
    # Through the driver: nothing pending needs flushing first, and SQLAlchemy's
    # per-statement work cost more than the round trip.
    _, rows = driver.rows(session, _assignments_and_audit_insert(), values)
    by_study = {study_id: new_id for new_id, study_id in rows}
    return [by_study[study_id] for study_id in study_ids]


def next_case(
    session: Session,
    *,
    user: User,
    now: datetime,
    lease: timedelta = DEFAULT_LEASE,
    remote_addr: str | None = None,
) -> ClaimResult:
    """Pull: atomically claim the most urgent study `user` may report, or say why none.

    No cherry-picking: the order is the system's. Studies passed over on the way
    (e.g. no credential for that body area) are recorded with their reasons.

    The reader's agreements, credentials and duty sessions come from what this
    connection kept (`reader_facts.standing`); the claim statement itself checks them
    against the stored count of edits (`User.facts_version`) and claims nothing when they
    are out of date, and a refusal made without a claim statement is checked against
    facts read afresh. Either way next case starts again from facts read now.
    """
    for attempt in range(_FACTS_ATTEMPTS):
        standing, kept = reader_facts.standing(session, user_id=user.id, now=now, fresh=attempt > 0)
        result = _next_case(
            session, standing, user=user, now=now, lease=lease, remote_addr=remote_addr,
            checked=not kept,
        )  # fmt: skip
        if result is not None:
            return result
    raise Conflict("your agreements, credentials or duty sessions kept changing; try again")


#: Reads of a reader's facts before next case gives up: each is out of date only if
#: someone edited them between the read and the claim statement.
_FACTS_ATTEMPTS = 4


def _next_case(
    session: Session, standing: reader_facts.Standing, *, user: User, now: datetime,
    lease: timedelta, remote_addr: str | None, checked: bool,
) -> ClaimResult | None:  # fmt: skip
    """`next_case` with these standing facts (`checked`: read in this transaction), or
    None when they turn out to be out of date."""
    radiologist = reader_facts.radiologist_at(session, user, standing, now)
    slot = current_session(radiologist.sessions, now)
    if not radiologist.active:
        return ClaimResult(None, reason="account is not an active reporter")
    if slot is None:
        return ClaimResult(None, reason="not on a duty session now") if checked else None
    # Over the session's cap, only stat and critical work passes.
    over_capacity = slot.capacity is not None and radiologist.session_load >= slot.capacity
    # One claim statement for every radiologist, their trusts and credentials as parameters.
    dialect = session.get_bind().dialect.name
    query = shared_pool(dialect, stat_only=over_capacity)
    pool_params = standing.pool_values(radiologist, now)
    # The pool holds only trusts with an agreement, so their codes come with it.
    codes = {a.trust_id: a.trust_code or "" for a in radiologist.agreements}
    mates_pool = shared_pool(dialect, by_patient=True)
    verify_first = functools.partial(
        _verify_first, session=session, pool_params=pool_params, user=user,
        radiologist=radiologist, now=now, lease=lease, remote_addr=remote_addr,
    )  # fmt: skip
    skipped: list[dict[str, Any]] = []
    skipped_ids: list[int] = []
    while True:
        candidates = query.where(Study.id.not_in(skipped_ids)) if skipped_ids else query
        why = "the most urgent waiting study you may report"
        if skipped:
            why += f" ({len(skipped)} more urgent passed over: see skipped)"
        explanation = {"skipped": skipped[:MAX_EXPLAINED_SKIPS]}
        claim = _claim_first(
            session, candidates, mates_pool, user=user, now=now, lease=lease,
            pool_params=pool_params, facts_version=standing.version, why=why,
            skipped=explanation["skipped"], remote_addr=remote_addr,
        )  # fmt: skip
        if claim.facts_version is None:  # the account is gone
            return ClaimResult(None, reason="account is not an active reporter")
        if claim.facts_version != standing.version:
            return None  # nothing was claimed
        study, mates = claim.study, claim.mates
        if study is None:
            verify = verify_first(claim)
            if verify is not None:
                return verify
            reason = "no eligible study is waiting"
            if over_capacity:
                reason = "session capacity reached; no stat or critical study is waiting"
            return ClaimResult(None, reason=reason)
        # The SQL applied the agreement and credential rules; the one eligibility
        # function still decides (it alone knows double-read exclusions). A refusal
        # undoes the claim inside this transaction, so nobody ever sees it.
        readings = readings_of(session, [study.id]) if needs_double_reading(study) else {}
        facts = study_to_read(
            study, user=user, trust_code=codes.get(study.trust_id),
            readings=readings.get(study.id, ()),
        )  # fmt: skip
        verdict = may_report(radiologist, replace(facts, claimed_by_id=None), now)
        if verdict:
            verify = verify_first(claim)
            if verify is not None:
                return verify
            together = _kept_with(
                anchor=study, mates=mates, user=user, radiologist=radiologist, now=now,
                codes=codes,
            )  # fmt: skip
            _give_back(session, claim, [m for m in mates if m not in together], user_id=user.id)
            if claim.assignments:  # PostgreSQL: written by the claim statement
                assignment = _written_assignment(session, claim, study, user=user, lease=lease)
            else:
                assignment, *_ = record_assignments(
                    session, [(study, why, explanation), *_with_anchor(study, together)],
                    user=user, kind="pull", now=now, lease=lease, remote_addr=remote_addr,
                )  # fmt: skip
            return ClaimResult(study, assignment, why, together)
        _give_back(session, claim, [study, *mates], user_id=user.id)
        skipped_ids.append(study.id)
        skipped.append(
            {
                "study_id": study.id,
                "accession_number": study.accession_number,
                "reasons": [r.message for r in verdict.reasons],
            }
        )


def _verify_first(
    claim: _Claim, session: Session, *, pool_params: dict[str, Any], user: User,
    radiologist: Radiologist, now: datetime, lease: timedelta, remote_addr: str | None,
) -> ClaimResult | None:  # fmt: skip
    """Consultants also verify, in one order: when a preliminary report waits, the
    verification of one that ranks above the ready study `claim` holds (given back then
    with its mates; none held: any), or None."""
    if not (user.can_finalise and claim.preliminary_waits):
        return None
    from worklist.services import verification

    verify = verification.claim_if_more_urgent(
        session, than=claim.study, pool_params=pool_params, user=user,
        radiologist=radiologist, now=now, lease=lease, remote_addr=remote_addr,
    )  # fmt: skip
    if verify is not None and claim.study is not None:
        _give_back(session, claim, [claim.study, *claim.mates], user_id=user.id)
    return verify


@dataclass(frozen=True)
class _Claim:
    """What a claim statement found: the study claimed (or None) and the same person's
    other waiting studies claimed with it; the reader's count of edits to their facts as
    the database holds it (nothing is claimed unless it is the one given); and whether a
    preliminary report waits for verification."""

    study: Study | None
    mates: list[Study]
    facts_version: int | None  # None: no such account
    preliminary_waits: bool
    at: datetime
    #: PostgreSQL: each study's assignment row (id, explanation), written with the claim.
    assignments: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)


def _written_assignment(
    session: Session, claim: _Claim, study: Study, *, user: User, lease: timedelta
) -> Assignment:
    """The assignment row the claim statement wrote for `study`, as if loaded."""
    new_id, explanation = claim.assignments[study.id]
    return driver.loaded(session, Assignment, {
        "id": new_id, "study_id": study.id, "user_id": user.id, "kind": "pull",
        "assigned_by_id": None, "started_at": claim.at, "expires_at": claim.at + lease,
        "ended_at": None, "end_reason": None, "explanation": explanation,
    })  # fmt: skip


def _give_back(session: Session, claim: _Claim, studies: Sequence[Study], *, user_id: int) -> None:
    """Undo these studies' claims, and delete the rows the claim statement wrote for them
    (inside this transaction: nobody has seen them)."""
    if not studies:
        return
    for study in studies:
        _undo_claim(session, study=study, user_id=user_id)
    written = [claim.assignments[s.id][0] for s in studies if s.id in claim.assignments]
    if not written:
        return
    session.execute(sa.delete(Assignment).where(Assignment.id.in_(written)))
    session.execute(
        sa.delete(AuditEvent).where(
            AuditEvent.action == "claim", AuditEvent.object_type == "study",
            AuditEvent.object_id.in_([str(s.id) for s in studies]),
            AuditEvent.user_id == user_id, AuditEvent.at == claim.at,
        )
    )  # fmt: skip


def _claim_first(
    session: Session, candidates: sa.Select[Study], mates_pool: sa.Select[Study], *,
    user: User, now: datetime, lease: timedelta, pool_params: dict[str, Any],
    facts_version: int, why: str, skipped: list[dict[str, Any]], remote_addr: str | None,
) -> _Claim:  # fmt: skip
    """Claim the first candidate and, with it, the same person's other waiting studies
    that `mates_pool` (the same rules) offers, if the reader's facts are those of
    `facts_version`.

    UPDATE study SET claimed_by_id = :user ... WHERE id = (SELECT id ... ORDER BY urgency
    DESC, id DESC LIMIT 1 FOR UPDATE SKIP LOCKED) AND claimed_by_id IS NULL AND status =
    'ready' RETURNING study.*. PostgreSQL locks the chosen row and concurrent claimers skip
    it; SQLite ignores FOR UPDATE and serialises writers (BEGIN IMMEDIATE). Either way the
    conditional WHERE means a study is never claimed twice. On PostgreSQL the mates are
    claimed in the same statement (a second data-modifying CTE), every study claimed gets
    its assignment and audit rows there too (`why`, `skipped`, the request's address),
    and the same statement says the reader's count of edits and
    whether a preliminary report waits. SQLite's rows are written after, by
    `record_assignments`.

    SQLite, inside its write lock (which the locking read takes): the first candidate's
    id, then the claim by id, then the claim by id of the mates (86 % of claims have
    none), whose ids were read with the candidate before the lock (0.05 ms of a ~0.55 ms
    hold; read again under it only if another study than the candidate was claimed).
    An UPDATE ... RETURNING whose WHERE holds a subquery cost SQLite twice these
    statements together (0.36 against 0.18 ms for the claim), even
    when it matched nothing. The count and the waiting preliminaries are read first,
    without the lock, as the facts were before.
    """
    values = {"claimer_id": user.id, "claim_now": now, "lease_ends": now + lease,
              "facts": facts_version, **pool_params}  # fmt: skip
    if _on_postgresql(session):
        values = {**values, "why": why, "skipped": driver.json(skipped),
                  "claimer_name": user.username, "remote_addr": remote_addr}  # fmt: skip
        names, rows = driver.rows(session, _claim_update(candidates, mates_pool), values)
        study_names = names[_CLAIM_STATUS:]
        claimed = [
            (row, driver.loaded(session, Study, dict(zip(study_names, row[_CLAIM_STATUS:],
                                                         strict=True))))
            for row in rows if row[4] is not None
        ]  # fmt: skip
        return _Claim(
            next((s for row, s in claimed if not row[4]), None),
            [s for row, s in claimed if row[4]],
            rows[0][0],
            bool(rows[0][1]),
            now,
            {s.id: (row[2], row[3]) for row, s in claimed},
        )
    values = driver.as_stored_in_sqlite(values)  # before the write lock, once
    current, waiting = driver.rows(session, _claim_status(), values)[1][0]
    nothing = _Claim(None, [], current, bool(waiting), now)
    if current != facts_version:
        return nothing
    # Whether anything is eligible, read without the write lock: a reader with nothing
    # eligible walked the whole pool holding it (21-33 ms at 100,000 waiting studies),
    # and every other writer waited. The locking read then walks on from that study
    # (it may have been claimed meanwhile), not again past what this reader may not
    # report; a study made ready above it in that moment waits for the next claim.
    found = driver.rows(session, _first_unlocked(candidates), values)[1]
    if not found:
        return nothing
    candidate, urgency, patient_id = found[0]
    # Its person's other waiting studies too, without the lock (most have none): claimed
    # by id under it, each only if still waiting, when the candidate is the study claimed.
    anchor = {"anchor_id": candidate, "anchor_patient_id": patient_id}
    expected = driver.rows(session, _mates_chosen_for_anchor(mates_pool, locked=False),
                           {**values, **anchor})[1]  # fmt: skip
    values = {**values, "from_id": candidate, "from_urgency": urgency}
    first = driver.rows(session, _first_from(candidates), values)[1]
    if not first:
        return nothing
    study = _claim_by_id(session, first[0][0], values)
    if study is None:  # cannot happen while the lock is held; were it lost, nothing is claimed
        raise RuntimeError(f"study {first[0][0]} was claimed under the write lock")
    if study.id == candidate:
        claimed = (_claim_by_id(session, study_id, values) for (study_id,) in expected)
        mates = [mate for mate in claimed if mate is not None]
    else:
        mates = _claim_mates(session, mates_pool, anchor=study, values=values)
    return _Claim(study, mates, current, bool(waiting), now)


def _facts_version_now() -> sa.ScalarSelect[int]:
    """The claimer's count of edits to their facts, as stored."""
    claimer = driver.param("claimer_id", sa.Integer())
    return sa.select(User.facts_version).where(User.id == claimer).scalar_subquery()


def _preliminary_waits() -> sa.Exists:
    """Whether any preliminary report waits for verification (ix_study_verification_pool)."""
    return sa.select(Study.id).where(unclaimed(PRELIMINARY)).exists()


@functools.cache
def _claim_status() -> sa.Select[tuple[int, bool]]:
    """SQLite: the claimer's count of edits, and whether a preliminary report waits."""
    return sa.select(_facts_version_now(), _preliminary_waits())


@functools.lru_cache(maxsize=4096)
def _first_of(candidates: sa.Select[Study]) -> sa.Select[tuple[int]]:
    """The first candidate's id, locked (skipping rows another claimer holds)."""
    return (
        candidates.with_only_columns(Study.id)
        .limit(sa.literal_column("1"))  # a literal, so that a prepared plan knows it is one row
        .with_for_update(skip_locked=True)
    )


@functools.lru_cache(maxsize=4096)
def _first_unlocked(candidates: sa.Select[Study]) -> sa.Select[tuple[int, float, int]]:
    """SQLite: the first candidate's id, urgency and patient, read without the write lock."""
    return candidates.with_only_columns(Study.id, Study.urgency, Study.patient_id).limit(
        sa.literal_column("1")
    )


@functools.lru_cache(maxsize=4096)
def _first_from(candidates: sa.Select[Study]) -> sa.Select[tuple[int]]:
    """SQLite, under the write lock: the first candidate at or after (from_urgency,
    from_id) in worklist order (keyset, an index condition, as the page's walk)."""
    start = sa.tuple_(
        driver.param("from_urgency", Study.urgency.type), driver.param("from_id", sa.Integer())
    )
    return _first_of(candidates.where(sa.tuple_(Study.urgency, Study.id) <= start))


#: PostgreSQL: how many of the most urgent candidates a claim first looks among (see
#: `_shortlist_first`); more than the readers the benchmark has claiming at once.
SHORTLIST = 8


def _shortlist_first(shortlist: sa.CTE) -> sa.Select[tuple[int]]:
    """PostgreSQL: the first of the `shortlist` (the SHORTLIST most urgent candidates,
    `_claim_update`) that no other claimer holds, locked; NULL when every one is held.

    The shortlist comes from an index-only walk of ix_study_ready_pool, the rules tested
    on the index's own columns; only the shortlisted rows are read from the table and
    locked. A locking walk (`_first_of`: PostgreSQL locks only rows it has read from the
    table, so FOR UPDATE rules out an index-only scan) reads from the table every row it
    passes over, and a radiologist passes over every more urgent study they may not
    report: 504 rows (529 buffers, 1.2 ms) after 1,000 claims of one radiologist in the
    benchmark, growing with the backlog; the index-only walk read 127 buffers. The
    unclaimed test is in the locking query: PostgreSQL checks it again on a row claimed
    and committed since the walk's snapshot."""
    return (
        sa.select(Study.id)
        .where(Study.id.in_(sa.select(shortlist.c.id)), unclaimed_unindexed(READY))
        .order_by(*WORKLIST_ORDER)
        .limit(sa.literal_column("1"))
        .with_for_update(skip_locked=True)
    )


@functools.cache
def _claim_by_id_update() -> sa.Update:
    return (
        sa.update(Study.__table__)
        .where(Study.id == driver.param("study_id", sa.Integer()), unclaimed_unindexed(READY))
        .values(_claim_values())
        .returning(*Study.__table__.columns)
    )


def _claim_by_id(session: Session, study_id: int, values: dict[str, Any]) -> Study | None:
    """SQLite: claim this study by id, if still waiting."""
    names, rows = driver.rows(session, _claim_by_id_update(), {**values, "study_id": study_id})
    return driver.loaded(session, Study, dict(zip(names, rows[0], strict=True))) if rows else None


#: The columns before `study.*` in `_claim_update`'s rows: the claimer's count of edits
#: to their facts, whether a preliminary report waits, the study's new assignment row
#: (id, explanation), whether it is a mate and why it was handed out (NULL when nothing
#: was claimed).
_CLAIM_STATUS = 6


@functools.lru_cache(maxsize=4096)
def _claim_update(candidates: sa.Select[Study], mates_pool: sa.Select[Study]) -> sa.Select[Any]:
    """PostgreSQL: the claim UPDATE for a (cached) pool query, built once, for the
    driver, with the claim of the same person's waiting studies as a second CTE, and each
    study's assignment and audit rows as two more: rows of (the claimer's count of edits
    to their facts, whether a preliminary report waits, the assignment's id and
    explanation, is a mate, why, study.*), one with NULLs for the study when nothing was
    claimed. The study claimed is the first free one of the shortlist
    (`_shortlist_first`), or, only when other claimers hold all of it, of a locking walk
    of the whole pool (COALESCE and CASE: PostgreSQL runs that subquery only if needed).
    An empty shortlist means nothing is eligible: no locking walk then, which read every
    study of the pool from the table (50 of 85 ms for a reader with nothing eligible
    among 100,000 waiting studies). Nothing is claimed unless the count is the one the
    pool's values were made from.

    The rows are those `record_assignments` writes, made in SQL (`_handed_out`): a
    statement of their own was a fifth of a claim's cost at 8 claiming processes
    (975-1,094 against 860-906 claims/s with them here). What Python's eligibility then
    refuses is given back with its rows (`_give_back`)."""
    shortlist = (
        candidates.with_only_columns(Study.id)
        .limit(sa.literal_column(str(SHORTLIST)))
        .cte("shortlist")
    )
    walk = sa.case((sa.select(shortlist.c.id).exists(), _first_of(candidates).scalar_subquery()))
    first = sa.func.coalesce(_shortlist_first(shortlist).scalar_subquery(), walk)
    facts_current = _facts_version_now() == driver.param("facts", sa.Integer())
    claim = (
        sa.update(Study.__table__)
        .where(Study.id == first, unclaimed(READY), facts_current)
        .values(_claim_values())
    )
    every_column = sa.literal_column("study.*")
    anchor = claim.returning(every_column).cte("anchor")

    def of_anchor(name: str) -> sa.ScalarSelect[Any]:
        return sa.select(sa.literal_column(f"anchor.{name}")).select_from(anchor).scalar_subquery()

    mates = (
        _mates_update(
            mates_pool,
            anchor_id=of_anchor("id"),
            patient_id=of_anchor("patient_id"),
        )
        .returning(every_column)
        .cte("mates")
    )
    before, after = (sa.literal(part, sa.String()) for part in SAME_PATIENT.split("{}"))
    handed = sa.union_all(
        sa.select(
            sa.false().label("is_mate"),
            driver.param("why", sa.String()).label("why"),
            sa.literal_column("anchor.*"),
        ).select_from(anchor),
        sa.select(
            sa.true(), before + of_anchor("accession_number") + after, sa.literal_column("mates.*")
        ).select_from(mates),
    ).cte("handed")
    assignment_rows, audit_rows = _handed_out(handed, anchor_id=of_anchor("id"))
    claimed = (
        sa.select(
            sa.literal_column("assignment_rows.id").label("assignment_id"),
            sa.literal_column("assignment_rows.explanation").label("assignment_explanation"),
            sa.literal_column("handed.*"),
        )
        .select_from(handed)
        .join(assignment_rows, sa.text("assignment_rows.study_id = handed.id"))
        .subquery("claimed")
    )
    status = sa.select(_facts_version_now().label("v"), _preliminary_waits().label("w")).subquery(
        "status"
    )
    # One row however the claim went (ON true: the status, then each study claimed).
    return (
        sa.select(status.c.v, status.c.w, sa.literal_column("claimed.*"))
        .select_from(status.outerjoin(claimed, sa.true()))
        .add_cte(audit_rows)
    )


def _described(explanation: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """`priority.described` in SQL: the keys `describe` reads, those not null."""
    fields = sa.func.jsonb_each(explanation).table_valued("key", "value").alias("field")
    keys = ", ".join(f"'{k}'" for k in DESCRIBED_KEYS)
    kept = (
        sa.select(sa.func.jsonb_object_agg(fields.c.key, fields.c.value))
        .where(sa.text(f"field.key IN ({keys}) AND field.value <> 'null'::jsonb"))
        .scalar_subquery()
    )
    return sa.func.coalesce(kept, sa.literal_column("'{}'::jsonb"))


def _handed_out(handed: sa.CTE, *, anchor_id: sa.ColumnElement[int]) -> tuple[sa.CTE, sa.CTE]:
    """PostgreSQL: the assignment rows (returning id, study_id, explanation) and audit
    rows of the studies of the CTE `handed` (is_mate, why, study.*), as
    `record_assignments` writes them."""

    def column(name: str) -> sa.ColumnElement[Any]:
        return sa.literal_column(f"handed.{name}")

    at = driver.param("claim_now", sa.DateTime(timezone=True))
    claimer = driver.param("claimer_id", sa.Integer())
    urgency = column("urgency")
    tier = sa.case(
        *((urgency > sa.literal_column(repr(urgency_floor(t))), sa.literal_column(str(t)))
          for t in range(1, MAX_TIER)),
        else_=sa.literal_column(str(MAX_TIER)),
    )  # fmt: skip  # `tier_from_urgency`, by the tiers' floors
    due_at = sa.func.to_jsonb(column("due_at").op("AT TIME ZONE")(sa.literal_column("'UTC'")))
    summary = sa.func.jsonb_build_object(
        "accession_number", column("accession_number"), "tier", tier,
        "class", column("priority_class"),
        "due_at", due_at.op("#>>")(sa.literal_column("'{}'")).op("||")(
            sa.literal_column("'+00:00'")
        ),
        "explanation", _described(column("priority_explanation")),
    )  # fmt: skip
    extra = sa.case(
        (column("is_mate"), sa.func.jsonb_build_object("with_study_id", anchor_id)),
        else_=sa.func.jsonb_build_object("skipped", driver.param("skipped", postgresql.JSONB())),
    )
    explanation = sa.func.jsonb_build_object("why", column("why"), "priority", summary).op("||")(
        extra
    )
    detail = sa.func.jsonb_build_object(
        "kind", sa.literal_column("'pull'"), "to", driver.param("claimer_name", sa.String()),
        "accession_number", column("accession_number"), "why", column("why"),
    )  # fmt: skip
    events = AuditEvent.__table__
    return _rows_for(
        handed, study_id=column("id"), explanation=explanation,
        object_id=sa.cast(column("id"), sa.String()), detail=detail,
        user_id=claimer, kind=sa.literal_column("'pull'"), assigned_by_id=sa.null(),
        started_at=at, expires_at=driver.param("lease_ends", sa.DateTime(timezone=True)),
        at=at, actor_id=claimer,
        actor_name=driver.param("claimer_name", events.c.username.type),
        action=sa.literal_column("'claim'"),
        remote_addr=driver.param("remote_addr", events.c.remote_addr.type),
    )  # fmt: skip


def _mates_update(
    mates_pool: sa.Select[Study], *, anchor_id: sa.ColumnElement[int],
    patient_id: sa.ColumnElement[int],
) -> sa.Update:  # fmt: skip
    """PostgreSQL: the claim of the anchor's mates (`_mates_chosen`), for the driver."""
    chosen = _mates_chosen(mates_pool, anchor_id=anchor_id, patient_id=patient_id)
    return (
        sa.update(Study.__table__)
        .where(Study.id.in_(chosen), unclaimed_unindexed(READY))  # by id, not the pool
        .values(_claim_values())
    )


def _mates_chosen(
    mates_pool: sa.Select[Study], *, anchor_id: sa.ColumnElement[int],
    patient_id: sa.ColumnElement[int], locked: bool = True,
) -> sa.Select[tuple[int]]:  # fmt: skip
    """Up to 20 other waiting studies of the anchor's person (this patient record and
    every record sharing its valid NHS number) that `mates_pool` offers, never a
    double-read one (independent readings are never bundled). The planners reach them
    through a patient index (`shared_pool(by_patient=True)`), locked (unless not
    `locked`), skipping rows another claimer holds."""
    chosen = (
        mates_pool.with_only_columns(Study.id)
        .where(
            Study.patient_id.in_(same_person_patient_ids(patient_id)),
            Study.id != anchor_id,
            sa.func.lower(sa.func.trim(sa.func.coalesce(Study.pathway, ""))).not_in(
                [sa.literal_column(f"'{p}'") for p in sorted(DOUBLE_READ_PATHWAYS)]
            ),  # written in: an expanding parameter would be rendered at each execution
        )
        .order_by(None)
        .limit(sa.literal_column("20"))
    )
    return chosen.with_for_update(skip_locked=True, of=Study) if locked else chosen


@functools.lru_cache(maxsize=4096)
def _mates_update_for_anchor(mates_pool: sa.Select[Study]) -> sa.Update:
    return _mates_update(
        mates_pool,
        anchor_id=driver.param("anchor_id", sa.Integer()),
        patient_id=driver.param("anchor_patient_id", sa.Integer()),
    ).returning(*Study.__table__.columns)


@functools.lru_cache(maxsize=4096)
def _mates_chosen_for_anchor(
    mates_pool: sa.Select[Study], locked: bool = True
) -> sa.Select[tuple[int]]:
    return _mates_chosen(
        mates_pool,
        anchor_id=driver.param("anchor_id", sa.Integer()),
        patient_id=driver.param("anchor_patient_id", sa.Integer()),
        locked=locked,
    )


def _claim_mates(
    session: Session, mates_pool: sa.Select[Study], *, anchor: Study, values: dict[str, Any]
) -> list[Study]:
    """Claim the anchor's mates (see `_mates_chosen`) by statements of their own: on
    PostgreSQL one UPDATE; on SQLite (under its write lock) their ids, then their claim
    if there are any (see `_claim_first`)."""
    values = {**values, "anchor_id": anchor.id, "anchor_patient_id": anchor.patient_id}
    if _on_postgresql(session):
        names, rows = driver.rows(session, _mates_update_for_anchor(mates_pool), values)
        return [driver.loaded(session, Study, dict(zip(names, row, strict=True))) for row in rows]
    chosen = driver.rows(session, _mates_chosen_for_anchor(mates_pool), values)[1]
    claimed = (_claim_by_id(session, study_id, values) for (study_id,) in chosen)
    return [study for study in claimed if study is not None]


def _kept_with(
    *, anchor: Study, mates: Sequence[Study], user: User,
    radiologist: Radiologist, now: datetime, codes: dict[int, str],
) -> list[Study]:  # fmt: skip
    """The mates claimed with `anchor` that the rules let this reader keep, most urgent
    first (each counted against the session's capacity); the caller gives back the rest."""
    load = radiologist.session_load + anchor.effort
    kept = []
    for study in sorted(mates, key=lambda s: (-s.urgency, -s.id)):
        facts = replace(
            study_to_read(study, user=user, trust_code=codes.get(study.trust_id)),
            claimed_by_id=None,
        )
        if (
            not needs_double_reading(study)
            and not needs_double_reading(anchor)
            and may_report(replace(radiologist, session_load=load), facts, now)
        ):
            load += study.effort
            kept.append(study)
    return kept


def _with_anchor(anchor: Study, together: Sequence[Study]) -> list[Handed]:
    why = SAME_PATIENT.format(anchor.accession_number)
    return [(study, why, {"with_study_id": anchor.id}) for study in together]


def _on_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _undo_claim(session: Session, *, study: Study, user_id: int) -> None:
    session.execute(
        sa.update(Study)
        .where(Study.id == study.id, Study.claimed_by_id == user_id)
        .values(claimed_by_id=None, claimed_at=None, claim_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    for name in ("claimed_by_id", "claimed_at", "claim_expires_at"):
        set_committed_value(study, name, None)


def same_person_patient_ids(
    patient_id: int | sa.ColumnElement[int],
) -> sa.CompoundSelect[tuple[int]]:
    """This patient record and every record sharing its valid NHS number (any trust).

    A UNION of two index lookups: an OR of both makes SQLite scan every patient. Records
    merged by ADT need nothing here: the merge moves their studies to the survivor.
    """
    this = patient_id if isinstance(patient_id, sa.ColumnElement) else sa.literal(patient_id)
    link = sa.select(Patient.link_nhs_number).where(Patient.id == this).scalar_subquery()
    return sa.union(
        sa.select(this),
        sa.select(Patient.id).where(Patient.link_nhs_number == link),
    )


def claim_patient_studies(
    session: Session,
    *,
    anchor: Study,
    user: User,
    radiologist: Radiologist,
    now: datetime,
    lease: timedelta,
    kind: str,
    codes: dict[int, str],
    by: User | None = None,
) -> list[Study]:
    """Keep a patient's unread studies with one reader, where the rules allow."""
    values = {"claimer_id": user.id, "claim_now": now, "lease_ends": now + lease,
              **pool_values(radiologist, now)}  # fmt: skip
    mates_pool = shared_pool(session.get_bind().dialect.name, by_patient=True)
    mates = _claim_mates(session, mates_pool, anchor=anchor, values=values)
    together = _kept_with(
        anchor=anchor, mates=mates, user=user, radiologist=radiologist, now=now, codes=codes
    )
    for study in mates:
        if study not in together:
            _undo_claim(session, study=study, user_id=user.id)
    if together:
        record_assignments(
            session, _with_anchor(anchor, together), user=user, kind=kind, now=now,
            lease=lease, by=by,
        )  # fmt: skip
    return together


def visible_study(session: Session, *, study_id: int, user: User, now: datetime) -> Study:
    """The study, or NotFound if it does not exist or is of a trust `user` may not see."""
    study = session.get(Study, study_id)
    if study is None or not may_see_trust(session, user=user, trust_id=study.trust_id, now=now):
        raise NotFound(f"no study {study_id}")
    return study


def may_see_trust(session: Session, *, user: User, trust_id: int, now: datetime) -> bool:
    if user.role in accounts.SEES_EVERY_TRUST:
        return True
    today = now.astimezone(LONDON).date()
    return (
        session.scalar(
            sa.select(ReportingPermission.id).where(
                accounts.permission_in_force(user.id, today),
                ReportingPermission.trust_id == trust_id,
            )
        )
        is not None
    )


def get_study(
    session: Session, *, study_id: int, user: User, now: datetime, remote_addr: str | None = None
) -> Study:
    """A study the user may see; the view of the patient record is audited."""
    study = visible_study(session, study_id=study_id, user=user, now=now)
    audit.record(
        session, at=now, action="view_study", user=user, object_type="study", object_id=study.id,
        detail={"accession_number": study.accession_number, "patient_id": study.patient_id},
        remote_addr=remote_addr,
    )  # fmt: skip
    return study


def assignment_history(session: Session, *, study_id: int) -> list[Assignment]:
    """Every claim of a study with how and why it was made and how it ended."""
    return list(
        session.scalars(
            sa.select(Assignment).where(Assignment.study_id == study_id).order_by(Assignment.id)
        )
    )


def claim_study(
    session: Session,
    *,
    study_id: int,
    user: User,
    now: datetime,
    lease: timedelta = DEFAULT_LEASE,
    remote_addr: str | None = None,
) -> Assignment:
    """Claim a chosen study: allowed in a free-choice session, or for managers.

    Claiming a study one already holds renews its lease.
    """
    study = visible_study(session, study_id=study_id, user=user, now=now)
    if study.status == StudyStatus.PRELIMINARY.value:  # a consultant verifying it
        from worklist.services import verification

        return verification.claim_for_verification(
            session, study=study, user=user, now=now, lease=lease, remote_addr=remote_addr
        )
    if study.claimed_by_id == user.id:
        renew_claim(session, study_id=study.id, user=user, now=now, lease=lease)
        current = _open_assignment(session, study.id)
        assert current is not None
        return current
    radiologist = reader_facts.radiologist_facts(session, user=user, now=now)
    slot = current_session(radiologist.sessions, now)
    if user.role not in ("manager", "admin") and not (slot and slot.free_choice):
        raise Forbidden(
            "choosing a study needs a free-choice session; "
            "use next case (the order is the system's)"
        )
    verdict = _eligibility(session, study=study, user=user, radiologist=radiologist, now=now)
    if not verdict:
        raise Conflict(f"you may not report this study: {verdict.explain()}")
    if not conditional_claim(session, study=study, user_id=user.id, now=now, lease=lease):
        raise Conflict("the study was claimed by someone else or is no longer ready")
    assignment = record_assignment(
        session, study=study, user=user, kind="pull", now=now, lease=lease,
        why="chosen from the worklist" + (" (free-choice session)" if slot and slot.free_choice
                                          else " by a manager"),
        remote_addr=remote_addr,
    )  # fmt: skip
    claim_patient_studies(
        session, anchor=study, user=user, radiologist=radiologist, now=now, lease=lease,
        kind="pull", codes=trust_codes(session),
    )  # fmt: skip
    return assignment


def _eligibility(
    session: Session, *, study: Study, user: User, radiologist: Radiologist, now: datetime,
    ignore_claim: bool = False,
) -> Eligibility:  # fmt: skip
    readings = readings_of(session, [study.id]) if needs_double_reading(study) else {}
    code = session.scalar(sa.select(Trust.code).where(Trust.id == study.trust_id))
    facts = study_to_read(study, user=user, trust_code=code, readings=readings.get(study.id, ()))
    if ignore_claim:
        facts = replace(facts, claimed_by_id=None)
    return may_report(radiologist, facts, now)


def eligibility_for(session: Session, *, study: Study, user: User, now: datetime) -> Eligibility:
    """Whether `user` may be given `study` now, and every reason why not."""
    radiologist = reader_facts.radiologist_facts(session, user=user, now=now)
    return _eligibility(session, study=study, user=user, radiologist=radiologist, now=now)


def renew_claim(
    session: Session, *, study_id: int, user: User, now: datetime, lease: timedelta = DEFAULT_LEASE
) -> Study:
    """Extend the lease while the radiologist works on the report (the editor calls this)."""
    result = session.execute(
        sa.update(Study)
        .where(
            Study.id == study_id,
            Study.claimed_by_id == user.id,
            Study.status.in_((READY, StudyStatus.PRELIMINARY.value)),  # a verification claim too
        )
        .values(claim_expires_at=now + lease, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict("you do not hold a claim on this study (it may have expired)")
    current = _open_assignment(session, study_id)
    if current is not None:
        current.expires_at = now + lease
    study = session.get(Study, study_id)
    assert study is not None
    session.refresh(study)
    return study


def end_claim(
    session: Session,
    *,
    study: Study,
    now: datetime,
    end_reason: str,
    expected_holder: int | None = None,
) -> bool:
    """Take a study off its holder's list and record why (released, expired, signed, ...).

    The one place a claim ends: reports call it with "signed", orders with
    "cancelled: ..." / "held: ...". Returns False when nobody held it.
    """
    holder_clause = (
        Study.claimed_by_id.is_not(None)
        if expected_holder is None
        else Study.claimed_by_id == expected_holder
    )
    result = session.execute(
        sa.update(Study)
        .where(Study.id == study.id, holder_clause)
        .values(claimed_by_id=None, claimed_at=None, claim_expires_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    for row in session.scalars(
        sa.select(Assignment).where(Assignment.study_id == study.id, Assignment.ended_at.is_(None))
    ):
        row.ended_at = now
        row.end_reason = end_reason[:200]
    session.refresh(study)
    return True


def release_claim(
    session: Session,
    *,
    study_id: int,
    user: User,
    reason: str,
    now: datetime,
    remote_addr: str | None = None,
) -> Study:
    """A radiologist hands a study back to the pool, saying why."""
    if not reason or not reason.strip():
        raise InvalidInput("say why you are releasing the study")
    study = visible_study(session, study_id=study_id, user=user, now=now)
    if not end_claim(
        session, study=study, now=now, end_reason=f"released: {reason.strip()}",
        expected_holder=user.id,
    ):  # fmt: skip
        raise Conflict("you do not hold a claim on this study")
    audit.record(
        session, at=now, action="release", user=user, object_type="study", object_id=study.id,
        detail={"reason": reason.strip()}, remote_addr=remote_addr,
    )  # fmt: skip
    return study


def _require_manager(user: User) -> None:
    if user.role not in ("manager", "admin"):
        raise Forbidden("assigning work is for managers")


def assign_study(
    session: Session,
    *,
    study_id: int,
    to_user: User,
    by: User,
    now: datetime,
    lease: timedelta = DEFAULT_LEASE,
    note: str | None = None,
    remote_addr: str | None = None,
) -> Assignment:
    """Manager assigns (or reassigns) a study; every eligibility rule must still say yes."""
    _require_manager(by)
    study = session.get(Study, study_id)
    if study is None:
        raise NotFound(f"no study {study_id}")
    if study.status != READY:
        raise Conflict(f"a study that is {study.status} cannot be assigned")
    if study.claimed_by_id == to_user.id:
        raise Conflict(f"{to_user.username} already holds this study")
    verdict = eligibility_for(session, study=study, user=to_user, now=now)
    blocking = [r for r in verdict.reasons if r.code != RefusalCode.CLAIMED_BY_OTHER]
    if blocking:
        raise Conflict(
            f"{to_user.username} may not report this study: "
            + "; ".join(r.message for r in blocking)
        )
    previous = study.claimed_by_id
    previous_name = None
    if previous is not None:
        previous_user = session.get(User, previous)
        previous_name = previous_user.username if previous_user else str(previous)
        if not end_claim(
            session, study=study, now=now, expected_holder=previous,
            end_reason=f"reassigned to {to_user.username} by {by.username}",
        ):  # fmt: skip
            raise Conflict("the claim changed meanwhile; try again")
    if not conditional_claim(session, study=study, user_id=to_user.id, now=now, lease=lease):
        raise Conflict("the study was claimed meanwhile; try again")
    why = f"assigned by {by.username}"
    if previous_name:
        why = f"reassigned from {previous_name} by {by.username}"
    if note:
        why += f": {note}"
    return record_assignment(
        session, study=study, user=to_user, kind="manual", now=now, lease=lease, why=why, by=by,
        remote_addr=remote_addr,
    )  # fmt: skip


def return_to_pool(
    session: Session,
    *,
    study_id: int,
    by: User,
    reason: str,
    now: datetime,
    remote_addr: str | None = None,
) -> Study:
    """Manager takes a study off whoever holds it and puts it back in the shared pool."""
    _require_manager(by)
    if not reason or not reason.strip():
        raise InvalidInput("say why the study goes back to the pool")
    study = session.get(Study, study_id)
    if study is None:
        raise NotFound(f"no study {study_id}")
    if not end_claim(
        session, study=study, now=now,
        end_reason=f"returned to the pool by {by.username}: {reason.strip()}",
    ):  # fmt: skip
        raise Conflict("nobody holds this study")
    audit.record(
        session, at=now, action="return_to_pool", user=by, object_type="study",
        object_id=study.id, detail={"reason": reason.strip()}, remote_addr=remote_addr,
    )  # fmt: skip
    return study


# --- leases and claims the RIS overtook ----------------------------------------------


def expire_claims(session: Session, *, now: datetime) -> int:
    """Return expired leases to the pool, and end claims on studies the RIS cancelled or held.

    Each claim ends with a conditional update, so a lease renewed meanwhile stays.
    """
    ended = 0
    expired = session.scalars(
        sa.select(Study).where(Study.claimed_by_id.is_not(None), Study.claim_expires_at <= now)
    ).all()
    for study in expired:
        result = session.execute(
            sa.update(Study)
            .where(
                Study.id == study.id,
                Study.claim_expires_at <= now,
                Study.claimed_by_id == study.claimed_by_id,
            )  # fmt: skip
            .values(claimed_by_id=None, claimed_at=None, claim_expires_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            for row in session.scalars(
                sa.select(Assignment).where(
                    Assignment.study_id == study.id, Assignment.ended_at.is_(None)
                )
            ):
                row.ended_at = now
                row.end_reason = "expired: nobody worked on it within the lease"
            session.refresh(study)
            ended += 1
    overtaken = session.scalars(
        sa.select(Study).where(
            Study.claimed_by_id.is_not(None), Study.status.in_(list(_STOPPED_CLAIM_REASONS))
        )
    ).all()
    for study in overtaken:
        if end_claim(
            session, study=study, now=now, end_reason=_STOPPED_CLAIM_REASONS[study.status]
        ):
            ended += 1
    return ended


def expire_claims_job(runtime: Any) -> None:
    with runtime.session() as session:
        ended = expire_claims(session, now=runtime.clock.now())
    if ended:
        logger.info("ended %d claims (expired leases, cancelled or held studies)", ended)


# --- double reading -----------------------------------------------------------------------


def _double_read_stage(readings: Sequence[Assignment]) -> str:
    """first | second | agreed | arbitration | arbitrated"""
    opinions = [r.explanation["reading"] for r in readings]
    if not opinions:
        return "first"
    if len(opinions) == 1:
        return "second"
    if any(o.get("arbitration") for o in opinions):
        return "arbitrated"
    first, second = opinions[0]["outcome"], opinions[1]["outcome"]
    return "agreed" if first == second else "arbitration"


def record_reading(
    session: Session,
    *,
    study_id: int,
    user: User,
    outcome: str,
    now: datetime,
    remote_addr: str | None = None,
) -> str:
    """Record one independent reading of a double-read study; returns the next stage.

    Reading 1 returns the study to the pool for a different reader. If reading 2
    agrees, its reader keeps the study to sign the report; if not, it goes to
    arbitration by a third radiologist (a consultant), who keeps it to sign.
    """
    outcome = (outcome or "").strip().lower()
    if not outcome:
        raise InvalidInput("a reading needs an outcome (e.g. normal, recall)")
    study = visible_study(session, study_id=study_id, user=user, now=now)
    if not needs_double_reading(study):
        raise Conflict("this study is not on a double-reading pathway")
    if study.claimed_by_id != user.id:
        raise Conflict("claim the study before recording a reading")
    readings = readings_of(session, [study.id]).get(study.id, [])
    stage = _double_read_stage(readings)
    if stage in ("agreed", "arbitrated"):
        raise Conflict("both readings are in; sign the report")
    current = _open_assignment(session, study.id)
    assert current is not None
    reading = {"number": len(readings) + 1, "outcome": outcome, "at": now.isoformat()}
    if stage == "arbitration":
        reading["arbitration"] = True
    current.explanation = {**(current.explanation or {}), "reading": reading}
    session.flush()
    next_stage = _double_read_stage([*readings, current])
    if next_stage in ("second", "arbitration"):
        end_claim(
            session, study=study, now=now, expected_holder=user.id,
            end_reason=f"read: reading {reading['number']} recorded",
        )  # fmt: skip
    audit.record(
        session, at=now, action="double_read", user=user, object_type="study",
        object_id=study.id, detail={"reading": reading, "next": next_stage},
        remote_addr=remote_addr,
    )  # fmt: skip
    return next_stage


# --- reporting agreements ---------------------------------------------------------------


def expiring_agreements(
    session: Session, *, now: datetime, within: timedelta = timedelta(days=30)
) -> list[tuple[ReportingAgreement, str]]:
    """Agreements in force that end within `within`, soonest first, with the username.

    For the manager's warning before a radiologist silently drops out of a trust's pool.
    """
    rows = session.execute(
        sa.select(
            ReportingPermission.trust_id,
            ReportingPermission.starts_on,
            ReportingPermission.ends_on,
            Trust.code,
            ReportingPermission.user_id,
            User.username,
        )
        .join(Trust, Trust.id == ReportingPermission.trust_id)
        .join(User, User.id == ReportingPermission.user_id)
        .where(ReportingPermission.ends_on.is_not(None), User.active.is_(True))
    ).all()
    names = {}
    agreements = []
    for trust_id, starts_on, ends_on, code, user_id, username in rows:
        agreements.append(ReportingAgreement(trust_id, starts_on, ends_on, code, user_id))
        names[user_id] = username
    soon = agreements_expiring(agreements, now.astimezone(LONDON).date(), within)
    return [(a, names[a.user_id]) for a in soon if a.user_id is not None]
