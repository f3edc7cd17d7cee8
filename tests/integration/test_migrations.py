"""The migrations and the models describe the same schema, and can go down and up again."""

import warnings

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tests.factories import make_patient, make_study, make_trust, make_user
from worklist.db import migrate
from worklist.db.models import Base, Report, ReportVersion


def _differences(engine):
    with engine.connect() as connection, warnings.catch_warnings():
        # SQLite cannot reflect an index on an expression (ix_study_ready_by_area), so
        # Alembic leaves it out of the comparison there and says so; PostgreSQL compares it.
        warnings.filterwarnings("ignore", message=".*expression-based index")
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


def test_upgrading_gives_each_signed_version_its_reports_study(runtime, clock) -> None:
    """0008 fills report_version.study_id from the report for the versions already signed."""
    now = clock.now()
    with runtime.session() as s:
        trust = make_trust(s, now=now)
        reader = make_user(s, now=now, trusts=("RW6",))
        patient = make_patient(s, trust=trust, now=now)
        for _ in range(2):
            study = make_study(s, trust=trust, now=now, patient=patient, status="final")
            report = Report(study_id=study.id, status="final")
            report.versions = [
                ReportVersion(study_id=study.id, sequence=n, kind=kind, text=kind,
                              author_id=reader.id, signed_at=now)
                for n, kind in ((1, "final"), (2, "addendum"))
            ]  # fmt: skip
            s.add(report)
    migrate.downgrade(runtime.engine, "0007")
    migrate.upgrade(runtime.engine)
    with runtime.session() as s:
        pairs = s.execute(
            sa.select(ReportVersion.study_id, Report.study_id).join(ReportVersion.report)
        ).all()
    assert len(pairs) == 4
    assert all(version_study == report_study for version_study, report_study in pairs)
