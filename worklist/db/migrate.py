"""Schema migrations through Alembic, callable from the CLI, start-up and tests."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from alembic import command

ALEMBIC_DIR = Path(__file__).resolve().parents[2] / "alembic"


def alembic_config(engine: sa.Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    config.attributes["engine"] = engine
    return config


def for_dialect(dialect_name: str):  # type: ignore[no-untyped-def]
    """Alembic's `include_object` for `dialect_name`: leaves out of autogenerate's
    comparison what the models create only on another database (`Index.ddl_if`), which
    Alembic does not read."""

    def include_object(obj, _name, _type, _reflected, _compare_to) -> bool:  # type: ignore[no-untyped-def]
        only_on = getattr(obj, "_ddl_if", None)
        return only_on is None or only_on.dialect in (None, dialect_name)

    return include_object


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: sa.Engine, revision: str = "base") -> None:
    command.downgrade(alembic_config(engine), revision)


def head_revision(engine: sa.Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def is_at_head(engine: sa.Engine) -> bool:
    return current_revision(engine) == head_revision(engine)
