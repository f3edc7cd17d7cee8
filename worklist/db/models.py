"""The database schema as typed SQLAlchemy 2.x models.

One module so that a reader sees every table in one place and Alembic has one
metadata. Times are stored in UTC and come back timezone-aware on both SQLite
and PostgreSQL (`UTCDateTime`). Names follow a convention so that migrations
name constraints the same way on every database.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, whatever the database keeps."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; pass an aware datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONDict = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSONDict}


# --- Trusts and people ---------------------------------------------------------------


class Trust(Base):
    """A hospital trust: its ODS code, its RIS's HL7 identity and where reports go back."""

    __tablename__ = "trust"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(sa.String(16), unique=True)  # ODS code, e.g. RW6
    name: Mapped[str] = mapped_column(sa.String(200))
    # MSH-3 / MSH-4 of the trust's RIS; together they identify the sender.
    sending_application: Mapped[str | None] = mapped_column(sa.String(100))
    sending_facility: Mapped[str] = mapped_column(sa.String(100))
    # Where ORU^R01 reports are delivered (MLLP).
    ris_host: Mapped[str | None] = mapped_column(sa.String(255))
    ris_port: Mapped[int | None]
    ris_tls: Mapped[bool] = mapped_column(default=False)
    # Per-trust HL7 profile as data: {"inbound": {...}, "outbound": {...}}.
    hl7_profile: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # "original" (AA/AE/AR), "enhanced" (CA/CE/CR) or "auto" (as MSH-15/16 ask), HL7 v2 ch. 2.
    ack_mode: Mapped[str] = mapped_column(sa.String(16), default="original")
    # Source addresses allowed to send as this trust; empty = any.
    allowed_addresses: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    # Worklist entry rule: "exam_complete" (ORC-5 CM) or "images_available".
    ready_on: Mapped[str] = mapped_column(sa.String(32), default="exam_complete")
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime]

    __table_args__ = (sa.UniqueConstraint("sending_application", "sending_facility"),)


class Patient(Base):
    """A patient as one trust knows them (hospital number), linked regionally by NHS number."""

    __tablename__ = "patient"

    id: Mapped[int] = mapped_column(primary_key=True)
    # By trust through the unique (trust_id, local_id): no index of its own (0007).
    trust_id: Mapped[int] = mapped_column(sa.ForeignKey("trust.id"))
    local_id: Mapped[str] = mapped_column(sa.String(64))  # hospital number / MRN
    local_authority: Mapped[str | None] = mapped_column(sa.String(64))
    family_name: Mapped[str | None] = mapped_column(sa.String(200))
    given_name: Mapped[str | None] = mapped_column(sa.String(200))
    birth_date: Mapped[date | None]
    sex: Mapped[str | None] = mapped_column(sa.String(8))
    # The NHS number as sent (normalised to digits), whether it passed Modulus 11,
    # and its PID-32 status (NSTS01 = verified).
    nhs_number: Mapped[str | None] = mapped_column(sa.String(16))
    nhs_number_valid: Mapped[bool] = mapped_column(default=False)
    nhs_number_status: Mapped[str | None] = mapped_column(sa.String(16))
    # The regional link: the NHS number only when it is valid, else NULL. Priors join on it.
    link_nhs_number: Mapped[str | None] = mapped_column(sa.String(10), index=True)
    # Set when an ADT merge folded this record into another; nothing is deleted.
    merged_into_id: Mapped[int | None] = mapped_column(sa.ForeignKey("patient.id"))
    # MSH-7 of the newest message applied to this record: an older one never overwrites it.
    last_message_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]

    identifiers: Mapped[list[PatientIdentifier]] = relationship(
        back_populates="patient", cascade="all, delete-orphan"
    )

    __table_args__ = (
        sa.UniqueConstraint("trust_id", "local_id"),
        sa.CheckConstraint(
            "link_nhs_number IS NULL OR nhs_number_valid", name="link_only_valid_nhs_number"
        ),
    )


class PatientIdentifier(Base):
    """One PID-3 repetition: value, assigning authority and identifier type (HL7 table 0203)."""

    __tablename__ = "patient_identifier"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(sa.ForeignKey("patient.id"), index=True)
    value: Mapped[str] = mapped_column(sa.String(64))
    authority: Mapped[str | None] = mapped_column(sa.String(64))
    type_code: Mapped[str | None] = mapped_column(sa.String(16))

    patient: Mapped[Patient] = relationship(back_populates="identifiers")

    __table_args__ = (sa.Index("ix_patient_identifier_value", "value", "authority"),)


class User(Base):
    """A person (radiologist, manager, admin) or an integration account."""

    __tablename__ = "user_account"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(sa.String(64), unique=True)
    full_name: Mapped[str | None] = mapped_column(sa.String(200))
    role: Mapped[str] = mapped_column(sa.String(16))  # radiologist | manager | admin | integration
    password_hash: Mapped[str | None] = mapped_column(sa.String(256))
    home_trust_id: Mapped[int | None] = mapped_column(sa.ForeignKey("trust.id"))
    # Professional registration (GMC number) sent as OBR-32's id.
    professional_id: Mapped[str | None] = mapped_column(sa.String(32))
    # A trainee's report is preliminary until a consultant verifies it.
    can_finalise: Mapped[bool] = mapped_column(default=True)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime]
    # Edits to this user's agreements, credentials and duty sessions, counted by the
    # database's triggers (migration 0011): next case keeps those facts per connection
    # and checks this count in its claim statement instead of reading them again.
    facts_version: Mapped[int] = mapped_column(default=0, server_default="0")

    permissions: Mapped[list[ReportingPermission]] = relationship(
        back_populates="user", cascade="all, delete-orphan"
    )
    credentials: Mapped[list[Credential]] = relationship(
        back_populates="user", cascade="all, delete-orphan"
    )
    duty_sessions: Mapped[list[DutySession]] = relationship(
        back_populates="user", cascade="all, delete-orphan"
    )

    __table_args__ = (
        sa.CheckConstraint(
            "role IN ('radiologist', 'manager', 'admin', 'integration')", name="role"
        ),
    )


class ReportingPermission(Base):
    """A reporting agreement (honorary contract or privileges) to report for one trust."""

    __tablename__ = "reporting_permission"

    id: Mapped[int] = mapped_column(primary_key=True)
    # By user through the unique (user_id, trust_id): no index of its own (0007).
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("user_account.id"))
    trust_id: Mapped[int] = mapped_column(sa.ForeignKey("trust.id"))
    starts_on: Mapped[date | None]
    ends_on: Mapped[date | None]

    user: Mapped[User] = relationship(back_populates="permissions")
    trust: Mapped[Trust] = relationship()

    __table_args__ = (sa.UniqueConstraint("user_id", "trust_id"),)


class Credential(Base):
    """What a radiologist may report: a modality, optionally narrowed to a body area."""

    __tablename__ = "credential"

    id: Mapped[int] = mapped_column(primary_key=True)
    # By user through the unique (user_id, modality, body_area): no index of its own (0007).
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("user_account.id"))
    modality: Mapped[str] = mapped_column(sa.String(16))
    body_area: Mapped[str | None] = mapped_column(sa.String(32))  # None = any body area

    user: Mapped[User] = relationship(back_populates="credentials")

    __table_args__ = (sa.UniqueConstraint("user_id", "modality", "body_area"),)


class DutySession(Base):
    """A rota session: when a radiologist is on duty, where, and how much work it holds."""

    __tablename__ = "duty_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("user_account.id"), index=True)
    starts_at: Mapped[datetime]
    ends_at: Mapped[datetime]
    location: Mapped[str] = mapped_column(sa.String(16), default="hospital")  # hospital | home
    # Effort units the session may hold at once (None = no cap).
    capacity: Mapped[float | None]
    # A manager may allow picking freely from the list for this session.
    free_choice: Mapped[bool] = mapped_column(default=False)

    user: Mapped[User] = relationship(back_populates="duty_sessions")

    __table_args__ = (sa.CheckConstraint("ends_at > starts_at", name="ends_after_start"),)


class ApiToken(Base):
    """A bearer token for /api/v1; only its SHA-256 is stored."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("user_account.id"), index=True)
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    name: Mapped[str | None] = mapped_column(sa.String(100))
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship()


# --- Studies ----------------------------------------------------------------------------


#: See `Study.__table_args__`.
WAITING_BY_PATIENT = "ix_study_waiting_by_patient"
#: Its predicate: `pool.unclaimed_unindexed(READY)`, as the mates query writes it.
_WAITING_UNINDEXED = sa.text("coalesce(status, '') = 'ready' AND coalesce(claimed_by_id, 0) = 0")


#: A patient's studies with their status (migration 0012, PostgreSQL): the second column
#: is the expression the mates query tests (`pool.unclaimed_unindexed`), so next case
#: reads a patient's waiting studies and none of their history. SQLite has
#: ix_study_patient_id and WAITING_BY_PATIENT instead.
PATIENT_STATUS = "ix_study_patient_status"


#: The ready pool by body area (migration 0010): a worklist page filtered to a body area
#: walks it in worklist order, instead of walking the whole pool for the few of that area.
READY_BY_AREA = "ix_study_ready_by_area"
_BY_AREA = (sa.text("upper(body_area)"), "urgency", "id")
#: The columns the pool's rules test, so that a walk of the index reads no table row.
_BY_AREA_RULES = ("trust_id", "modality", "body_area", "claimed_by_id", "critical",
                  "paediatric", "status")  # fmt: skip


def _unclaimed(status: str) -> sa.TextClause:
    """A pool index's predicate: the unclaimed studies of one status."""
    return sa.text(f"status = '{status}' AND claimed_by_id IS NULL")


def _pool_index(name: str, status: str) -> sa.Index:
    """A pool's partial index: the unclaimed studies of one status, in worklist order."""
    where = _unclaimed(status)
    columns = ("status", "urgency", "id", "trust_id", "modality", "body_area", "claimed_by_id",
               "critical", "paediatric")  # fmt: skip
    return sa.Index(name, *columns, postgresql_where=where, sqlite_where=where)


class Study(Base):
    """One examination ordered by a trust; the unit of the worklist.

    Accession numbers are unique only within a trust, so the key is (trust, accession).
    """

    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    trust_id: Mapped[int] = mapped_column(sa.ForeignKey("trust.id"))
    patient_id: Mapped[int] = mapped_column(sa.ForeignKey("patient.id"))
    accession_number: Mapped[str] = mapped_column(sa.String(64))
    placer_order_number: Mapped[str | None] = mapped_column(sa.String(100))
    filler_order_number: Mapped[str | None] = mapped_column(sa.String(100))
    # EI.2 of ORC-2/ORC-3 as the trust sent them, so the ORU echoes the trust's numbers exactly.
    placer_order_namespace: Mapped[str | None] = mapped_column(sa.String(100))
    filler_order_namespace: Mapped[str | None] = mapped_column(sa.String(100))
    procedure_code: Mapped[str | None] = mapped_column(sa.String(64))
    # OBR-4.3 as sent (local RIS code table, NICIP, SNOMED CT).
    procedure_coding_system: Mapped[str | None] = mapped_column(sa.String(64))
    procedure_name: Mapped[str | None] = mapped_column(sa.String(200))
    modality: Mapped[str | None] = mapped_column(sa.String(16))
    body_area: Mapped[str | None] = mapped_column(sa.String(32))
    # Order priority as sent (OBR-27.6 / ORC-7.6 / TQ1-9): S, A, R, P, T...
    order_priority: Mapped[str | None] = mapped_column(sa.String(8))
    # PV1-2 patient class: E, I, O...
    patient_class: Mapped[str | None] = mapped_column(sa.String(8))
    # Pathway flag, e.g. "suspected_cancer", "screening", "double_read".
    pathway: Mapped[str | None] = mapped_column(sa.String(32))
    clinical_details: Mapped[str | None] = mapped_column(sa.Text)
    referrer: Mapped[str | None] = mapped_column(sa.String(200))
    referral_at: Mapped[datetime | None]
    requested_at: Mapped[datetime | None]
    scheduled_at: Mapped[datetime | None]
    performed_at: Mapped[datetime | None]
    images_available_at: Mapped[datetime | None]
    ready_at: Mapped[datetime | None]
    study_instance_uid: Mapped[str | None] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16))
    status_before_hold: Mapped[str | None] = mapped_column(sa.String(16))
    status_changed_at: Mapped[datetime]
    # Ordering of RIS messages: the MSH-7 and MSH-10 of the last applied message.
    last_message_at: Mapped[datetime | None]
    last_control_id: Mapped[str | None] = mapped_column(sa.String(64))
    # MSH-7 of the NW that placed the order; NULL while the study exists only because a later
    # message (e.g. SC/CM) arrived before its NW. A second NW for a placed order is a duplicate.
    order_placed_at: Mapped[datetime | None]
    # MSH-7 of the message that last spoke about the status (NW, SC, CA, DC, HD, RL). Status and
    # order details are ordered separately: a late CA still cancels after a newer XO.
    status_message_at: Mapped[datetime | None]
    # Messages older than last_message_at that were recorded but not allowed to overwrite.
    ignored_stale_messages: Mapped[int] = mapped_column(default=0, server_default="0")
    # Prioritisation, recomputed as time passes.
    priority_class: Mapped[str | None] = mapped_column(sa.String(32))
    due_at: Mapped[datetime | None]
    urgency: Mapped[float] = mapped_column(default=0.0)
    priority_explanation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Relative effort (RVU-like) for balancing workload.
    effort: Mapped[float] = mapped_column(default=1.0)
    # Matched a critical rule (e.g. a timing-critical order): given even over a full session.
    critical: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    # A child at the examination (the rules' paediatric age): needs a paediatric credential.
    paediatric: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    # The claim: a lease held by one radiologist at a time.
    claimed_by_id: Mapped[int | None] = mapped_column(sa.ForeignKey("user_account.id"))
    claimed_at: Mapped[datetime | None]
    claim_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    trust: Mapped[Trust] = relationship()
    patient: Mapped[Patient] = relationship()
    claimed_by: Mapped[User | None] = relationship()

    __table_args__ = (
        sa.UniqueConstraint("trust_id", "accession_number"),
        sa.Index("ix_study_trust_placer", "trust_id", "placer_order_number"),
        sa.Index("ix_study_trust_filler", "trust_id", "filler_order_number"),
        sa.Index("ix_study_status_urgency", "status", "urgency"),
        sa.Index("ix_study_claimed_by", "claimed_by_id"),
        # The shared pool: ready, unclaimed studies in worklist order (next case and the
        # worklist page read it top-down with ORDER BY urgency DESC, id DESC; a backward
        # scan of this small partial index instead of the whole study history). The constant
        # leading status column lets PostgreSQL use it for the order; the trailing columns
        # make it cover the candidate query (ids only; the stat-or-critical and paediatric
        # terms included), so SQLite too prefers it to ix_study_status_urgency, which walks
        # past every claimed study at the top.
        _pool_index("ix_study_ready_pool", "ready"),
        # The verification pool: preliminary reports awaiting a consultant, unclaimed, in
        # worklist order (worklist.services.verification reads it like the ready pool).
        _pool_index("ix_study_verification_pool", "preliminary"),
        # PostgreSQL: the rules' columns INCLUDEd (a smaller tree; its walks measured
        # faster); SQLite has no INCLUDE, so they are keys.
        sa.Index(
            READY_BY_AREA,
            *_BY_AREA,
            postgresql_include=_BY_AREA_RULES,
            postgresql_where=_unclaimed("ready"),
        ).ddl_if(dialect="postgresql"),
        sa.Index(
            READY_BY_AREA, *_BY_AREA, *_BY_AREA_RULES, sqlite_where=_unclaimed("ready")
        ).ddl_if(dialect="sqlite"),  # fmt: skip
        # SQLite only: a patient's waiting (ready, unclaimed) studies, which next case
        # claims with the one pulled: a few entries of this small index rather than every
        # study of the patient, history included (cold pages: 0.3 against 0.9 ms, inside
        # the write lock). Its predicate is the mates query's, which no other index
        # serves. Not on PostgreSQL (see `pool.unclaimed_unindexed`).
        sa.Index(WAITING_BY_PATIENT, "patient_id", sqlite_where=_WAITING_UNINDEXED).ddl_if(
            dialect="sqlite"
        ),
        sa.Index("ix_study_patient_id", "patient_id").ddl_if(dialect="sqlite"),
        sa.Index(PATIENT_STATUS, "patient_id", sa.text("coalesce(status, '')")).ddl_if(
            dialect="postgresql"
        ),
    )


class StudyStatusChange(Base):
    """Every status a study has had: who or which message moved it, and when."""

    __tablename__ = "study_status_change"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("study.id"), index=True)
    from_status: Mapped[str | None] = mapped_column(sa.String(16))
    to_status: Mapped[str] = mapped_column(sa.String(16))
    at: Mapped[datetime]
    reason: Mapped[str | None] = mapped_column(sa.String(500))
    # "hl7:<control id>", "user:<username>" or "system".
    source: Mapped[str | None] = mapped_column(sa.String(120))


class Assignment(Base):
    """Claim history: each time a study was given to someone, how, why, and how it ended."""

    __tablename__ = "assignment"
    # A reader's rows by time: a reader has years of them, and the worklist page (claims
    # taken away in the last 12 hours) and auto-assignment (the effort given this
    # session) want only the latest. Through an index of user_id alone each read every
    # row of the reader (62,000 in the benchmark's history: 0.24 s a worklist page).
    __table_args__ = (
        sa.Index("ix_assignment_user_started", "user_id", "started_at"),
        sa.Index("ix_assignment_user_ended", "user_id", "ended_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("study.id"), index=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("user_account.id"))
    kind: Mapped[str] = mapped_column(sa.String(16))  # pull | push | manual
    assigned_by_id: Mapped[int | None] = mapped_column(sa.ForeignKey("user_account.id"))
    started_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    # released | expired | signed | reassigned | cancelled | held
    end_reason: Mapped[str | None] = mapped_column(sa.String(200))
    explanation: Mapped[dict[str, Any]] = mapped_column(default=dict)


# --- Reports ----------------------------------------------------------------------------


class Report(Base):
    """The working report of a study: the autosaved draft. Signed versions are separate."""

    __tablename__ = "report"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("study.id"), unique=True)
    draft_text: Mapped[str] = mapped_column(sa.Text, default="")
    draft_author_id: Mapped[int | None] = mapped_column(sa.ForeignKey("user_account.id"))
    draft_saved_at: Mapped[datetime | None]
    # draft | preliminary | final (the latest signed kind; addenda keep it final)
    status: Mapped[str] = mapped_column(sa.String(16), default="draft")

    versions: Mapped[list[ReportVersion]] = relationship(
        back_populates="report", order_by="ReportVersion.sequence"
    )


class ReportVersion(Base):
    """A signed version: immutable once written (preliminary, final or addendum)."""

    __tablename__ = "report_version"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Looked up through the unique (report_id, sequence): no index of its own (0007).
    report_id: Mapped[int] = mapped_column(sa.ForeignKey("report.id"))
    # The report's study, which a version never changes: priors find a study's versions
    # by it (ix_report_version_study_id_sequence) without reading the report (0008).
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("study.id"))
    sequence: Mapped[int]
    kind: Mapped[str] = mapped_column(sa.String(16))  # preliminary | final | addendum
    text: Mapped[str] = mapped_column(sa.Text)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("user_account.id"))
    verifier_id: Mapped[int | None] = mapped_column(sa.ForeignKey("user_account.id"))
    signed_at: Mapped[datetime]
    urgent_finding: Mapped[bool] = mapped_column(default=False)

    report: Mapped[Report] = relationship(back_populates="versions")

    __table_args__ = (
        sa.UniqueConstraint("report_id", "sequence"),
        sa.Index("ix_report_version_study_id_sequence", "study_id", "sequence"),
    )


class Alert(Base):
    """Something a manager must see until someone acknowledges it (urgent finding, parked ORU)."""

    __tablename__ = "alert"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(32))
    # Whom it is for (e.g. the radiologist whose claim was withdrawn); None = the managers.
    user_id: Mapped[int | None] = mapped_column(sa.ForeignKey("user_account.id"), index=True)
    study_id: Mapped[int | None] = mapped_column(sa.ForeignKey("study.id"), index=True)
    trust_id: Mapped[int | None] = mapped_column(sa.ForeignKey("trust.id"))
    message: Mapped[str] = mapped_column(sa.String(1000))
    created_at: Mapped[datetime]
    acknowledged_by_id: Mapped[int | None] = mapped_column(sa.ForeignKey("user_account.id"))
    acknowledged_at: Mapped[datetime | None]


class ReportTemplateRow(Base):
    """A stored report template: starting text per procedure/modality, for one trust or the
    region (trust_id None). The rules that pick one are `worklist.domain.reports`."""

    __tablename__ = "report_template"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    trust_id: Mapped[int | None] = mapped_column(sa.ForeignKey("trust.id"), index=True)
    procedure_code: Mapped[str | None] = mapped_column(sa.String(64))  # None = any procedure
    modality: Mapped[str | None] = mapped_column(sa.String(16))  # None = any modality
    text: Mapped[str] = mapped_column(sa.Text)  # with {{placeholders}}
    active: Mapped[bool] = mapped_column(default=True)
    created_by_id: Mapped[int | None] = mapped_column(sa.ForeignKey("user_account.id"))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    # NULLs are distinct in a unique key, so the service also refuses a second regional name.
    __table_args__ = (sa.UniqueConstraint("name", "trust_id"),)


class ReportMacro(Base):
    """A radiologist's personal macro: typing the trigger (e.g. ".normchest") inserts the text."""

    __tablename__ = "report_macro"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("user_account.id"))
    name: Mapped[str] = mapped_column(sa.String(40))  # the trigger word, lower case, with its dot
    text: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (sa.UniqueConstraint("user_id", "name"),)


# --- HL7 messages -------------------------------------------------------------------------


class InboundMessage(Base):
    """Every HL7 message received, stored raw before it is acknowledged."""

    __tablename__ = "inbound_message"

    id: Mapped[int] = mapped_column(primary_key=True)
    trust_id: Mapped[int | None] = mapped_column(sa.ForeignKey("trust.id"), index=True)
    sending_application: Mapped[str | None] = mapped_column(sa.String(100))
    sending_facility: Mapped[str | None] = mapped_column(sa.String(100))
    control_id: Mapped[str | None] = mapped_column(sa.String(100))
    message_type: Mapped[str | None] = mapped_column(sa.String(32))
    message_time: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(index=True)
    peer: Mapped[str | None] = mapped_column(sa.String(100))
    raw: Mapped[bytes] = mapped_column(sa.LargeBinary)
    # received | applied | duplicate | failed | rejected
    state: Mapped[str] = mapped_column(sa.String(16), index=True)
    error: Mapped[str | None] = mapped_column(sa.Text)
    ack: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    ack_code: Mapped[str | None] = mapped_column(sa.String(4))
    applied_at: Mapped[datetime | None]
    # Search keys pulled out when the message is applied.
    accession_number: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    patient_identifier: Mapped[str | None] = mapped_column(sa.String(64), index=True)

    __table_args__ = (
        sa.Index(
            "ix_inbound_message_sender_control",
            "sending_application",
            "sending_facility",
            "control_id",
        ),
    )


class OutboundMessage(Base):
    """The outbox: one ORU per signed report version, written with it, delivered at least once."""

    __tablename__ = "outbound_message"

    id: Mapped[int] = mapped_column(primary_key=True)
    trust_id: Mapped[int] = mapped_column(sa.ForeignKey("trust.id"), index=True)
    study_id: Mapped[int | None] = mapped_column(sa.ForeignKey("study.id"), index=True)
    report_version_id: Mapped[int | None] = mapped_column(sa.ForeignKey("report_version.id"))
    # MSH-10 we send; reused on every retry so a RIS that checks it applies it once.
    control_id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    message_type: Mapped[str] = mapped_column(sa.String(32), default="ORU^R01")
    payload: Mapped[str] = mapped_column(sa.Text)
    # pending | delivered | parked
    state: Mapped[str] = mapped_column(sa.String(16), index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    last_ack_code: Mapped[str | None] = mapped_column(sa.String(4))
    last_ack: Mapped[str | None] = mapped_column(sa.Text)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]


# --- Audit and operations -----------------------------------------------------------------


class AuditEvent(Base):
    """Who did what, when, from where. Written, never edited, by the application."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    user_id: Mapped[int | None] = mapped_column(sa.ForeignKey("user_account.id"))
    username: Mapped[str | None] = mapped_column(sa.String(64))
    action: Mapped[str] = mapped_column(sa.String(64))
    object_type: Mapped[str | None] = mapped_column(sa.String(32))
    object_id: Mapped[str | None] = mapped_column(sa.String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    remote_addr: Mapped[str | None] = mapped_column(sa.String(64))


class SchedulerLease(Base):
    """The scheduler's leader lease, for databases without advisory locks (SQLite)."""

    __tablename__ = "scheduler_lease"

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(sa.String(128))
    expires_at: Mapped[datetime]
