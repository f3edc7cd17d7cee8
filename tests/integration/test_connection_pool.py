"""PostgreSQL connections: tested on checkout only after sitting idle; no JIT; a failed
request keeps the connection's prepared statements."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.factories import make_study, make_trust, make_user
from worklist import bootstrap
from worklist.bootstrap import Runtime
from worklist.errors import NotFound
from worklist.services import accounts
from worklist.services import worklist as wl


def _backend_pid(runtime: Runtime) -> int:
    with runtime.session() as s:
        return int(s.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def _kill(runtime: Runtime, pid: int) -> None:
    other = sa.create_engine(runtime.engine.url, poolclass=sa.pool.NullPool)
    with other.connect() as c:
        c.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        c.commit()
    other.dispose()


@pytest.fixture
def postgres_runtime(runtime: Runtime, on_postgres: bool) -> Runtime:
    if not on_postgres:
        pytest.skip("pooled PostgreSQL connections: SQLite has no server")
    return runtime


def test_an_idle_connection_that_died_is_replaced_before_use(
    postgres_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = _backend_pid(postgres_runtime)
    _kill(postgres_runtime, dead)
    monkeypatch.setattr(bootstrap, "IDLE_BEFORE_PING", 0.0)  # it has sat idle long enough

    assert _backend_pid(postgres_runtime) != dead  # the request never saw the dead one


def test_a_connection_used_a_moment_ago_is_not_pinged(postgres_runtime: Runtime) -> None:
    """No round trip on a busy pool: a connection killed within the idle allowance fails
    its one request, and the pool then hands out a fresh connection."""
    dead = _backend_pid(postgres_runtime)
    _kill(postgres_runtime, dead)

    with pytest.raises(sa.exc.OperationalError):
        _backend_pid(postgres_runtime)
    assert _backend_pid(postgres_runtime) != dead


def test_queries_are_not_jit_compiled(postgres_runtime: Runtime) -> None:
    """A pessimistic estimate once made the worklist page spend 390 ms in LLVM to run
    for 14 ms: the short index walks here never gain from JIT."""
    with postgres_runtime.session() as s:
        assert s.execute(sa.text("SHOW jit")).scalar_one() == "off"


def test_a_failed_request_keeps_the_connections_prepared_statements(
    postgres_runtime: Runtime, clock
) -> None:
    """An error response rolls its request back; psycopg's rollback() would forget (and
    DEALLOCATE) every statement prepared on the connection, and the claim would be parsed
    and planned again for its next five runs."""
    rt = postgres_runtime
    with rt.session() as s:
        trust = make_trust(s, now=clock.now(), code="RW6")
        reader = make_user(s, now=clock.now(), trusts=("RW6",), credentials=("CT",),
                           on_duty=True).id  # fmt: skip
        for _ in range(8):
            wl.prioritise_study(s, study=make_study(s, trust=trust, now=clock.now()),
                                now=clock.now())  # fmt: skip
    for _ in range(7):  # psycopg prepares a statement on its fifth run
        with rt.session(read_committed=True) as s:
            assert wl.next_case(s, user=accounts.get_user(s, reader), now=clock.now()).study

    def prepared() -> int:
        with rt.session() as s:
            return int(
                s.execute(sa.text("SELECT count(*) FROM pg_prepared_statements")).scalar_one()
            )

    before = prepared()
    assert before > 0
    with pytest.raises(NotFound), rt.session(read_committed=True) as s:  # as a 404 response
        wl.get_study(s, study_id=10**9, user=accounts.get_user(s, reader), now=clock.now())
    assert prepared() == before
    with rt.session() as s:  # as an HL7 message that fails inside its savepoint
        with pytest.raises(sa.exc.DataError), s.begin_nested():
            s.execute(sa.text("SELECT 1 / 0"))
        assert s.execute(sa.text("SELECT 1")).scalar_one() == 1  # the transaction goes on
    assert prepared() == before
