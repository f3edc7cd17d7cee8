"""The pools' SQL against the one eligibility function, on a real database.

Next case and the worklist page find candidates with SQL (`worklist.services.pool`) and
hand out only what `may_report` allows; if the SQL ever left out a study the rules allow,
that study would never be offered. So the SQL must hold exactly the studies the
agreement, credential and exclusion rules allow.
"""

from __future__ import annotations

import itertools
import re
from datetime import date, timedelta

import pytest
import sqlalchemy as sa

from tests.factories import make_patient, make_study, make_trust, make_user
from worklist.db.models import Assignment, ReportingPermission, Study
from worklist.domain.eligibility import RefusalCode, may_report
from worklist.services import worklist as wl
from worklist.services.pool import PRELIMINARY, pool_query

MODALITIES = ("CT", "MR", "XR", "US", "MG", "NM")
AREAS = ("HEAD", "Chest", "KNEE", "BREAST", "ABDOMEN", "SPINE", "PAED", None)
BORN = (date(1970, 5, 1), date(2019, 2, 3), None)  # an adult, a child (paediatric), unknown
#: The refusals about the person and the moment, not about which study: the pools leave
#: duty and capacity to next case.
NOT_ABOUT_THE_STUDY = {RefusalCode.OFF_DUTY, RefusalCode.OVER_CAPACITY}


def _region(session, now):
    rw6, rm3, r0a, rbv = (
        make_trust(session, now=now, code=c) for c in ("RW6", "RM3", "R0A", "RBV")
    )
    reader = make_user(
        session, now=now, trusts=("RW6", "RM3"), on_duty=True,
        credentials=("CT:NEURO", "MR", "XR:CHEST", "US:MSK", "MG:BREAST", "XR:PAED"),
    )  # fmt: skip
    today, day = now.date(), timedelta(days=1)
    session.add_all(
        [  # one agreement that has ended, one that has not started yet
            ReportingPermission(user_id=reader.id, trust_id=r0a.id, ends_on=today - day),
            ReportingPermission(user_id=reader.id, trust_id=rbv.id, starts_on=today + 3 * day),
        ]
    )
    session.flush()
    return (rw6, rm3, r0a, rbv), reader


def _allowed(session, reader, studies, now, codes):
    radiologist = wl.radiologist_facts(session, user=reader, now=now)
    readings = wl.readings_of(session, [s.id for s in studies])
    allowed = set()
    for study in studies:
        facts = wl.study_to_read(
            study, user=reader, trust_code=codes[study.trust_id],
            readings=readings.get(study.id, ()),
        )  # fmt: skip
        if not (may_report(radiologist, facts, now).codes - NOT_ABOUT_THE_STUDY):
            allowed.add(study.id)
    return radiologist, allowed


def test_the_ready_pool_holds_exactly_the_studies_the_rules_allow(session, clock):
    now = clock.now()
    trusts, reader = _region(session, now)
    codes = {t.id: t.code for t in trusts}
    studies = [
        make_study(session, trust=trust, now=now, modality=modality, body_area=area,
                   patient=make_patient(session, trust=trust, now=now, birth_date=born))
        for trust, modality, area, born in itertools.product(trusts, MODALITIES, AREAS, BORN)
    ]  # fmt: skip
    # A double read this reader has already given one reading of, and one they have not.
    read_once, unread = (
        make_study(session, trust=trusts[0], now=now, modality="MG", body_area="BREAST",
                   pathway="breast_screening")
        for _ in range(2)
    )  # fmt: skip
    session.add(
        Assignment(
            study_id=read_once.id, user_id=reader.id, kind="pull", started_at=now,
            ended_at=now, end_reason="read: first reading", explanation={"reading": {"number": 1}},
        )
    )  # fmt: skip
    studies += [read_once, unread]
    for study in studies:
        wl.prioritise_study(session, study=study, now=now)
    session.flush()

    radiologist, allowed = _allowed(session, reader, studies, now, codes)
    in_sql = set(session.scalars(pool_query(radiologist, now).with_only_columns(Study.id)))

    assert in_sql == allowed
    assert unread.id in allowed and read_once.id not in allowed
    children = {s.id for s in studies if s.paediatric}
    assert children and children & allowed and children - allowed
    assert 10 < len(allowed) < len(studies) / 2  # the rules keep some and refuse most


def test_the_shared_pool_holds_what_the_written_in_pool_holds_for_every_credential_mix(
    session, clock
):
    """Next case runs the pool with the trusts and credentials as parameters
    (`shared_pool`, one SQL text for everyone); it must hold exactly what the pool with
    them written in holds, for any mix: any modality ("*"), subspecialties, paediatric,
    a quote, no area-limited credential at all, no credential, no trust."""
    from dataclasses import replace

    from worklist.db import driver
    from worklist.domain.eligibility import HeldCredential as Held
    from worklist.services.pool import pool_values, shared_pool

    now = clock.now()
    trusts, reader = _region(session, now)
    studies = [
        make_study(session, trust=trust, now=now, modality=modality, body_area=area,
                   patient=make_patient(session, trust=trust, now=now, birth_date=born))
        for trust, modality, area, born in itertools.product(trusts, MODALITIES, AREAS, BORN)
    ]  # fmt: skip
    for study in studies:
        wl.prioritise_study(session, study=study, now=now)
    session.flush()
    radiologist = wl.radiologist_facts(session, user=reader, now=now)
    mixes = [
        radiologist.credentials,
        (Held("*"),),
        (Held("*", "chest"), Held("MR", "neuro")),
        (Held("CT"), Held("XR", "paediatric")),
        (Held("MR", "KNEE') OR (1=1) OR ('"), Held("US", 'a "quoted" area')),
        (Held("MG", "breast"), Held("*", "msk")),
        (),
    ]
    held = 0
    for credentials, agreements in itertools.product(mixes, (radiologist.agreements, ())):
        mix = replace(radiologist, credentials=credentials, agreements=agreements)
        for kw in ({}, {"stat_only": True}, {"by_patient": True}):
            written_in = pool_query(mix, now, **kw).with_only_columns(Study.id)
            held_in = set(session.scalars(written_in))
            dialect = session.get_bind().dialect.name
            shared = shared_pool(dialect, **kw).with_only_columns(Study.id)
            rows = driver.rows(session, shared, pool_values(mix, now))[1]
            assert {r[0] for r in rows} == held_in, (credentials, agreements, kw)
            held += len(held_in)
    assert held  # the mixes hold studies, not only nothing


def test_the_verification_pool_applies_the_same_agreement_and_credential_rules(session, clock):
    now = clock.now()
    trusts, reader = _region(session, now)
    codes = {t.id: t.code for t in trusts}
    studies = [
        make_study(session, trust=trust, now=now, modality=modality, body_area=area,
                   status=PRELIMINARY)
        for trust, modality, area in itertools.product(trusts, MODALITIES, AREAS)
    ]  # fmt: skip
    session.flush()

    radiologist, allowed = _allowed(session, reader, studies, now, codes)
    query = pool_query(radiologist, now, status=PRELIMINARY)
    assert set(session.scalars(query.with_only_columns(Study.id))) == allowed
    assert allowed


def test_a_full_session_leaves_only_stat_and_critical_work_in_the_pool(session, clock):
    now = clock.now()
    trusts, reader = _region(session, now)
    routine = make_study(session, trust=trusts[0], now=now, modality="MR", body_area="KNEE")
    stat, timing_critical = (
        make_study(session, trust=trusts[0], now=now, modality="MR", body_area="KNEE",
                   order_priority=priority)
        for priority in ("S", "T")
    )  # fmt: skip
    for study in (routine, stat, timing_critical):
        wl.prioritise_study(session, study=study, now=now)
    session.flush()
    radiologist = wl.radiologist_facts(session, user=reader, now=now)

    def ids(**kw):
        return set(session.scalars(pool_query(radiologist, now, **kw).with_only_columns(Study.id)))

    assert ids() == {routine.id, stat.id, timing_critical.id}
    assert ids(stat_only=True) == {stat.id, timing_critical.id}


def test_a_credential_with_a_quote_in_it_is_written_into_the_sql_safely(session, clock):
    """The credentials are written into the pool's statement as literals: a quote in a
    body area is doubled, never closes the string."""
    from worklist.domain.eligibility import HeldCredential
    from worklist.services.pool import credential_clause

    trust = make_trust(session, now=clock.now(), code="RW6")
    make_study(session, trust=trust, now=clock.now(), modality="MR", body_area="HEAD")
    clause = credential_clause([HeldCredential("CT", "KNEE') OR (1=1) OR ('")])
    count = session.scalar(sa.select(sa.func.count()).select_from(Study).where(clause))
    assert count == 0


def test_postgresql_knows_how_common_a_body_area_is_in_the_credential_rules(
    session, clock, on_postgres
):
    """The credential rules test lower(body_area) IN (...): with no statistics on that
    expression PostgreSQL guessed half a percent of rows a value, and for a page filtered
    by modality it sorted thousands of rows it expected to be a hundred (migration 0006)."""
    if not on_postgres:
        pytest.skip("SQLite plans the pool by its indexes alone")
    now = clock.now()
    trust = make_trust(session, now=now, code="RW6")
    for i in range(400):
        make_study(session, trust=trust, now=now, body_area="Head" if i % 2 else "Chest")
    session.flush()
    connection = session.connection()
    connection.exec_driver_sql("ANALYZE study")
    explain = "EXPLAIN SELECT id FROM study WHERE lower(body_area) IN ('head')"
    plan = connection.exec_driver_sql(explain).scalars().first()
    expected = int(re.search(r"rows=(\d+)", plan or "").group(1))  # type: ignore[union-attr]
    assert 150 <= expected <= 250, plan
