"""Auto-assignment (push): a scheduler job hands waiting studies to on-duty radiologists,
and preliminary reports waiting for verification to on-duty consultants.

Balances the effort given to each reader this session, lets every trust take turns so
that a busy trust cannot starve a quiet one, respects session capacity (stat and
critical work excepted), and explains each assignment ("why me"). Eligibility, claims
and the assignment record are the worklist engine's (`worklist.services.worklist`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from worklist.db.models import Assignment, DutySession, Study, User
from worklist.domain.eligibility import DutySlot, Radiologist, current_session, may_report
from worklist.domain.priority import tier_from_urgency
from worklist.services import verification
from worklist.services.pool import PRELIMINARY, READY, WORKLIST_ORDER, unclaimed
from worklist.services.reader_facts import held_effort, radiologist_facts
from worklist.services.worklist import (
    DEFAULT_LEASE,
    MAX_EXPLAINED_SKIPS,
    claim_patient_studies,
    conditional_claim,
    needs_double_reading,
    readings_of,
    record_assignment,
    study_to_read,
    trust_codes,
)

logger = logging.getLogger(__name__)

#: Effort a pushed-to session holds at once when its rota row sets no capacity.
DEFAULT_PUSH_CAPACITY = 4.0


@dataclass
class _Reader:
    user: User
    facts: Radiologist
    slot: DutySlot
    held: float
    assigned: float  # effort given to them in this session so far (balance)


def _session_assigned_effort(session: Session, *, user_id: int, since: datetime) -> float:
    total = session.scalar(
        sa.select(sa.func.coalesce(sa.func.sum(Study.effort), 0.0))
        .join(Assignment, Assignment.study_id == Study.id)
        .where(Assignment.user_id == user_id, Assignment.started_at >= since)
    )
    return float(total or 0.0)


def auto_assign(
    session: Session,
    *,
    now: datetime,
    lease: timedelta = DEFAULT_LEASE,
    max_assignments: int = 200,
    pool_size: int = 500,
    default_capacity: float = DEFAULT_PUSH_CAPACITY,
) -> list[Assignment]:
    """Push waiting studies to on-duty radiologists, balancing effort, serving every trust.

    Order of work: tier first; within a tier, trusts take turns (each trust's most
    urgent study, then each one's next...), so a busy trust cannot starve a quiet
    one. Each study goes to the eligible reader with the least effort given this
    session (then the least held now), up to their session capacity.
    """
    on_duty = session.scalars(
        sa.select(User)
        .join(DutySession, DutySession.user_id == User.id)
        .where(
            DutySession.starts_at <= now,
            DutySession.ends_at > now,
            User.active.is_(True),
            User.role != "integration",
        )
        .options(selectinload(User.credentials))
        .distinct()
        .order_by(User.id)
    ).all()
    readers: list[_Reader] = []
    # Every reader's held effort, capped session or not: a session without its own cap
    # is pushed to up to `default_capacity`, counting what it already holds.
    holding = held_effort(session, (user.id for user in on_duty))
    for user in on_duty:
        facts = radiologist_facts(session, user=user, now=now)
        slot = current_session(facts.sessions, now)
        if slot is None:
            continue
        if slot.capacity is None:
            slot = replace(slot, capacity=default_capacity)
        held = holding.get(user.id, 0.0)
        facts = replace(facts, sessions=(slot,), session_load=held)
        readers.append(
            _Reader(
                user, facts, slot, held,
                _session_assigned_effort(session, user_id=user.id, since=slot.starts_at),
            )
        )  # fmt: skip
    if not readers:
        return []
    # Reporting and verification work in one order: a preliminary report waiting for a
    # consultant ranks by the same urgency as a study waiting for its first report.
    waiting = [
        study
        for status in (READY, PRELIMINARY)
        for study in session.scalars(
            sa.select(Study).where(unclaimed(status)).order_by(*WORKLIST_ORDER).limit(pool_size)
        )
    ]
    pool = sorted(waiting, key=lambda s: (-s.urgency, -s.id))[:pool_size]
    codes = trust_codes(session)
    readings = readings_of(session, [s.id for s in pool if needs_double_reading(s)])
    made: list[Assignment] = []
    for turn, study in _trust_turns(pool):
        if len(made) >= max_assignments:
            break
        if study.claimed_by_id is not None:
            continue  # bundled with a same-patient study earlier in this run
        choices: list[tuple[float, float, int, _Reader]] = []
        refused: list[dict[str, Any]] = []
        verify = study.status == PRELIMINARY
        for reader in readers:
            if verify and not reader.user.can_finalise:
                continue  # only a consultant verifies a preliminary report
            candidate = study_to_read(
                study, user=reader.user, trust_code=codes.get(study.trust_id),
                readings=readings.get(study.id, ()),
            )  # fmt: skip
            verdict = may_report(replace(reader.facts, session_load=reader.held), candidate, now)
            if verdict:
                choices.append((reader.assigned, reader.held, reader.user.id, reader))
            else:
                refused.append(
                    {"user": reader.user.username, "reasons": [r.message for r in verdict.reasons]}
                )
        if not choices:
            continue
        choices.sort(key=lambda c: c[:3])
        chosen = choices[0][3]
        trust = codes.get(study.trust_id, "?")
        why = (
            f"auto-assigned{' for verification' if verify else ''}: tier "
            f"{tier_from_urgency(study.urgency)}, turn {turn + 1} for trust {trust}; you had "
            f"the least work this session ({chosen.assigned:g} effort given, "
            f"{chosen.held:g} of {chosen.slot.capacity:g} held)"
        )
        others = [
            {"user": c[3].user.username, "assigned": c[0], "held": c[1]} for c in choices[1:6]
        ]
        extra = {"other_candidates": others, "skipped": refused[:MAX_EXPLAINED_SKIPS]}
        if verify:
            assigned = verification.assign_for_verification(
                session, study=study, user=chosen.user, now=now, lease=lease, why=why,
                extra=extra,
            )  # fmt: skip
            if assigned is not None:
                made.append(assigned)
                chosen.held += study.effort
                chosen.assigned += study.effort
            continue  # a report to verify is never bundled with others
        if not conditional_claim(
            session, study=study, user_id=chosen.user.id, now=now, lease=lease
        ):
            continue
        made.append(
            record_assignment(
                session, study=study, user=chosen.user, kind="push", now=now, lease=lease,
                why=why, extra=extra,
            )
        )  # fmt: skip
        chosen.held += study.effort
        chosen.assigned += study.effort
        together = claim_patient_studies(
            session, anchor=study, user=chosen.user,
            radiologist=replace(chosen.facts, session_load=chosen.held - study.effort),
            now=now, lease=lease, kind="push", codes=codes,
        )  # fmt: skip
        for extra in together:
            chosen.held += extra.effort
            chosen.assigned += extra.effort
    return made


def _trust_turns(pool: Sequence[Study]) -> list[tuple[int, Study]]:
    """Tier first; within a tier, trusts take turns in order of their most urgent study."""
    turn_of: dict[tuple[int, int], int] = defaultdict(int)
    keyed = []
    for position, study in enumerate(pool):
        tier = tier_from_urgency(study.urgency)
        turn = turn_of[(tier, study.trust_id)]
        turn_of[(tier, study.trust_id)] += 1
        keyed.append(((tier, turn, position), turn, study))
    keyed.sort(key=lambda k: k[0])
    return [(turn, study) for _, turn, study in keyed]


def auto_assign_job(runtime: Any) -> None:
    lease = timedelta(minutes=runtime.settings.claim_lease_minutes)
    with runtime.session() as session:
        made = auto_assign(session, now=runtime.clock.now(), lease=lease)
    if made:
        logger.info("auto-assigned %d studies", len(made))
