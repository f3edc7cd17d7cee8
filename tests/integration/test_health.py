from worklist.db import migrate


def test_healthz_says_the_process_is_alive(client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json == {"status": "ok"}


def test_readyz_is_ok_when_the_database_is_reachable_and_at_head(client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json["database"] == "reachable"
    assert response.json["migration"] is not None


def test_readyz_is_unavailable_when_migrations_are_not_at_head(runtime, client) -> None:
    migrate.downgrade(runtime.engine, "base")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["migration"] is None and response.json["head"]
