"""The demo region a new user sees, and the read-only worklist page behind sign-in."""

import re

import sqlalchemy as sa

from worklist import demo
from worklist.db.models import AuditEvent, Study, Trust, User
from worklist.domain.study import StudyStatus

GREATER_MANCHESTER = {"RMC", "RBV", "R0A", "RM3", "RW6", "RWJ", "RMP", "RRF"}


def _load(runtime, clock) -> None:  # type: ignore[no-untyped-def]
    with runtime.session() as session:
        demo.load(session, now=clock.now())


def test_the_demo_region_has_eight_trusts_a_dozen_radiologists_and_studies_in_every_state(
    runtime, clock
) -> None:
    _load(runtime, clock)
    with runtime.session() as session:
        assert set(session.scalars(sa.select(Trust.code))) == GREATER_MANCHESTER
        radiologists = session.scalars(sa.select(User).where(User.role == "radiologist")).all()
        assert len(radiologists) == 12
        assert len({tuple(sorted(c.modality for c in r.credentials)) for r in radiologists}) > 5
        statuses = dict(
            session.execute(sa.select(Study.status, sa.func.count()).group_by(Study.status)).all()
        )
        assert sum(statuses.values()) >= 200
        for status in (
            StudyStatus.SCHEDULED,
            StudyStatus.READY,
            StudyStatus.PRELIMINARY,
            StudyStatus.FINAL,
            StudyStatus.CANCELLED,
            StudyStatus.ON_HOLD,
        ):
            assert statuses.get(status.value, 0) > 0, status


def test_loading_the_demo_twice_does_not_duplicate_it(runtime, clock) -> None:
    _load(runtime, clock)
    with runtime.session() as session:
        assert "already has trusts" in demo.load(session, now=clock.now())
        assert session.scalar(sa.select(sa.func.count()).select_from(Trust)) == 8


def _sign_in(client, username: str, password: str):  # type: ignore[no-untyped-def]
    page = client.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    return client.post(
        "/login", data={"username": username, "password": password, "csrf_token": csrf}
    )


def test_the_worklist_page_needs_sign_in(client) -> None:
    response = client.get("/")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_a_radiologist_signs_in_and_sees_ready_studies_of_their_trusts_only(
    runtime, client, clock
) -> None:
    _load(runtime, clock)
    response = _sign_in(client, "gpatel", demo.DEMO_PASSWORD)  # reports for The Christie only
    assert response.status_code == 302
    page = client.get("/").get_data(as_text=True)
    assert "Regional radiology worklist" in page
    codes = set(re.findall(r"<td>(R[A-Z0-9]{2})</td>", page))
    assert codes == {"RBV"}
    with runtime.session() as session:
        assert (
            session.scalar(sa.select(sa.func.count()).where(AuditEvent.action == "view_worklist"))
            == 1
        )


def test_a_wrong_password_is_refused_and_audited(runtime, client, clock) -> None:
    _load(runtime, clock)
    response = _sign_in(client, "asingh", "wrong-password")
    assert response.status_code == 401 and "wrong password" in response.get_data(as_text=True)
    with runtime.session() as session:
        assert (
            session.scalar(sa.select(sa.func.count()).where(AuditEvent.action == "login_failed"))
            == 1
        )


def test_a_login_form_without_its_csrf_token_is_refused(runtime, client, clock) -> None:
    _load(runtime, clock)
    response = client.post("/login", data={"username": "asingh", "password": demo.DEMO_PASSWORD})
    assert response.status_code == 400


def test_a_manager_sees_an_urgent_finding_on_the_worklist_page_until_it_is_acknowledged(
    runtime, client, clock
) -> None:
    from worklist.db.models import Alert

    _load(runtime, clock)
    with runtime.session() as session:
        session.add(
            Alert(
                kind="urgent_finding",
                message="Urgent finding on accession RW620260001",
                created_at=clock.now(),
            )
        )
    _sign_in(client, "manager", demo.DEMO_PASSWORD)
    page = client.get("/").get_data(as_text=True)
    assert "Urgent finding on accession RW620260001" in page
    alert_id = re.search(r"/alerts/(\d+)/acknowledge", page).group(1)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    response = client.post(f"/alerts/{alert_id}/acknowledge", data={"csrf_token": csrf})
    assert response.status_code == 302
    assert "RW620260001" not in client.get("/").get_data(as_text=True)
    with runtime.session() as session:
        assert session.get(Alert, int(alert_id)).acknowledged_by_id is not None


def test_a_radiologist_sees_only_the_alerts_addressed_to_them_and_may_dismiss_them(
    runtime, client, clock
) -> None:
    from worklist.db.models import Alert

    _load(runtime, clock)
    with runtime.session() as session:
        me = session.scalar(sa.select(User).where(User.username == "gpatel"))
        session.add(
            Alert(
                kind="claim_withdrawn",
                user_id=me.id,
                created_at=clock.now(),
                message="Accession RBV1 was taken off gpatel's list: cancelled by RIS",
            )
        )
        session.add(Alert(kind="urgent_finding", created_at=clock.now(), message="for managers"))
    _sign_in(client, "gpatel", demo.DEMO_PASSWORD)
    page = client.get("/").get_data(as_text=True)
    assert "taken off gpatel" in page and "for managers" not in page
    alert_id = re.search(r"/alerts/(\d+)/acknowledge", page).group(1)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert (
        client.post(f"/alerts/{alert_id}/acknowledge", data={"csrf_token": csrf}).status_code == 302
    )
    assert "taken off gpatel" not in client.get("/").get_data(as_text=True)
    with runtime.session() as session:
        managers_alert = session.scalar(sa.select(Alert.id).where(Alert.message == "for managers"))
    refused = client.post(f"/alerts/{managers_alert}/acknowledge", data={"csrf_token": csrf})
    assert refused.status_code == 403
