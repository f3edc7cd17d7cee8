"""Verification: a trainee's preliminary report, claimed and signed final by a consultant.

Through the public services (`worklist.services.worklist` next case / claim / leases,
`worklist.services.reports` signing) and the JSON API, on SQLite or PostgreSQL
(WORKLIST_TEST_DATABASE_URL). The RIS's view is the outbox rows (the ORUs queued).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.factories import make_study, make_token, make_trust, make_user
from worklist.bootstrap import Runtime
from worklist.clock import FixedClock
from worklist.db.models import (
    Assignment,
    DutySession,
    OutboundMessage,
    ReportVersion,
    Study,
    User,
)
from worklist.errors import Conflict, Forbidden, NotFound
from worklist.services import reports, verification
from worklist.services import worklist as wl


def obr(payload: str) -> list[str]:
    return next(s.split("|") for s in payload.split("\r") if s.startswith("OBR|"))


@dataclass
class World:
    runtime: Runtime
    clock: FixedClock
    users: dict[str, int]

    def user(self, s: sa.orm.Session, name: str) -> User:
        user = s.get(User, self.users[name])
        assert user is not None
        return user

    def ready_study(self, **kw: object) -> int:
        with self.runtime.session() as s:
            from worklist.db.models import Trust

            trust = s.scalars(sa.select(Trust).where(Trust.code == "RW6")).one()
            study = make_study(s, trust=trust, now=self.clock.now(), **kw)  # type: ignore[arg-type]
            wl.prioritise_study(s, study=study, now=self.clock.now())
            return study.id

    def next_case(self, name: str) -> wl.ClaimResult:
        with self.runtime.session() as s:
            result = wl.next_case(s, user=self.user(s, name), now=self.clock.now())
            return result

    def claim(self, name: str, study_id: int) -> Assignment:
        with self.runtime.session() as s:
            return wl.claim_study(
                s, study_id=study_id, user=self.user(s, name), now=self.clock.now()
            )

    def claim_by_manager(self, study_id: int, name: str) -> None:
        with self.runtime.session() as s:
            manager = s.scalars(sa.select(User).where(User.role == "manager")).first()
            if manager is None:
                manager = make_user(s, now=self.clock.now(), username="boss", role="manager")
            wl.assign_study(
                s, study_id=study_id, to_user=self.user(s, name), by=manager,
                now=self.clock.now(),
            )  # fmt: skip

    def sign(self, name: str, study_id: int, status: str, text: str) -> reports.Signed:
        with self.runtime.session() as s:
            return reports.sign_report(
                s, study_id=study_id, user=self.user(s, name), status=status, text=text,
                now=self.clock.now(),
            )  # fmt: skip

    def preliminary(self, **kw: object) -> int:
        """A ready study the trainee takes by next case and signs as preliminary."""
        study_id = self.ready_study(**kw)
        taken = self.next_case("lee")
        assert taken.study is not None and taken.study.id == study_id
        self.sign("lee", study_id, "preliminary", "Small subdural haematoma.")
        return study_id

    def study(self, study_id: int) -> Study:
        with self.runtime.session() as s:
            study = s.get(Study, study_id)
            assert study is not None
            s.expunge(study)
            return study


@pytest.fixture
def world(runtime: Runtime, clock: FixedClock) -> World:
    now = clock.now()
    users = {}
    with runtime.session() as s:
        make_trust(s, now=now, code="RW6", sending_application="CRIS")
        make_trust(s, now=now, code="RM3")

        def person(name: str, full: str, pid: str, **kw: object) -> None:
            kw.setdefault("trusts", ("RW6",))
            kw.setdefault("credentials", ("CT",))
            user = make_user(
                s, now=now, username=name, full_name=full, professional_id=pid, on_duty=True,
                **kw,  # type: ignore[arg-type]
            )  # fmt: skip
            users[name] = user.id

        person("okafor", "Dr Ngozi Okafor", "C4567890")
        person("patel", "Dr Asha Patel", "C1111111")
        person("lee", "Dr Sam Lee", "T7654321", can_finalise=False)
        person("chen", "Dr Wei Chen", "T2222222", can_finalise=False)
        person("mrkhan", "Dr Omar Khan", "C3333333", credentials=("MR",))
        person("jones", "Dr Ann Jones", "C4444444", trusts=("RM3",))
    return World(runtime, clock, users)


def test_a_consultant_verifies_a_trainees_preliminary_from_next_case_and_the_ris_gets_p_then_f(
    world: World,
) -> None:
    study_id = world.preliminary()
    after_preliminary = world.study(study_id)
    assert (after_preliminary.status, after_preliminary.claimed_by_id) == ("preliminary", None)

    taken = world.next_case("okafor")
    assert taken.study is not None and taken.study.id == study_id
    assert taken.assignment is not None
    assert taken.assignment.explanation["verification"]["preliminary_by"] == "lee"
    world.sign("okafor", study_id, "final", "Small acute subdural haematoma. No mass effect.")

    done = world.study(study_id)
    assert (done.status, done.claimed_by_id) == ("final", None)
    with world.runtime.session() as s:
        versions = list(s.scalars(sa.select(ReportVersion).order_by(ReportVersion.sequence)))
        final = versions[-1]
        assert [v.kind for v in versions] == ["preliminary", "final"]
        assert (final.author_id, final.verifier_id) == (world.users["lee"], world.users["okafor"])
        claims = list(s.scalars(sa.select(Assignment).order_by(Assignment.id)))
        assert [(c.user_id, c.end_reason) for c in claims] == [
            (world.users["lee"], "signed"), (world.users["okafor"], "signed"),
        ]  # fmt: skip
        out = list(
            s.scalars(
                sa.select(OutboundMessage)
                .where(OutboundMessage.study_id == study_id)
                .order_by(OutboundMessage.id)
            )
        )
    assert [obr(m.payload)[25] for m in out] == ["P", "F"]
    assert obr(out[0].payload)[32].startswith("T7654321&Lee&Sam")  # the trainee's own P
    final_obr = obr(out[1].payload)
    assert final_obr[32].startswith("C4567890&Okafor&Ngozi")  # the verifier is responsible
    assert final_obr[33].startswith("T7654321&Lee&Sam")  # the trainee author assists
    assert world.next_case("okafor").study is None  # nothing left to verify


def test_a_trainee_is_never_offered_a_preliminary_study_to_verify(world: World) -> None:
    study_id = world.preliminary()
    result = world.next_case("chen")  # another trainee, eligible for the study otherwise
    assert result.study is None
    with pytest.raises(Forbidden, match="right to finalise"):
        world.claim("chen", study_id)
    with world.runtime.session() as s:
        assert (
            verification.verification_pool(s, user=world.user(s, "chen"), now=world.clock.now())
            == []
        )
        pool = verification.verification_pool(
            s, user=world.user(s, "okafor"), now=world.clock.now()
        )
        assert [p.id for p in pool] == [study_id]
    assert world.study(study_id).claimed_by_id is None


def test_a_consultant_without_the_credential_or_the_agreement_is_refused_with_the_reason(
    world: World,
) -> None:
    study_id = world.preliminary()
    assert world.next_case("mrkhan").study is None
    assert world.next_case("jones").study is None
    with pytest.raises(Conflict, match="no credential for CT NEURO"):
        world.claim("mrkhan", study_id)
    with pytest.raises(NotFound):  # a trust they do not report for is not even visible
        world.claim("jones", study_id)
    with world.runtime.session() as s:
        study = s.get(Study, study_id)
        assert study is not None
        with pytest.raises(Conflict, match="no reporting agreement for RW6"):
            verification.claim_for_verification(
                s, study=study, user=world.user(s, "jones"), now=world.clock.now()
            )
    assert world.study(study_id).claimed_by_id is None


def test_a_verification_claim_is_a_lease_renewed_then_expired_back_to_the_verification_pool(
    world: World,
) -> None:
    study_id = world.preliminary()
    assert world.next_case("okafor").study is not None
    world.clock.advance(timedelta(minutes=20))
    with world.runtime.session() as s:
        renewed = wl.renew_claim(
            s, study_id=study_id, user=world.user(s, "okafor"), now=world.clock.now()
        )
        assert renewed.claim_expires_at == world.clock.now() + wl.DEFAULT_LEASE
    world.clock.advance(timedelta(minutes=25))
    with world.runtime.session() as s:
        assert wl.expire_claims(s, now=world.clock.now()) == 0  # renewed: still held
    world.clock.advance(timedelta(minutes=6))
    with world.runtime.session() as s:
        assert wl.expire_claims(s, now=world.clock.now()) == 1
    back = world.study(study_id)
    assert (back.status, back.claimed_by_id) == ("preliminary", None)
    taken = world.next_case("patel")
    assert taken.study is not None and taken.study.id == study_id
    with world.runtime.session() as s:
        wl.release_claim(
            s, study_id=study_id, user=world.user(s, "patel"), reason="needs the priors",
            now=world.clock.now(),
        )  # fmt: skip
        ends = [a.end_reason for a in s.scalars(
            sa.select(Assignment).where(Assignment.study_id == study_id).order_by(Assignment.id)
        )]  # fmt: skip
    assert ends == ["signed", "expired: nobody worked on it within the lease",
                    "released: needs the priors"]  # fmt: skip
    assert world.study(study_id).claimed_by_id is None


def test_two_consultants_cannot_claim_the_same_preliminary_study(world: World) -> None:
    study_id = world.preliminary()
    world.claim("okafor", study_id)
    with pytest.raises(Conflict, match="already claimed by another radiologist"):
        world.claim("patel", study_id)
    assert world.next_case("patel").study is None
    with pytest.raises(Forbidden, match="only the radiologist who holds the claim"):
        world.sign("patel", study_id, "final", "Agreed.")
    assert world.study(study_id).claimed_by_id == world.users["okafor"]


def test_consultants_racing_for_preliminary_studies_each_claim_a_different_one(
    world: World,
) -> None:
    studies = {world.preliminary() for _ in range(6)}
    won: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def consultant(name: str) -> None:
        try:
            for _ in range(6):
                result = world.next_case(name)
                if result.study is None:
                    return
                with lock:
                    won.append(result.study.id)
                with world.runtime.session() as s:  # hand it back so the pool keeps moving
                    wl.end_claim(s, study=s.get(Study, result.study.id), now=world.clock.now(),
                                 end_reason="verified elsewhere")  # fmt: skip
                    s.execute(sa.update(Study).where(Study.id == result.study.id)
                              .values(status="final"))  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=consultant, args=(n,)) for n in ("okafor", "patel")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(won) == sorted(studies)  # each claimed exactly once, none lost


def test_next_case_ranks_preliminary_and_ready_studies_by_one_urgency(world: World) -> None:
    routine_preliminary = world.preliminary()
    stat = world.ready_study(
        patient_class="E", body_area="HEAD", performed_ago=timedelta(minutes=5)
    )
    newer_routine = world.ready_study(performed_ago=timedelta(minutes=10))
    with world.runtime.session() as s:
        urgencies = {i: s.get(Study, i).urgency for i in (routine_preliminary, stat, newer_routine)}
    assert urgencies[stat] > urgencies[routine_preliminary] > urgencies[newer_routine]
    order = [world.next_case("okafor").study.id for _ in range(3)]  # type: ignore[union-attr]
    assert order == [stat, routine_preliminary, newer_routine]


def test_a_consultant_lists_claims_and_signs_a_preliminary_study_through_the_api(
    world: World, client
) -> None:  # type: ignore[no-untyped-def]
    study_id = world.preliminary()
    with world.runtime.session() as s:
        token = make_token(s, user=world.user(s, "okafor"), now=world.clock.now())
        trainee = make_token(s, user=world.user(s, "chen"), now=world.clock.now())
    auth = {"Authorization": f"Bearer {token}"}
    trainee_auth = {"Authorization": f"Bearer {trainee}"}
    refused = client.post(f"/api/v1/studies/{study_id}/claim", headers=trainee_auth)
    assert refused.status_code == 403
    listed = client.get("/api/v1/verification", headers=auth).get_json()["studies"]
    assert [s["id"] for s in listed] == [study_id]
    assert client.get("/api/v1/verification", headers=trainee_auth).get_json()["studies"] == []
    claimed = client.post(f"/api/v1/studies/{study_id}/claim", headers=auth)
    assert claimed.status_code == 200, claimed.get_json()
    assert (
        claimed.get_json()["assignment"]["explanation"]["verification"]["preliminary_by"] == "lee"
    )
    assert client.post(f"/api/v1/studies/{study_id}/renew", headers=auth).status_code == 200
    signed = client.post(
        f"/api/v1/studies/{study_id}/report/sign", headers=auth, json={"status": "final"}
    )
    assert signed.status_code in (200, 201), signed.get_json()
    assert world.study(study_id).status == "final"


def test_preliminary_studies_age_like_ready_ones_so_verification_ranks_by_the_same_clock(
    world: World,
) -> None:
    preliminary = world.preliminary(performed_ago=timedelta(hours=2))
    twin = world.ready_study(performed_ago=timedelta(hours=2))
    before = world.study(preliminary).urgency
    world.clock.advance(timedelta(days=22))  # past an ageing step (P21D)
    with world.runtime.session() as s:
        wl.reprioritise(s, now=world.clock.now())  # the ready sweep: leaves preliminaries alone
    assert world.study(preliminary).urgency == before
    with world.runtime.session() as s:
        assert verification.reprioritise_verification_pool(s, now=world.clock.now()) == 1
    aged = world.study(preliminary).urgency
    assert aged > before
    assert aged == world.study(twin).urgency


def test_saving_the_draft_while_verifying_renews_the_consultants_lease(world: World) -> None:
    study_id = world.preliminary()
    assert world.next_case("okafor").study is not None
    world.clock.advance(timedelta(minutes=25))
    with world.runtime.session() as s:
        reports.save_draft(
            s, study_id=study_id, user=world.user(s, "okafor"), now=world.clock.now(),
            text="Small acute subdural haematoma.",
        )  # fmt: skip
    held = world.study(study_id)
    assert held.claim_expires_at == world.clock.now() + wl.DEFAULT_LEASE
    world.clock.advance(timedelta(minutes=10))
    with world.runtime.session() as s:
        assert wl.expire_claims(s, now=world.clock.now()) == 0
    signed = world.sign("okafor", study_id, "final", "Small acute subdural haematoma.")
    assert signed.version.kind == "final"


def test_the_scheduler_runs_the_verification_pool_sweep(settings) -> None:  # type: ignore[no-untyped-def]
    from worklist.jobs import scheduled_jobs

    jobs = {job.name: job.run for job in scheduled_jobs(settings)}
    assert jobs["reprioritise-verification"] is verification.reprioritise_verification_job


def test_the_consultants_worklist_shows_the_study_they_are_verifying_among_their_own(
    world: World,
) -> None:
    study_id = world.preliminary()
    assert world.next_case("okafor").study is not None
    with world.runtime.session() as s:
        page = wl.worklist(s, user=world.user(s, "okafor"), now=world.clock.now())
        assert [m.id for m in page.mine] == [study_id]


def test_a_consultant_at_session_capacity_is_offered_only_stat_verification_work(
    world: World,
) -> None:
    routine = world.preliminary()
    stat = world.preliminary(
        patient_class="E", body_area="HEAD", performed_ago=timedelta(minutes=5)
    )
    with world.runtime.session() as s:
        s.execute(
            sa.update(DutySession)
            .where(DutySession.user_id == world.users["okafor"])
            .values(capacity=1.0)
        )
    held = world.ready_study(performed_ago=timedelta(days=2))
    world.claim_by_manager(held, "okafor")  # a routine CT (effort 1.5) fills the session
    first = world.next_case("okafor")
    assert first.study is not None and first.study.id == stat  # stat bypasses the cap
    assert world.next_case("okafor").study is None
    assert world.study(routine).claimed_by_id is None


def test_a_study_held_for_verification_counts_toward_session_capacity(world: World) -> None:
    verifying = world.preliminary()
    waiting = world.ready_study(performed_ago=timedelta(days=2))
    with world.runtime.session() as s:
        s.execute(
            sa.update(DutySession)
            .where(DutySession.user_id == world.users["okafor"])
            .values(capacity=1.0)
        )
    world.claim("okafor", verifying)  # a routine CT to verify (effort 1.5) fills the session
    assert world.next_case("okafor").study is None
    assert world.study(waiting).claimed_by_id is None


def test_auto_assignment_pushes_a_preliminary_report_to_a_consultant_never_a_trainee(
    world: World,
) -> None:
    from worklist.services import auto_assignment

    study_id = world.preliminary()
    with world.runtime.session() as s:
        made = auto_assignment.auto_assign(s, now=world.clock.now())
        assert [a.study_id for a in made] == [study_id]
        pushed = made[0]
        assert pushed.kind == "push"
        assert pushed.explanation["verification"]["preliminary_by"] == "lee"
        assert pushed.explanation["why"].startswith("auto-assigned for verification")
        # Eligible: the consultants with the CT credential and an RW6 agreement.
        assert pushed.user_id in (world.users["okafor"], world.users["patel"])
    study = world.study(study_id)
    assert (study.status, study.claimed_by_id) == ("preliminary", pushed.user_id)
    world.sign(
        "okafor" if pushed.user_id == world.users["okafor"] else "patel",
        study_id, "final", "Small acute subdural haematoma.",
    )  # fmt: skip
    assert world.study(study_id).status == "final"


def test_consultants_with_other_trusts_and_credentials_read_the_verification_pool_alike(
    world: World, monkeypatch
) -> None:
    """Next case reads the verification pool through one statement for every consultant
    (their trusts and credentials as parameters, `pool.shared_pool`), compiled once per
    process and, on PostgreSQL, planned once per connection: written in, each consultant
    had their own, compiled on their first next case in each process."""
    from worklist.db import driver

    study_id = world.preliminary()
    run: list[object] = []
    rows = driver.rows

    def recording(session, statement, params):  # type: ignore[no-untyped-def]
        run.append(statement)
        return rows(session, statement, params)

    monkeypatch.setattr(driver, "rows", recording)
    for name in ("mrkhan", "jones"):  # other credentials, another trust: not theirs
        result = world.next_case(name)
        assert result.study is None or result.study.id != study_id
    result = world.next_case("okafor")
    assert result.study is not None and result.study.id == study_id
    reads = [st for st in run if driver.sql(st).text.startswith("SELECT study.urgency, study.id")]
    assert len(reads) >= 3
    assert len({id(st) for st in reads}) == 1, "one statement for every consultant"
