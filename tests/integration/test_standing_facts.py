"""Next case keeps a reader's agreements, credentials and duty sessions per connection,
and any edit to them, by whatever writes the tables, takes effect on the next claim."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.factories import make_study, make_trust, make_user
from worklist.bootstrap import Runtime, build_runtime
from worklist.db import driver
from worklist.db.models import Credential, DutySession, ReportingPermission, Study, Trust, User
from worklist.services import accounts, reader_facts
from worklist.services import worklist as wl


@pytest.fixture
def admin(settings, clock) -> Iterator[Runtime]:
    """Another process (the admin pages, the CLI) writing to the same database."""
    rt = build_runtime(settings, clock=clock)
    yield rt
    rt.dispose()


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """One entry each time a reader's standing facts are read from the database."""
    seen: list[int] = []
    rows = driver.rows

    def counted(session, statement, params):  # type: ignore[no-untyped-def]
        if statement is reader_facts._standing_query():
            seen.append(params["user_id"])
        return rows(session, statement, params)

    monkeypatch.setattr(driver, "rows", counted)
    return seen


def setup(runtime: Runtime, clock, *, trusts=("RW6",), on_duty=True, studies=3) -> int:
    with runtime.session() as s:
        rw6 = make_trust(s, now=clock.now(), code="RW6")
        make_trust(s, now=clock.now(), code="RM3")
        reader = make_user(s, now=clock.now(), trusts=trusts, credentials=("CT:NEURO",),
                           on_duty=on_duty)  # fmt: skip
        for hours in range(studies):
            study = make_study(s, trust=rw6, now=clock.now(), performed_ago=timedelta(hours=hours))
            wl.prioritise_study(s, study=study, now=clock.now())
        return reader.id


def next_case(runtime: Runtime, clock, user_id: int) -> wl.ClaimResult:
    with runtime.session(read_committed=True) as s:  # as a web request
        return wl.next_case(s, user=accounts.get_user(s, user_id), now=clock.now())


def test_a_connection_reads_a_readers_standing_facts_once(runtime, clock, reads):
    reader = setup(runtime, clock)
    assert next_case(runtime, clock, reader).study is not None
    assert next_case(runtime, clock, reader).study is not None
    assert reads == [reader]


def test_the_pool_statements_values_are_made_once_from_kept_facts(runtime, clock, monkeypatch):
    made = []
    pool_values = reader_facts.pool_values

    def counted(radiologist, now):  # type: ignore[no-untyped-def]
        made.append(radiologist.user_id)
        return pool_values(radiologist, now)

    monkeypatch.setattr(reader_facts, "pool_values", counted)
    reader = setup(runtime, clock)
    assert next_case(runtime, clock, reader).study is not None
    assert next_case(runtime, clock, reader).study is not None
    assert made == [reader]


def test_the_facts_are_read_again_once_their_horizon_has_passed(runtime, clock, reads):
    reader = setup(runtime, clock)
    assert next_case(runtime, clock, reader).study is not None
    clock.advance(reader_facts.FACTS_HORIZON)
    assert next_case(runtime, clock, reader).study is not None
    assert reads == [reader, reader]


def revoke_agreement(s, reader: int, now) -> None:
    s.execute(sa.delete(ReportingPermission).where(ReportingPermission.user_id == reader))


def remove_credential(s, reader: int, now) -> None:
    s.execute(sa.delete(Credential).where(Credential.user_id == reader))


def end_duty(s, reader: int, now) -> None:
    s.execute(sa.update(DutySession).where(DutySession.user_id == reader).values(ends_at=now))


@pytest.mark.parametrize(
    "edit, reason",
    [
        (revoke_agreement, "no eligible study is waiting"),
        (remove_credential, "no eligible study is waiting"),
        (end_duty, "not on a duty session now"),
    ],
    ids=["agreement revoked", "credential removed", "duty session ended"],
)
def test_an_edit_elsewhere_stops_the_next_claim(
    runtime, admin, clock, edit: Callable[..., None], reason: str
):
    """The first claim keeps the facts; an admin's edit through another connection
    makes the second claim, with kept facts that would still allow it, refuse."""
    reader = setup(runtime, clock)
    assert next_case(runtime, clock, reader).study is not None
    clock.advance(timedelta(minutes=1))
    with admin.session() as s:
        edit(s, reader, clock.now())
    refused = next_case(runtime, clock, reader)
    assert refused.study is None
    assert refused.reason == reason


def test_a_duty_session_added_elsewhere_lets_the_next_claim_through(runtime, admin, clock):
    """A refusal made on kept facts (off duty) is checked against the stored ones."""
    reader = setup(runtime, clock, on_duty=False)
    assert next_case(runtime, clock, reader).reason == "not on a duty session now"
    with admin.session() as s:
        s.add(DutySession(user_id=reader, starts_at=clock.now() - timedelta(hours=1),
                          ends_at=clock.now() + timedelta(hours=4)))  # fmt: skip
    assert next_case(runtime, clock, reader).study is not None


def test_an_agreement_added_elsewhere_lets_the_next_claim_through(runtime, admin, clock):
    """The claim statement checks the kept facts: with no agreement for RW6 nothing was
    eligible; after one is added, the same connection's next claim finds the study."""
    reader = setup(runtime, clock, trusts=("RM3",))
    assert next_case(runtime, clock, reader).reason == "no eligible study is waiting"
    with admin.session() as s:
        rw6 = s.scalars(sa.select(Trust).where(Trust.code == "RW6")).one()
        s.add(ReportingPermission(user_id=reader, trust_id=rw6.id))
    assert next_case(runtime, clock, reader).study is not None


def test_every_edit_to_a_readers_facts_is_counted(runtime, clock):
    """The database's triggers (migration 0011) count inserts, updates and deletes of
    agreements, credentials and duty sessions, and a change of a trust's code for each
    reader with an agreement for it; other readers' counts do not move."""
    reader = setup(runtime, clock, trusts=("RW6", "RM3"))
    with runtime.session() as s:
        other = make_user(s, now=clock.now(), trusts=("RM3",), credentials=("MR",)).id

    def counts() -> tuple[int, int]:
        with runtime.session() as s:
            got = dict(s.execute(sa.select(User.id, User.facts_version)).all())
            return got[reader], got[other]

    edits = [
        sa.insert(Credential).values(user_id=reader, modality="MR", body_area=None),
        sa.update(Credential).where(Credential.modality == "MR", Credential.user_id == reader)
        .values(body_area="HEAD"),
        sa.delete(Credential).where(Credential.modality == "MR", Credential.user_id == reader),
        sa.update(ReportingPermission).where(ReportingPermission.user_id == reader)
        .values(ends_on=clock.now().date()),
        sa.update(DutySession).where(DutySession.user_id == reader).values(capacity=4.0),
        sa.delete(DutySession).where(DutySession.user_id == reader),
    ]  # fmt: skip
    for edit in edits:
        before = counts()
        with runtime.session() as s:
            s.execute(edit)
        after = counts()
        assert after[0] > before[0], edit
        assert after[1] == before[1], edit
    before = counts()
    with runtime.session() as s:
        s.execute(sa.update(Trust).where(Trust.code == "RW6").values(code="RW7"))
    after = counts()
    assert after[0] > before[0] and after[1] == before[1]  # only the reader holds RW6
    with runtime.session() as s:
        s.execute(sa.update(Trust).where(Trust.code == "RM3").values(name="renamed"))
    assert counts() == after  # not the code: nothing the facts hold


def test_next_case_gives_up_with_a_conflict_when_the_facts_never_match(runtime, clock, monkeypatch):
    """Facts out of date on every read (edits racing each claim) end in a 409, not a
    loop; nothing is claimed."""
    from dataclasses import replace

    from worklist.errors import Conflict

    reader = setup(runtime, clock)
    standing = reader_facts.standing

    def out_of_date(session, *, user_id, now, fresh=False):  # type: ignore[no-untyped-def]
        found, kept = standing(session, user_id=user_id, now=now, fresh=fresh)
        return replace(found, version=found.version + 1), kept

    monkeypatch.setattr(reader_facts, "standing", out_of_date)
    with pytest.raises(Conflict):
        next_case(runtime, clock, reader)
    monkeypatch.undo()
    with runtime.session() as s:
        assert s.scalar(sa.select(sa.func.count()).where(Study.claimed_by_id.is_not(None))) == 0
