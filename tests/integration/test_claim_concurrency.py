"""No study is ever claimed twice: many radiologists calling next case at once until the pool
is empty, on SQLite (threads) and PostgreSQL (threads, and separate processes)."""

from __future__ import annotations

import multiprocessing
import random
import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.factories import make_trust, make_user
from worklist.bootstrap import build_runtime
from worklist.clock import FixedClock
from worklist.db import driver
from worklist.db.models import Assignment, Patient, Study, User
from worklist.services import worklist as wl

STUDIES = 2000


def fill_pool(runtime, clock, readers: int) -> list[int]:
    """2,000 ready studies of distinct patients, random urgency; `readers` CT radiologists."""
    now = clock.now()
    rng = random.Random(7)
    with runtime.session() as s:
        trust = make_trust(s, now=now, code="RW6")
        users = [
            make_user(s, now=now, trusts=("RW6",), credentials=("CT",), on_duty=True).id
            for _ in range(readers)
        ]
        s.execute(
            sa.insert(Patient),
            [
                {"trust_id": trust.id, "local_id": f"P{i}", "updated_at": now}
                for i in range(STUDIES)
            ],
        )
        patient_ids = s.scalars(sa.select(Patient.id).order_by(Patient.id)).all()
        s.execute(
            sa.insert(Study),
            [
                {
                    "trust_id": trust.id, "patient_id": pid, "accession_number": f"A{i}",
                    "modality": "CT", "body_area": "HEAD", "status": "ready",
                    "status_changed_at": now, "performed_at": now - timedelta(hours=1),
                    "ready_at": now, "urgency": rng.random() * 1e10, "effort": 1.0,
                    "created_at": now, "updated_at": now,
                }
                for i, pid in enumerate(patient_ids)
            ],
        )  # fmt: skip
    if runtime.dialect == "postgresql":
        with runtime.engine.connect() as c:  # as autovacuum would after a bulk load
            c.exec_driver_sql("ANALYZE study, patient")
    return users


def claim_until_empty(runtime, user_id: int, claimed: list[int], errors: list[BaseException]):
    try:
        while True:
            with runtime.session() as s:
                user = s.get(User, user_id)
                result = wl.next_case(s, user=user, now=runtime.clock.now())
                if result.study is None:
                    return
                claimed.append(result.study.id)
                claimed.extend(t.id for t in result.together)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def run_threads(runtime, users: list[int]) -> list[int]:
    claimed: list[int] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=claim_until_empty, args=(runtime, uid, claimed, errors))
        for uid in users
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    return claimed


def assert_each_claimed_once(runtime, claimed: list[int]) -> None:
    assert len(claimed) == STUDIES
    assert len(set(claimed)) == STUDIES, "a study was claimed twice"
    with runtime.session() as s:
        free = s.scalar(sa.select(sa.func.count()).where(Study.claimed_by_id.is_(None)))
        assignments = s.execute(
            sa.select(sa.func.count(), sa.func.count(sa.distinct(Assignment.study_id)))
        ).one()
    assert free == 0
    assert tuple(assignments) == (STUDIES, STUDIES)


def test_32_threads_calling_next_case_claim_every_study_exactly_once(runtime, clock):
    users = fill_pool(runtime, clock, readers=32)
    claimed = run_threads(runtime, users)
    assert_each_claimed_once(runtime, claimed)


def _process_main(settings, now, users: list[int], out) -> None:  # type: ignore[no-untyped-def]
    runtime = build_runtime(settings, clock=FixedClock(now))
    try:
        out.put(run_threads(runtime, users))
    except BaseException as exc:  # noqa: BLE001
        out.put(exc)
    finally:
        runtime.dispose()


@pytest.mark.postgres
def test_4_processes_calling_next_case_claim_every_study_exactly_once(
    runtime, clock, settings, on_postgres
):
    if not on_postgres:
        pytest.skip("needs WORKLIST_TEST_DATABASE_URL pointing at PostgreSQL")
    users = fill_pool(runtime, clock, readers=16)
    runtime.engine.dispose()  # no inherited connections in the children
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    processes = [
        ctx.Process(target=_process_main, args=(settings, clock.now(), users[i::4], out))
        for i in range(4)
    ]
    for p in processes:
        p.start()
    results = [out.get(timeout=180) for _ in processes]
    for p in processes:
        p.join(timeout=30)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures
    assert_each_claimed_once(runtime, [sid for r in results for sid in r])


# --- PostgreSQL: the shortlist, and the locking walk behind it ------------------------------


def _most_urgent(runtime, count: int) -> list[int]:
    query = sa.select(Study.id).order_by(Study.urgency.desc(), Study.id.desc()).limit(count)
    with runtime.session() as s:
        return list(s.scalars(query))


@pytest.mark.postgres
def test_when_other_claimers_hold_every_shortlisted_study_next_case_walks_on_to_a_free_one(
    runtime, clock, on_postgres
):
    """PostgreSQL claims the first free study of a shortlist of the most urgent candidates
    (found without locking); when other claimers hold all of them, it walks the pool with
    locks and claims the next free study."""
    if not on_postgres:
        pytest.skip("PostgreSQL's row locks; SQLite serialises claims, no row is held")
    import psycopg

    (user_id,) = fill_pool(runtime, clock, readers=1)
    top = _most_urgent(runtime, wl.SHORTLIST + 1)
    dsn = runtime.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    holders = [psycopg.connect(dsn) for _ in range(wl.SHORTLIST)]
    try:
        for holder, study_id in zip(holders, top, strict=False):
            holder.execute("SELECT id FROM study WHERE id = %s FOR UPDATE", (study_id,))
        with runtime.session() as s:
            result = wl.next_case(s, user=s.get(User, user_id), now=clock.now())
            assert result.study is not None
            assert result.study.id == top[wl.SHORTLIST]
    finally:
        for holder in holders:
            holder.close()


def _recorded(monkeypatch) -> list[tuple[object, dict]]:  # type: ignore[no-untyped-def]
    """The statements (and values) run through the driver from now on, in order."""
    run: list[tuple[object, dict]] = []
    rows = driver.rows

    def recording(session, statement, params):  # type: ignore[no-untyped-def]
        run.append((statement, dict(params)))
        return rows(session, statement, params)

    monkeypatch.setattr(driver, "rows", recording)
    return run


def _claims(run: list[tuple[object, dict]], dialect: str) -> list[tuple[object, dict]]:
    """The claims among the statements run through the driver: PostgreSQL's claim
    UPDATE, SQLite's locking read of the first candidate."""
    if dialect == "postgresql":
        return [(st, p) for st, p in run if "anchor AS \n(UPDATE study" in driver.sql(st).text]
    return [
        (st, p) for st, p in run
        if getattr(st, "_for_update_arg", None) is not None
        and "study.id DESC\n LIMIT 1" in driver.sql(st, dialect).text  # not the mates' 20
    ]  # fmt: skip


def test_next_case_finds_its_candidate_in_the_ready_pools_index_alone(
    runtime, clock, on_postgres, monkeypatch
):
    """The studies a radiologist passes over (more urgent, but not theirs to report) are
    tested on ix_study_ready_pool's own columns, not read from the table one by one: an
    index-only walk, in the index's order (no sort). (A locking walk reads each from the
    table: PostgreSQL locks only rows it has read.)"""
    (user_id,) = fill_pool(runtime, clock, readers=1)
    run = _recorded(monkeypatch)
    with runtime.session() as s:
        assert wl.next_case(s, user=s.get(User, user_id), now=clock.now()).study is not None
        statement, params = _claims(run, runtime.dialect)[0]
        plan = "\n".join(driver.plan(s, statement, params))
    if on_postgres:
        assert "Index Only Scan Backward using ix_study_ready_pool" in plan, plan
        return
    assert "USING COVERING INDEX ix_study_ready_pool" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # walked in order, not sorted


@pytest.mark.postgres
def test_a_reader_with_nothing_eligible_gets_no_locking_walk_of_the_pool(
    runtime, clock, on_postgres, monkeypatch
):
    """When the index-only shortlist is empty nothing is eligible: the locking walk
    behind it (which reads every study it passes from the table) is not run. For a
    reader with nothing eligible among 100,000 waiting studies it took 50 of 85 ms."""
    if not on_postgres:
        pytest.skip("PostgreSQL's shortlist and locking walk")
    fill_pool(runtime, clock, readers=0)  # CT studies
    with runtime.session() as s:
        user_id = make_user(
            s, now=clock.now(), trusts=("RW6",), credentials=("MR",), on_duty=True
        ).id
    run = _recorded(monkeypatch)
    with runtime.session() as s:
        assert wl.next_case(s, user=s.get(User, user_id), now=clock.now()).study is None
        statement, params = _claims(run, "postgresql")[0]
        plan = driver.plan(s, statement, params, analyze=True)
        s.rollback()
    walks = [line for line in plan if "Index Scan Backward using ix_study_ready_pool" in line]
    assert walks and all("never executed" in line for line in walks), "\n".join(plan)
    assert any("Index Only Scan" in line and "ix_study_ready_pool" in line for line in plan)


@pytest.mark.postgres
def test_the_claim_reads_a_patients_waiting_studies_and_none_of_their_history(
    runtime, clock, on_postgres, monkeypatch
):
    """Next case claims the same person's other waiting studies with the one it pulls. It
    finds them through ix_study_patient_status, whose second column is the status test
    the mates query makes: a patient's reported history (2,000,000 studies in the
    benchmark, on cold pages) is never read from the table to be refused one by one."""
    if not on_postgres:
        pytest.skip("PostgreSQL's patient index (SQLite has ix_study_waiting_by_patient)")
    (user_id,) = fill_pool(runtime, clock, readers=1)
    now = clock.now()
    history = 300
    with runtime.session() as s:
        first = s.scalars(sa.select(Study).order_by(Study.urgency.desc()).limit(1)).one()
        common = {
            "trust_id": first.trust_id, "patient_id": first.patient_id, "modality": "CT",
            "body_area": "HEAD", "status_changed_at": now, "effort": 1.0, "created_at": now,
            "updated_at": now, "performed_at": now - timedelta(days=30),
        }  # fmt: skip
        s.execute(
            sa.insert(Study),
            [{**common, "accession_number": f"H{i}", "status": "reported", "urgency": 0.0}
             for i in range(history)]
            + [{**common, "accession_number": "MATE", "status": "ready", "ready_at": now,
                "urgency": 1.0}],
        )  # fmt: skip
        anchor_id = first.id
    with runtime.engine.connect() as c:
        c.exec_driver_sql("ANALYZE study")
    run = _recorded(monkeypatch)
    with runtime.session() as s:
        result = wl.next_case(s, user=s.get(User, user_id), now=now)
        assert result.study is not None and result.study.id == anchor_id
        assert [m.accession_number for m in result.together] == ["MATE"]
        statement, params = _claims(run, "postgresql")[0]
        plan = driver.plan(s, statement, params, analyze=True)
        s.rollback()
    text = "\n".join(plan)
    assert "ix_study_patient_status" in text, text
    removed = [int(line.rsplit(":", 1)[1]) for line in plan if "Rows Removed by Filter" in line]
    assert max(removed, default=0) < history, text


def test_on_sqlite_the_locking_read_walks_on_from_the_study_found_without_the_lock(
    runtime, clock, on_postgres, monkeypatch
):
    """Under the write lock SQLite does not walk again past the more urgent studies this
    reader may not report (the read without the lock did): it starts at the study that
    read found, an index range on (urgency, id)."""
    if on_postgres:
        pytest.skip("SQLite's write lock")
    (user_id,) = fill_pool(runtime, clock, readers=1)
    run = _recorded(monkeypatch)
    with runtime.session() as s:
        claimed = wl.next_case(s, user=s.get(User, user_id), now=clock.now()).study
        statement, params = _claims(run, "sqlite")[0]
        plan = "\n".join(driver.plan(s, statement, params))
    assert params["from_id"] == claimed.id
    assert "ix_study_ready_pool (status=? AND urgency<?)" in plan, plan


def test_on_sqlite_a_reader_with_nothing_eligible_never_takes_the_write_lock(
    runtime, clock, on_postgres, monkeypatch
):
    """Whether anything is eligible is read without the write lock: a reader with nothing
    eligible walked the whole pool holding it (21-33 ms at 100,000 waiting studies),
    and every other writer waited."""
    if on_postgres:
        pytest.skip("SQLite's write lock (PostgreSQL locks rows, see the test above)")
    from worklist.db import sqlite_writers

    fill_pool(runtime, clock, readers=0)  # CT studies
    with runtime.session() as s:
        nothing, something = (
            make_user(s, now=clock.now(), trusts=("RW6",), credentials=(c,), on_duty=True).id
            for c in ("MR", "CT")
        )
    turns: list[int] = []
    wait_turn = sqlite_writers.WriterQueue.wait_turn

    def counted(queue, dbapi_connection):  # type: ignore[no-untyped-def]
        turns.append(1)
        return wait_turn(queue, dbapi_connection)

    monkeypatch.setattr(sqlite_writers.WriterQueue, "wait_turn", counted)
    with runtime.session(read_committed=True) as s:  # as a web request
        assert wl.next_case(s, user=s.get(User, nothing), now=clock.now()).study is None
    assert turns == []
    with runtime.session(read_committed=True) as s:
        assert wl.next_case(s, user=s.get(User, something), now=clock.now()).study is not None
    assert turns == [1]


def test_on_sqlite_a_patients_other_studies_are_looked_up_before_the_write_lock(
    runtime, clock, on_postgres, monkeypatch
):
    """The same person's other waiting studies are read with the candidate, before the
    write lock (most claims have none, and every writer waits out the lookup); under
    it they are only claimed, by id, each if still waiting."""
    if on_postgres:
        pytest.skip("SQLite's write lock (PostgreSQL claims them in the claim statement)")
    (user_id,) = fill_pool(runtime, clock, readers=1)
    now = clock.now()
    with runtime.session() as s:
        first = s.scalars(sa.select(Study).order_by(Study.urgency.desc()).limit(1)).one()
        s.execute(
            sa.insert(Study),
            [{"trust_id": first.trust_id, "patient_id": first.patient_id, "modality": "CT",
              "body_area": "CHEST", "status": "ready", "status_changed_at": now,
              "ready_at": now, "urgency": 1.0, "effort": 1.0, "created_at": now,
              "updated_at": now, "accession_number": "MATE"}],
        )  # fmt: skip
    locked: list[bool] = []
    rows = driver.rows

    def recording(session, statement, params):  # type: ignore[no-untyped-def]
        if "LIMIT 20" in driver.sql(statement, "sqlite").text:  # the mates' lookup
            locked.append(session.connection().connection.dbapi_connection.in_transaction)
        return rows(session, statement, params)

    monkeypatch.setattr(driver, "rows", recording)
    with runtime.session(read_committed=True) as s:  # as a web request
        result = wl.next_case(s, user=s.get(User, user_id), now=now)
    assert result.study is not None and result.study.id == first.id
    assert [m.accession_number for m in result.together] == ["MATE"]
    assert locked == [False]


def test_a_connection_serving_radiologists_in_turn_plans_their_claim_once(
    runtime, clock, on_postgres, monkeypatch
):
    """Radiologists with other trusts and credentials claim through one statement, their
    trusts and credentials as parameters, compiled once per process: on PostgreSQL a web
    worker's connection, serving each in turn, has the claim prepared (parsed and planned
    once), and the plan PostgreSQL keeps for every radiologist (the generic one) still
    finds the shortlist in ix_study_ready_pool alone. With the trusts and credentials
    written into the SQL, each radiologist's claim was a statement of its own, compiled
    on their first claim in each process and, on PostgreSQL, planned on most claims."""
    fill_pool(runtime, clock, readers=0)
    mixes = [("CT",), ("CT:NEURO",), ("CT", "MR"), ("CT", "XR"), ("CT:HEAD", "US"),
             ("CT", "MR:MSK"), ("MR", "CT:NEURO")]  # fmt: skip
    with runtime.session() as s:
        make_trust(s, now=clock.now(), code="R0A")
        users = [
            make_user(s, now=clock.now(), trusts=("RW6", "R0A")[: 1 + i % 2], credentials=mix,
                      on_duty=True).id
            for i, mix in enumerate(mixes)
        ]  # fmt: skip
    run = _recorded(monkeypatch)
    for user_id in users:  # one connection: the pool has made no other
        with runtime.session() as s:
            assert wl.next_case(s, user=s.get(User, user_id), now=clock.now()).study is not None
    claims = _claims(run, runtime.dialect)
    assert len(claims) == len(users)
    assert len({id(statement) for statement, _ in claims}) == 1, "one claim for everyone"
    if not on_postgres:
        return  # compiled once; sqlite3 prepares it once per connection (its cache)
    import psycopg
    from psycopg import sql

    statement, params = claims[-1]
    # Sent as compiled ($n placeholders, through psycopg's RawCursor), whatever its length.
    text = driver.sql(statement).text
    with runtime.engine.connect() as c:
        raw = c.connection.driver_connection
        assert isinstance(raw, psycopg.Connection)
        prepared = raw.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = %s", (text,)
        ).fetchone()
        assert prepared is not None and prepared[0] == 1, "the claim is prepared"
        raw.execute("SET plan_cache_mode = force_generic_plan")
        raw.execute(sql.SQL("PREPARE generic_claim AS ") + sql.SQL(text))  # type: ignore[arg-type]
        order = driver.sql(statement).params
        values = sql.SQL(", ").join(
            sql.Literal(list(v) if isinstance(v := params[name], tuple) else v) for name in order
        )
        explain = sql.SQL("EXPLAIN EXECUTE generic_claim({})").format(values)
        plan = "\n".join(r[0] for r in raw.execute(explain))
        raw.execute("DEALLOCATE generic_claim")
        raw.execute("RESET plan_cache_mode")
        c.rollback()
    assert "Index Only Scan Backward using ix_study_ready_pool" in plan, plan
