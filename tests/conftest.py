"""Test fixtures: a fresh, migrated database for every test, on SQLite or on PostgreSQL.

Set WORKLIST_TEST_DATABASE_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test) to run
the whole suite on PostgreSQL: the session migrates one template database and every test gets
its own copy (CREATE DATABASE ... TEMPLATE), so tests and concurrent runs never share rows.
Without it, the template is a migrated SQLite file copied per test.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from worklist.bootstrap import Runtime, build_runtime
from worklist.clock import FixedClock
from worklist.config import Settings
from worklist.db import migrate

TEST_DATABASE_URL = os.environ.get("WORKLIST_TEST_DATABASE_URL", "")
START = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@dataclass
class DatabaseFactory:
    """Makes fresh migrated databases from one template."""

    kind: str
    template: str  # a URL (postgresql) or a file path (sqlite)
    admin_url: str = ""
    workdir: Path | None = None

    def create(self) -> str:
        name = f"wl_{uuid.uuid4().hex[:12]}"
        if self.kind == "postgresql":
            admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
            admin.dispose()
            return (
                sa.make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)
            )
        assert self.workdir is not None
        path = self.workdir / f"{name}.db"
        shutil.copyfile(self.template, path)
        return f"sqlite:///{path}"

    def drop(self, url: str) -> None:
        if self.kind == "postgresql":
            name = sa.make_url(url).database
            admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.dispose()
        else:
            path = Path(sa.make_url(url).database or "")
            for suffix in ("", "-wal", "-shm", "-writer"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def database_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseFactory]:
    if TEST_DATABASE_URL.startswith("postgresql"):
        template = f"wl_tpl_{uuid.uuid4().hex[:12]}"
        admin = sa.create_engine(TEST_DATABASE_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{template}"')
        template_url = sa.make_url(TEST_DATABASE_URL).set(database=template)
        engine = sa.create_engine(template_url)
        migrate.upgrade(engine)
        engine.dispose()
        yield DatabaseFactory("postgresql", template, admin_url=TEST_DATABASE_URL)
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
        admin.dispose()
    else:
        workdir = tmp_path_factory.mktemp("databases")
        template = workdir / "template.db"
        from worklist.bootstrap import create_db_engine

        engine = create_db_engine(f"sqlite:///{template}")
        migrate.upgrade(engine)
        engine.dispose()  # closing the last connection checkpoints the WAL into the file
        yield DatabaseFactory("sqlite", str(template), workdir=workdir)


@pytest.fixture
def database_url(database_factory: DatabaseFactory) -> Iterator[str]:
    url = database_factory.create()
    yield url
    database_factory.drop(url)


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(START)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return replace(
        Settings(instance_path=tmp_path, database_url=database_url, environment="test"),
    ).validated()


@pytest.fixture
def runtime(settings: Settings, clock: FixedClock) -> Iterator[Runtime]:
    rt = build_runtime(settings, clock=clock)
    yield rt
    rt.dispose()


@pytest.fixture
def session(runtime: Runtime) -> Iterator[sa.orm.Session]:
    """A session whose work is committed when the test ends normally (tests may commit too)."""
    with runtime.session() as s:
        yield s


@pytest.fixture
def app(runtime: Runtime):  # type: ignore[no-untyped-def]
    from worklist import create_app

    application = create_app(runtime=runtime)
    application.config["TESTING"] = True
    return application


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@pytest.fixture
def on_postgres() -> bool:
    return TEST_DATABASE_URL.startswith("postgresql")
