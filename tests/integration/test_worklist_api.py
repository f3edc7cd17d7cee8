"""The worklist JSON API through the Flask test client with real bearer tokens."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from tests.factories import make_study, make_token, make_trust, make_user
from worklist.db.models import AuditEvent, DutySession
from worklist.domain.priority import describe
from worklist.services import worklist as wl


@pytest.fixture
def world(runtime, clock):
    """Two trusts, a CT reader for RW6, a manager; tokens for both; three ready studies."""
    now = clock.now()
    with runtime.session() as s:
        rw6 = make_trust(s, now=now, code="RW6")
        rm3 = make_trust(s, now=now, code="RM3")
        reader = make_user(s, now=now, username="asingh", trusts=("RW6",),
                           credentials=("CT",), on_duty=True)  # fmt: skip
        other = make_user(s, now=now, username="bjones", trusts=("RW6",),
                          credentials=("CT",), on_duty=True)  # fmt: skip
        manager = make_user(s, now=now, username="boss", role="manager")
        stat = make_study(s, trust=rw6, now=now, order_priority="S", body_area="CHEST")
        routine = make_study(s, trust=rw6, now=now, performed_ago=timedelta(days=2))
        hidden = make_study(s, trust=rm3, now=now)
        wl.reprioritise(s, now=now)
        ids = {"stat": stat.id, "routine": routine.id, "hidden": hidden.id}
        tokens = {
            "reader": make_token(s, user=reader, now=now),
            "other": make_token(s, user=other, now=now),
            "manager": make_token(s, user=manager, now=now),
        }
    return ids, {k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()}


def test_the_worklist_lists_the_callers_eligible_studies_with_explanations(client, world):
    ids, auth = world
    response = client.get("/api/v1/worklist", headers=auth["reader"])
    assert response.status_code == 200
    body = response.get_json()
    assert [s["id"] for s in body["studies"]] == [ids["stat"], ids["routine"]]
    top = body["studies"][0]["priority"]
    assert top["tier"] == 1 and top["class"] == "stat" and top["critical"] is None
    assert top["description"].startswith("Stat / emergency department (tier 1): rule 'Stat order'")
    assert body["next_case"] == {"allowed": True, "reasons": []}
    filtered = client.get("/api/v1/worklist?class=outpatient_routine", headers=auth["reader"])
    assert [s["id"] for s in filtered.get_json()["studies"]] == [ids["routine"]]


def test_the_worklist_needs_a_token(client, world):
    assert client.get("/api/v1/worklist").status_code == 401


def test_next_case_answers_the_claimed_study_then_204_when_nothing_is_left(client, world, runtime):
    ids, auth = world
    first = client.post("/api/v1/worklist/next", headers=auth["reader"])
    assert first.status_code == 200
    assert first.get_json()["study"]["id"] == ids["stat"]
    assert first.get_json()["study"]["claimed_by"] == "asingh"
    assert first.get_json()["assignment"]["kind"] == "pull"
    second = client.post("/api/v1/worklist/next", headers=auth["other"])
    assert second.get_json()["study"]["id"] == ids["routine"]
    empty = client.post("/api/v1/worklist/next", headers=auth["other"])
    assert empty.status_code == 204
    assert empty.headers["X-Worklist-Reason"] == "no eligible study is waiting"
    with runtime.session() as s:
        claims = s.scalars(sa.select(AuditEvent).where(AuditEvent.action == "claim")).all()
        assert sorted(int(c.object_id) for c in claims) == sorted([ids["stat"], ids["routine"]])


def test_a_study_of_a_trust_the_user_may_not_see_answers_404(client, world):
    ids, auth = world
    for path in ("", "/priors"):
        assert client.get(f"/api/v1/studies/{ids['hidden']}{path}",
                          headers=auth["reader"]).status_code == 404  # fmt: skip
    for action in ("claim", "release", "renew"):
        response = client.post(f"/api/v1/studies/{ids['hidden']}/{action}",
                               headers=auth["reader"], json={"reason": "x"})  # fmt: skip
        assert response.status_code == 404, action
    assert (
        client.get(f"/api/v1/studies/{ids['hidden']}", headers=auth["manager"]).status_code == 200
    )


def test_viewing_a_study_shows_why_it_came_to_me_and_is_audited(client, world, runtime):
    ids, auth = world
    client.post("/api/v1/worklist/next", headers=auth["reader"])
    body = client.get(f"/api/v1/studies/{ids['stat']}", headers=auth["reader"]).get_json()
    (assignment,) = body["assignments"]
    assert assignment["user"] == "asingh"
    assert assignment["explanation"]["why"] == "the most urgent waiting study you may report"
    # The line the rules' explanation reads as at the claim, made when shown.
    priority = assignment["explanation"]["priority"]
    started = datetime.fromisoformat(assignment["started_at"])
    assert priority["text"] == describe(priority["explanation"], started, ZoneInfo("Europe/London"))
    assert priority["text"].startswith("Stat / emergency department (tier 1): rule")
    assert body["eligibility"]["allowed"] is True
    with runtime.session() as s:
        views = s.scalars(sa.select(AuditEvent).where(AuditEvent.action == "view_study")).all()
        assert [(v.username, v.object_id) for v in views] == [("asingh", str(ids["stat"]))]


def test_choosing_a_study_is_refused_without_free_choice_and_release_needs_a_reason(
    client, world, runtime
):
    ids, auth = world
    refused = client.post(f"/api/v1/studies/{ids['routine']}/claim", headers=auth["reader"])
    assert refused.status_code == 403
    with runtime.session() as s:
        for duty in s.scalars(sa.select(DutySession)):
            duty.free_choice = True
    claimed = client.post(f"/api/v1/studies/{ids['routine']}/claim", headers=auth["reader"])
    assert claimed.status_code == 200
    assert claimed.get_json()["study"]["claimed_by"] == "asingh"
    taken = client.post(f"/api/v1/studies/{ids['routine']}/claim", headers=auth["other"])
    assert taken.status_code == 409
    no_reason = client.post(f"/api/v1/studies/{ids['routine']}/release", headers=auth["reader"])
    assert no_reason.status_code == 400
    released = client.post(f"/api/v1/studies/{ids['routine']}/release", headers=auth["reader"],
                           json={"reason": "wrong subspecialty"})  # fmt: skip
    assert released.status_code == 200 and released.get_json()["study"]["claimed_by"] is None


def test_renewing_a_lease_moves_its_expiry(client, world, clock):
    ids, auth = world
    client.post("/api/v1/worklist/next", headers=auth["reader"])
    clock.advance(timedelta(minutes=10))
    renewed = client.post(f"/api/v1/studies/{ids['stat']}/renew", headers=auth["reader"])
    assert (
        renewed.get_json()["claim_expires_at"] == (clock.now() + timedelta(minutes=30)).isoformat()
    )
    assert client.post(f"/api/v1/studies/{ids['stat']}/renew",
                       headers=auth["other"]).status_code == 409  # fmt: skip


def test_a_manager_assigns_reassigns_and_returns_a_study(client, world):
    ids, auth = world
    url = f"/api/v1/studies/{ids['routine']}"
    assert client.post(f"{url}/assign", headers=auth["reader"],
                       json={"username": "bjones"}).status_code == 403  # fmt: skip
    first = client.post(f"{url}/assign", headers=auth["manager"], json={"username": "asingh"})
    assert first.status_code == 200
    assert first.get_json()["assignment"]["explanation"]["why"] == "assigned by boss"
    moved = client.post(f"{url}/reassign", headers=auth["manager"],
                        json={"username": "bjones", "note": "leave"})  # fmt: skip
    assert moved.get_json()["study"]["claimed_by"] == "bjones"
    assert moved.get_json()["assignment"]["explanation"]["why"] == (
        "reassigned from asingh by boss: leave"
    )
    back = client.post(f"{url}/return", headers=auth["manager"], json={"reason": "audit"})
    assert back.get_json()["study"]["claimed_by"] is None
    mine = client.get("/api/v1/worklist", headers=auth["reader"]).get_json()
    assert mine["removed"][0]["reason"] == "reassigned to bjones by boss"


def test_priors_answer_the_patients_earlier_studies(client, world, runtime, clock):
    ids, auth = world
    with runtime.session() as s:
        from worklist.db.models import Study

        current = s.get(Study, ids["stat"])
        make_study(s, trust=current.trust, now=clock.now(), patient=current.patient,
                   status="final", body_area="CHEST", performed_ago=timedelta(days=90))  # fmt: skip
    body = client.get(f"/api/v1/studies/{ids['stat']}/priors", headers=auth["reader"]).get_json()
    assert [(p["trust"], p["relevant"], p["report"]) for p in body["priors"]] == [
        ("RW6", True, None)
    ]


def test_a_manager_is_warned_of_reporting_agreements_about_to_end(client, world, runtime, clock):
    _, auth = world
    from datetime import date

    from worklist.db.models import ReportingPermission, User

    with runtime.session() as s:
        reader = s.scalar(sa.select(User).where(User.username == "asingh"))
        s.scalar(
            sa.select(ReportingPermission).where(ReportingPermission.user_id == reader.id)
        ).ends_on = date(2026, 12, 10)
    body = client.get("/api/v1/agreements/expiring", headers=auth["manager"]).get_json()
    assert body["agreements"] == [
        {"username": "asingh", "trust": "RW6", "starts_on": None, "ends_on": "2026-12-10"}
    ]
    assert client.get("/api/v1/agreements/expiring?days=7",
                      headers=auth["manager"]).get_json()["agreements"] == []  # fmt: skip
    assert client.get("/api/v1/agreements/expiring", headers=auth["reader"]).status_code == 403


def test_a_double_read_study_goes_to_a_second_reader_through_the_api(client, runtime, clock):
    now = clock.now()
    with runtime.session() as s:
        trust = make_trust(s, now=now, code="RW6")
        tokens = []
        for name in ("one", "two"):
            user = make_user(s, now=now, username=name, trusts=("RW6",), credentials=("MG",),
                             on_duty=True)  # fmt: skip
            tokens.append({"Authorization": f"Bearer {make_token(s, user=user, now=now)}"})
        study_id = make_study(s, trust=trust, now=now, modality="MG", body_area="BREAST",
                              pathway="bsp").id  # fmt: skip
        wl.reprioritise(s, now=now)
    one, two = tokens
    assert client.post("/api/v1/worklist/next", headers=one).get_json()["study"]["id"] == study_id
    first = client.post(f"/api/v1/studies/{study_id}/reading", headers=one,
                        json={"outcome": "normal"})  # fmt: skip
    assert first.get_json() == {"study_id": study_id, "stage": "second"}
    assert client.post("/api/v1/worklist/next", headers=one).status_code == 204
    assert client.post("/api/v1/worklist/next", headers=two).get_json()["study"]["id"] == study_id
    second = client.post(f"/api/v1/studies/{study_id}/reading", headers=two,
                         json={"outcome": "normal"})  # fmt: skip
    assert second.get_json()["stage"] == "agreed"


def test_next_case_off_duty_answers_204_with_the_reason(client, runtime, clock):
    now = clock.now()
    with runtime.session() as s:
        trust = make_trust(s, now=now, code="RW6")
        user = make_user(s, now=now, trusts=("RW6",), credentials=("CT",))
        token = make_token(s, user=user, now=now)
        make_study(s, trust=trust, now=now)
        wl.reprioritise(s, now=now)
    response = client.post("/api/v1/worklist/next", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 204
    assert response.headers["X-Worklist-Reason"] == "not on a duty session now"
