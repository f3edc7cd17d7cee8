"""The model's constraints, on whichever database the suite runs against."""

import pytest
import sqlalchemy as sa

from tests.factories import make_patient, make_study, make_trust
from worklist.db.models import Patient, Study
from worklist.services.patients import regional_records


def test_the_same_accession_number_in_two_trusts_is_two_studies(runtime, clock) -> None:
    with runtime.session() as session:
        bolton = make_trust(session, now=clock.now(), code="RMC")
        stockport = make_trust(session, now=clock.now(), code="RWJ")
        make_study(session, trust=bolton, now=clock.now(), accession_number="A1000")
        make_study(session, trust=stockport, now=clock.now(), accession_number="A1000")
    with runtime.session() as session:
        assert (
            session.scalar(sa.select(sa.func.count()).where(Study.accession_number == "A1000")) == 2
        )


def test_the_same_accession_number_twice_in_one_trust_is_refused_by_name(runtime, clock) -> None:
    with runtime.session() as session:
        trust = make_trust(session, now=clock.now(), code="RMC")
        make_study(session, trust=trust, now=clock.now(), accession_number="A1000")
    with pytest.raises(
        sa.exc.IntegrityError, match="uq_study_trust_id|UNIQUE constraint failed: study"
    ):
        with runtime.session() as session:
            trust = session.scalar(sa.select(sa.orm.aliased(type(trust))).limit(1))
            make_study(session, trust=trust, now=clock.now(), accession_number="A1000")
    with runtime.session() as session:  # nothing already stored was lost
        assert session.scalar(sa.select(sa.func.count()).select_from(Study)) == 1


def test_an_invalid_nhs_number_is_stored_but_never_links_patients(runtime, clock) -> None:
    with runtime.session() as session:
        bolton = make_trust(session, now=clock.now(), code="RMC")
        stockport = make_trust(session, now=clock.now(), code="RWJ")
        a = make_patient(session, trust=bolton, now=clock.now(), nhs_number="9219068409")
        b = make_patient(session, trust=stockport, now=clock.now(), nhs_number="921 906 8409")
        assert a.nhs_number == b.nhs_number == "9219068409"
        assert not a.nhs_number_valid and a.link_nhs_number is None
        assert regional_records(session, patient=a) == [a]
        assert regional_records(session, patient=b) == [b]


def test_a_valid_nhs_number_links_the_same_person_across_trusts(runtime, clock) -> None:
    with runtime.session() as session:
        bolton = make_trust(session, now=clock.now(), code="RMC")
        stockport = make_trust(session, now=clock.now(), code="RWJ")
        a = make_patient(session, trust=bolton, now=clock.now(), nhs_number="9434765919")
        b = make_patient(session, trust=stockport, now=clock.now(), nhs_number="943 476 5919")
        assert {p.id for p in regional_records(session, patient=a)} == {a.id, b.id}


def test_the_database_refuses_a_link_through_an_invalid_nhs_number(runtime, clock) -> None:
    with runtime.session() as session:
        trust = make_trust(session, now=clock.now(), code="RMC")
        patient = make_patient(session, trust=trust, now=clock.now(), nhs_number="9219068409")
        patient_id = patient.id
    with pytest.raises(sa.exc.IntegrityError, match="link_only_valid_nhs_number|CHECK constraint"):
        with runtime.session() as session:
            session.execute(
                sa.update(Patient)
                .where(Patient.id == patient_id)
                .values(link_nhs_number="9219068409")
            )


def test_times_come_back_timezone_aware_in_utc(runtime, clock) -> None:
    with runtime.session() as session:
        trust = make_trust(session, now=clock.now(), code="RMC")
        study_id = make_study(session, trust=trust, now=clock.now()).id
    with runtime.session() as session:
        study = session.get(Study, study_id)
        assert study.created_at == clock.now()
        assert study.created_at.utcoffset().total_seconds() == 0


# SQLite cannot reflect an index on an expression (ix_study_ready_by_area) and says so.
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
def test_no_index_repeats_the_leading_columns_of_another(runtime) -> None:
    """An index on the leading columns of another index (or unique constraint) serves no
    lookup the other does not, and every insert pays for it. Migration 0007 dropped four
    such; one was on report_version, a row per signed report."""
    inspector = sa.inspect(runtime.engine)
    repeated = []
    for table in inspector.get_table_names():
        if table == "alembic_version":
            continue
        plain = [
            (index["name"], tuple(index["column_names"]))
            for index in inspector.get_indexes(table)
            if not any(option.endswith("_where") for option in index.get("dialect_options", {}))
            and None not in index["column_names"]  # an expression index
        ]
        covering = plain + [
            (constraint["name"], tuple(constraint["column_names"]))
            for constraint in inspector.get_unique_constraints(table)
        ]
        primary = inspector.get_pk_constraint(table)["constrained_columns"]
        covering.append(("primary key", tuple(primary)))
        for name, columns in plain:
            for other, longer in covering:
                if (
                    other != name
                    and len(longer) > len(columns)
                    and longer[: len(columns)] == columns
                ):
                    repeated.append(f"{table}.{name} {columns} leads {other} {longer}")
    assert not repeated, repeated
