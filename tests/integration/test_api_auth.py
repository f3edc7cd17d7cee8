"""Every /api/v1 endpoint needs a valid bearer token; tokens are stored hashed."""

from datetime import timedelta

import sqlalchemy as sa

from tests.factories import make_study, make_token, make_trust, make_user
from worklist.db.models import ApiToken
from worklist.services import accounts


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_request_without_a_token_gets_401_with_a_json_error(client) -> None:
    response = client.get("/api/v1/studies")
    assert response.status_code == 401
    assert response.json["error"] == "Unauthorized"
    assert "Bearer" in response.headers["WWW-Authenticate"]


def test_an_unknown_token_gets_401(client) -> None:
    response = client.get("/api/v1/me", headers=_auth("wl_not-a-real-token"))
    assert response.status_code == 401
    assert "unknown or revoked" in response.json["message"]


def test_a_valid_token_identifies_its_user_and_role(runtime, client, clock) -> None:
    with runtime.session() as session:
        make_trust(session, now=clock.now(), code="RMC")
        user = make_user(
            session, now=clock.now(), username="asingh", trusts=("RMC",), credentials=("CT",)
        )
        token = make_token(session, user=user, now=clock.now())
    response = client.get("/api/v1/me", headers=_auth(token))
    assert response.status_code == 200
    assert response.json == {
        "username": "asingh",
        "full_name": None,
        "role": "radiologist",
        "trusts": ["RMC"],
        "credentials": ["CT"],
    }


def test_tokens_are_stored_only_as_their_hash(runtime, clock) -> None:
    with runtime.session() as session:
        user = make_user(session, now=clock.now(), role="admin")
        token = make_token(session, user=user, now=clock.now())
    with runtime.session() as session:
        stored = session.scalars(sa.select(ApiToken.token_hash)).all()
    assert token not in stored and accounts.hash_token(token) in stored


def test_a_revoked_token_stops_working(runtime, client, clock) -> None:
    with runtime.session() as session:
        user = make_user(session, now=clock.now(), role="admin")
        token = make_token(session, user=user, now=clock.now())
    assert client.get("/api/v1/me", headers=_auth(token)).status_code == 200
    with runtime.session() as session:
        accounts.revoke_token(session, token=token, now=clock.now())
    assert client.get("/api/v1/me", headers=_auth(token)).status_code == 401


def test_a_radiologist_may_not_add_a_trust_but_an_admin_may(runtime, client, clock) -> None:
    with runtime.session() as session:
        radiologist = make_token(session, user=make_user(session, now=clock.now()), now=clock.now())
        admin = make_token(
            session, user=make_user(session, now=clock.now(), role="admin"), now=clock.now()
        )
    body = {"code": "RWJ", "name": "Stockport", "sending_facility": "RWJ"}
    refused = client.post("/api/v1/trusts", json=body, headers=_auth(radiologist))
    assert refused.status_code == 403 and "admin" in refused.json["message"]
    created = client.post("/api/v1/trusts", json=body, headers=_auth(admin))
    assert created.status_code == 201 and created.json["code"] == "RWJ"
    again = client.post("/api/v1/trusts", json=body, headers=_auth(admin))
    assert again.status_code == 409 and "already exists" in again.json["message"]
    bad = client.post("/api/v1/trusts", json={"code": "RWJ"}, headers=_auth(admin))
    assert bad.status_code == 400 and "name" in bad.json["message"]
    mode = client.post(
        "/api/v1/trusts",
        headers=_auth(admin),
        json={
            "code": "RMP",
            "name": "Tameside",
            "sending_facility": "RMP",
            "ack_mode": "sometimes",
        },
    )
    assert mode.status_code == 400 and "ack mode must be one of" in mode.json["message"]
    auto = client.post(
        "/api/v1/trusts",
        headers=_auth(admin),
        json={"code": "RMP", "name": "Tameside", "sending_facility": "RMP", "ack_mode": "auto"},
    )
    assert auto.status_code == 201 and auto.json["ack_mode"] == "auto"


def test_a_radiologist_sees_only_studies_of_trusts_they_may_report_for(
    runtime, client, clock
) -> None:
    with runtime.session() as session:
        bolton = make_trust(session, now=clock.now(), code="RMC")
        christie = make_trust(session, now=clock.now(), code="RBV")
        make_study(session, trust=bolton, now=clock.now(), accession_number="B1")
        make_study(session, trust=christie, now=clock.now(), accession_number="C1")
        user = make_user(session, now=clock.now(), trusts=("RMC",))
        token = make_token(session, user=user, now=clock.now())
        manager = make_token(
            session, user=make_user(session, now=clock.now(), role="manager"), now=clock.now()
        )
    mine = client.get("/api/v1/studies", headers=_auth(token)).json
    assert [s["accession_number"] for s in mine["studies"]] == ["B1"]
    everything = client.get("/api/v1/studies", headers=_auth(manager)).json
    assert sorted(s["accession_number"] for s in everything["studies"]) == ["B1", "C1"]
    assert client.get("/api/v1/studies?limit=0", headers=_auth(manager)).status_code == 400


def test_a_call_with_a_token_costs_one_query_and_records_its_use_to_the_minute(
    runtime, client, clock
) -> None:
    with runtime.session() as session:
        user = make_user(session, now=clock.now(), role="admin")
        token = make_token(session, user=user, now=clock.now())
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if not statement.startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE
            statements.append(statement)

    def last_used():  # type: ignore[no-untyped-def]
        with runtime.session() as session:
            return session.scalar(sa.select(ApiToken.last_used_at))

    first_use = clock.now()
    assert client.get("/api/v1/me", headers=_auth(token)).status_code == 200
    assert last_used() == first_use
    clock.advance(timedelta(seconds=30))
    sa.event.listen(runtime.engine, "before_cursor_execute", count)
    try:
        with runtime.session() as session:
            assert accounts.authenticate_token(session, token=token, now=clock.now()) is not None
    finally:
        sa.event.remove(runtime.engine, "before_cursor_execute", count)
    assert len(statements) == 1  # the token with its user; no UPDATE within the minute
    assert last_used() == first_use
    clock.advance(timedelta(seconds=31))
    assert client.get("/api/v1/me", headers=_auth(token)).status_code == 200
    assert last_used() == clock.now()


def test_the_request_user_is_loaded_by_id_once_per_session(runtime, clock) -> None:
    """`accounts.get_user` (the web UI's loader): the user as the ORM would load it,
    the same object for the rest of the request, None for an unknown id."""
    with runtime.session() as session:
        user_id = make_user(session, now=clock.now(), username="okafor", full_name="A Okafor").id
    with runtime.session() as session:
        user = accounts.get_user(session, user_id)
        assert user is not None
        assert (user.username, user.full_name, user.role, user.active) == (
            "okafor", "A Okafor", "radiologist", True,
        )  # fmt: skip
        assert user.created_at.tzinfo is not None
        assert accounts.get_user(session, user_id) is user
        user.full_name = "Ada Okafor"  # loaded, so changes are flushed as for any ORM object
        assert accounts.get_user(session, user_id + 1000) is None
    with runtime.session() as session:
        assert accounts.get_user(session, user_id).full_name == "Ada Okafor"
