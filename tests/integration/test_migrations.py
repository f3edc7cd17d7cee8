"""The migrations and the models describe the same schema, and can go down and up again."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from worklist.db import migrate
from worklist.db.models import Base


def _differences(engine):
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "include_object": migrate.for_dialect(connection.dialect.name),
            },
        )
        return compare_metadata(context, Base.metadata)


def test_autogenerate_finds_no_difference_between_migrations_and_models(runtime) -> None:
    assert migrate.is_at_head(runtime.engine)
    assert _differences(runtime.engine) == []


def test_downgrade_to_base_and_upgrade_again_gives_the_same_schema(runtime) -> None:
    migrate.downgrade(runtime.engine, "base")
    assert migrate.current_revision(runtime.engine) is None
    migrate.upgrade(runtime.engine)
    assert migrate.is_at_head(runtime.engine)
    assert _differences(runtime.engine) == []
