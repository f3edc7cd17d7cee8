"""Whether a radiologist may be given a study, and if not, every reason why.

The one place that says yes or no: the worklist query, next case, auto-
assignment and manual assignment all ask `may_report`. Pure: it takes plain
dataclasses (built by the services from database rows) and `now`.

Rules, each refusing on its own:
  1. a reporting agreement (honorary contract / practising privilege) for the
     study's trust, in force today (local date, start and end inclusive);
  2. a credential for the study's modality and body area or subspecialty;
  3. on a duty session now (home and remote sessions count);
  4. under that session's capacity (stat and critical work bypasses the cap);
  5. not excluded from this study (e.g. already gave one reading of a
     double-read study);
  6. not claimed by another radiologist.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from enum import StrEnum
from zoneinfo import ZoneInfo

__all__ = [
    "DutySlot",
    "Eligibility",
    "HeldCredential",
    "Radiologist",
    "Refusal",
    "RefusalCode",
    "ReportingAgreement",
    "StudyToRead",
    "PAEDIATRIC",
    "SUBSPECIALTY_BODY_AREAS",
    "credential_area",
    "agreements_expiring",
    "credential_covers",
    "current_session",
    "may_report",
]

LONDON = ZoneInfo("Europe/London")

#: Which body areas a subspecialty credential covers (lower case). A credential
#: whose body_area is None covers every area of its modality.
SUBSPECIALTY_BODY_AREAS: Mapping[str, frozenset[str]] = {
    "neuro": frozenset({"head", "brain", "neck", "spine", "head and neck", "orbits", "iam"}),
    "head_and_neck": frozenset({"neck", "head and neck", "sinuses", "orbits", "iam"}),
    "msk": frozenset(
        {
            "spine",
            "shoulder",
            "elbow",
            "wrist",
            "hand",
            "hip",
            "pelvis",
            "knee",
            "ankle",
            "foot",
            "upper limb",
            "lower limb",
            "msk",
        }
    ),  # fmt: skip
    "chest": frozenset({"chest", "thorax", "lung", "lungs", "cardiac", "heart"}),
    "body": frozenset({"abdomen", "pelvis", "chest abdomen pelvis", "liver", "renal", "kidney"}),
    "breast": frozenset({"breast"}),
    "paediatric": frozenset({"paed", "paeds", "paediatrics"}),  # as RIS code tables spell it
    "cardiac": frozenset({"cardiac", "heart", "coronary"}),
    "vascular": frozenset({"vascular", "aorta", "peripheral vascular"}),
}


#: The subspecialty of a child's study (under the rules' paediatric age at the examination).
PAEDIATRIC = "paediatric"
#: Other spellings of a subspecialty that credentials are entered with.
_SUBSPECIALTY_NAMES: Mapping[str, str] = {"paed": PAEDIATRIC, "paeds": PAEDIATRIC,
                                          "paediatrics": PAEDIATRIC}  # fmt: skip


def credential_area(body_area: str | None) -> str | None:
    """A credential's body area or subspecialty as the rules compare it (None = any)."""
    if body_area is None or not body_area.strip():
        return None
    held = body_area.strip().lower()
    return _SUBSPECIALTY_NAMES.get(held, held)


class RefusalCode(StrEnum):
    NO_AGREEMENT = "no_agreement"  # no reporting agreement for the trust at all
    AGREEMENT_NOT_STARTED = "agreement_not_started"
    AGREEMENT_ENDED = "agreement_ended"
    NO_CREDENTIAL = "no_credential"  # modality / body area / subspecialty not held
    OFF_DUTY = "off_duty"  # no duty session now
    OVER_CAPACITY = "over_capacity"  # session capacity reached (stat bypasses)
    EXCLUDED = "excluded"  # e.g. gave the other reading of a double read
    CLAIMED_BY_OTHER = "claimed_by_other"
    INACTIVE = "inactive"  # account disabled or not a reporting role


@dataclass(frozen=True)
class Refusal:
    code: RefusalCode
    message: str


@dataclass(frozen=True)
class Eligibility:
    """Yes, or no with every reason. Truthy when allowed."""

    reasons: tuple[Refusal, ...] = ()
    session: DutySlot | None = None

    @property
    def allowed(self) -> bool:
        return not self.reasons

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def codes(self) -> frozenset[RefusalCode]:
        return frozenset(r.code for r in self.reasons)

    def explain(self) -> str:
        if self.allowed:
            return "eligible"
        return "; ".join(r.message for r in self.reasons)


@dataclass(frozen=True)
class ReportingAgreement:
    """Permission to report for one trust, from `starts_on` to `ends_on` inclusive."""

    trust_id: int
    starts_on: date | None = None  # None = since ever
    ends_on: date | None = None  # None = open-ended
    trust_code: str | None = None  # for messages only
    user_id: int | None = None  # for manager warnings only

    def in_force(self, today: date) -> bool:
        started = self.starts_on is None or self.starts_on <= today
        return started and (self.ends_on is None or today <= self.ends_on)


@dataclass(frozen=True)
class HeldCredential:
    """A credential for a modality and a body area or subspecialty (None = any area)."""

    modality: str
    body_area: str | None = None


@dataclass(frozen=True)
class DutySlot:
    """A rota session: on duty from `starts_at` (inclusive) to `ends_at` (exclusive)."""

    starts_at: datetime
    ends_at: datetime
    capacity: float | None = None  # effort units held at once; None = no cap
    free_choice: bool = False  # a manager allowed picking from the list this session
    location: str | None = None
    session_id: int | None = None

    def covers(self, now: datetime) -> bool:
        return self.starts_at <= now < self.ends_at


@dataclass(frozen=True)
class Radiologist:
    """What eligibility needs to know about a radiologist (no ORM rows)."""

    user_id: int
    agreements: tuple[ReportingAgreement, ...] = ()
    credentials: tuple[HeldCredential, ...] = ()
    sessions: tuple[DutySlot, ...] = ()
    session_load: float = 0.0  # effort of the studies they hold (claimed) now
    active: bool = True


@dataclass(frozen=True)
class StudyToRead:
    """What eligibility needs to know about a study."""

    study_id: int
    trust_id: int
    modality: str | None
    body_area: str | None = None
    subspecialty: str | None = None  # e.g. paediatric, breast: needs that credential
    tier: int = 3
    critical: bool = False
    effort: float = 1.0
    claimed_by_id: int | None = None
    trust_code: str | None = None  # for messages only
    exclusions: Mapping[int, str] = field(default_factory=dict)  # user id -> why

    @property
    def bypasses_capacity(self) -> bool:
        """Stat (tier 1) and critical work is given even over the session cap."""
        return self.tier <= 1 or self.critical


def current_session(sessions: Iterable[DutySlot], now: datetime) -> DutySlot | None:
    """The duty session covering `now` (the one that ends last, if they overlap)."""
    covering = [s for s in sessions if s.covers(now)]
    return max(covering, key=lambda s: s.ends_at) if covering else None


def credential_covers(
    credential: HeldCredential,
    study: StudyToRead,
    areas: Mapping[str, frozenset[str]] = SUBSPECIALTY_BODY_AREAS,
) -> bool:
    """Does this credential cover the study's modality and body area / subspecialty?"""
    if credential.modality.strip().upper() not in ("*", (study.modality or "").strip().upper()):
        return False
    held = credential_area(credential.body_area)
    if held is None:
        return True
    if study.subspecialty:
        # A subspecialty study (paediatric, breast) needs that credential or an any-area one.
        return held == study.subspecialty.strip().lower()
    area = (study.body_area or "").strip().lower()
    return held == area or area in areas.get(held, frozenset())


def may_report(
    radiologist: Radiologist,
    study: StudyToRead,
    now: datetime,
    tz: tzinfo = LONDON,
    areas: Mapping[str, frozenset[str]] = SUBSPECIALTY_BODY_AREAS,
) -> Eligibility:
    """Every rule at once: yes, or no with all the reasons (never only the first)."""
    reasons: list[Refusal] = []
    trust = study.trust_code or f"trust {study.trust_id}"
    if not radiologist.active:
        reasons.append(Refusal(RefusalCode.INACTIVE, "account is not an active reporter"))

    today = now.astimezone(tz).date()
    agreements = [a for a in radiologist.agreements if a.trust_id == study.trust_id]
    if not agreements:
        reasons.append(Refusal(RefusalCode.NO_AGREEMENT, f"no reporting agreement for {trust}"))
    elif not any(a.in_force(today) for a in agreements):
        future = [a.starts_on for a in agreements if a.starts_on and a.starts_on > today]
        if len(future) == len(agreements):
            first = min(future)
            reasons.append(
                Refusal(
                    RefusalCode.AGREEMENT_NOT_STARTED,
                    f"reporting agreement for {trust} starts on {first.isoformat()}",
                )
            )
        else:
            ended = max(a.ends_on for a in agreements if a.ends_on is not None)
            reasons.append(
                Refusal(
                    RefusalCode.AGREEMENT_ENDED,
                    f"reporting agreement for {trust} ended on {ended.isoformat()}",
                )
            )

    if not any(credential_covers(c, study, areas) for c in radiologist.credentials):
        what = " ".join(x for x in (study.modality, study.subspecialty or study.body_area) if x)
        reasons.append(
            Refusal(RefusalCode.NO_CREDENTIAL, f"no credential for {what or 'this study'}")
        )

    session = current_session(radiologist.sessions, now)
    if session is None:
        reasons.append(Refusal(RefusalCode.OFF_DUTY, "not on a duty session now"))
    elif (
        session.capacity is not None
        and radiologist.session_load >= session.capacity
        and not study.bypasses_capacity
    ):
        reasons.append(
            Refusal(
                RefusalCode.OVER_CAPACITY,
                f"session capacity reached ({radiologist.session_load:g} of {session.capacity:g})",
            )
        )

    if radiologist.user_id in study.exclusions:
        reasons.append(Refusal(RefusalCode.EXCLUDED, study.exclusions[radiologist.user_id]))

    if study.claimed_by_id is not None and study.claimed_by_id != radiologist.user_id:
        reasons.append(
            Refusal(RefusalCode.CLAIMED_BY_OTHER, "already claimed by another radiologist")
        )
    return Eligibility(reasons=tuple(reasons), session=session)


def agreements_expiring(
    agreements: Iterable[ReportingAgreement],
    today: date,
    within: timedelta = timedelta(days=30),
) -> list[ReportingAgreement]:
    """Agreements in force today that end within `within`, soonest first (manager warnings)."""
    horizon = today + within
    soon = [
        a
        for a in agreements
        if a.ends_on is not None and a.in_force(today) and a.ends_on <= horizon
    ]
    return sorted(soon, key=lambda a: a.ends_on or today)
