"""Alembic environment: the URL comes from worklist.config (or the engine the caller passes)."""

from __future__ import annotations

import sqlalchemy as sa

from alembic import context
from worklist.bootstrap import create_db_engine
from worklist.config import Settings
from worklist.db.migrate import for_dialect
from worklist.db.models import Base

config = context.config
target_metadata = Base.metadata


def _engine() -> sa.Engine:
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    return create_db_engine(Settings.from_env().resolved_database_url)


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or Settings.from_env().resolved_database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = _engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things; batch mode recreates the table.
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
            include_object=for_dialect(connection.dialect.name),
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
