"""Priority classes, turnaround targets, due times and the urgency score.

Owns the answer to "where does this study sit in the regional worklist, and
why". Pure: every function takes plain data and a `now`; the rules are data
(`worklist.domain.priority_rules.DEFAULT_RULES` or a region/trust document)
validated once by `load_rules`.

Ordering: effective tier first (1 = most urgent), then time left to breach.
Within a tier, "time left" = due_at - now, so ordering by due time gives the
same order at every instant; the urgency score therefore only changes when a
study's tier changes (an ageing step), which `Priority.review_at` tells the
scheduler. NHS England measures reporting turnaround from the examination to
the verified report, with a 28-day maximum for every examination.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from worklist.domain.priority_rules import DEFAULT_RULES

__all__ = [
    "AgeingStep",
    "OrderFacts",
    "PathwayClock",
    "Priority",
    "PriorityClass",
    "PriorityRule",
    "PriorityRulesError",
    "RuleSet",
    "TrustRules",
    "default_rules",
    "describe",
    "effort_for",
    "format_duration",
    "load_rules",
    "parse_duration",
    "parse_rules_json",
    "prioritise",
    "tier_from_urgency",
    "time_left",
    "urgency_floor",
    "urgency_score",
]

#: Attributes a rule may test, in the order an explanation lists them.
MATCH_KEYS = (
    "trust",
    "order_priority",
    "patient_class",
    "modality",
    "body_area",
    "procedure_code",
    "pathway",
)
CLOCK_START_FIELDS = ("performed_at", "images_available_at", "ready_at", "requested_at")
_CLOCK_START_WORDS = {
    "performed_at": "the examination",
    "images_available_at": "images available",
    "ready_at": "ready to report",
    "requested_at": "the request",
}
MAX_TIER = 9
# One tier spans more seconds than any due time since 1970 (until 2286), so a
# single float keeps (tier, due time) order exactly; 53-bit floats hold it to
# the second.
_TIER_SPAN = 10_000_000_000


class PriorityRulesError(ValueError):
    """A rules document is invalid; `problems` lists every problem with its path."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid priority rules:\n  " + "\n  ".join(self.problems))


# --- durations -------------------------------------------------------------

_DURATION = re.compile(
    r"^P(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?$"
)


def parse_duration(text: str) -> timedelta:
    """Parse the ISO 8601 durations the rules use (P28D, PT1H, P1DT12H, P2W)."""
    match = _DURATION.match(text.strip().upper()) if isinstance(text, str) else None
    if match is None or text.strip().upper() in ("P", "PT") or text.strip().upper().endswith("T"):
        raise ValueError(f"{text!r} is not an ISO 8601 duration such as PT1H or P28D")
    parts = {k: int(v) for k, v in match.groupdict().items() if v}
    return timedelta(**parts)


def format_duration(delta: timedelta) -> str:
    """A duration for people: '1 hour', '3 days', '2 h 15 min', '45 min'."""
    seconds = int(abs(delta).total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days and not hours:
        text = f"{days} day" + ("s" if days != 1 else "")
    elif days:
        text = f"{days} d {hours} h"
    elif hours and not minutes:
        text = f"{hours} hour" + ("s" if hours != 1 else "")
    elif hours:
        text = f"{hours} h {minutes} min"
    else:
        text = f"{minutes} min"
    return text


def _iso_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    time = "".join(f"{v}{u}" for v, u in ((hours, "H"), (minutes, "M"), (secs, "S")) if v)
    text = "P" + (f"{days}D" if days else "") + (f"T{time}" if time else "")
    return text if text != "P" else "PT0S"


# --- the rules as typed data -----------------------------------------------


@dataclass(frozen=True)
class AgeingStep:
    """Raise a study to `tier` once it has waited `after`, or is `overdue_by` past due."""

    tier: int
    after: timedelta | None = None
    overdue_by: timedelta | None = None

    def reached_at(self, clock_start: datetime, due_at: datetime) -> datetime:
        if self.after is not None:
            return clock_start + self.after
        assert self.overdue_by is not None
        return due_at + self.overdue_by

    def describe(self) -> str:
        if self.after is not None:
            return f"after waiting {format_duration(self.after)}"
        assert self.overdue_by is not None
        if not self.overdue_by:
            return "once past its due time"
        return f"once {format_duration(self.overdue_by)} past its due time"


@dataclass(frozen=True)
class PathwayClock:
    """A clock that started at referral, e.g. the 28-day Faster Diagnosis Standard."""

    name: str
    length: timedelta
    report_by: timedelta


@dataclass(frozen=True)
class PriorityClass:
    code: str
    label: str
    tier: int
    target: timedelta
    ageing: tuple[AgeingStep, ...] = ()
    pathway_clock: PathwayClock | None = None


@dataclass(frozen=True)
class PriorityRule:
    """First matching rule decides the class; `when` maps attribute -> accepted values."""

    name: str
    class_code: str
    when: Mapping[str, frozenset[str]]
    target: timedelta | None = None
    source: str = ""
    origin: str = "region"

    def matches(self, facts: OrderFacts) -> bool:
        return _matches(self.when, facts)


def _matches(when: Mapping[str, frozenset[str]], facts: OrderFacts) -> bool:
    for key, accepted in when.items():
        value = facts.trust_code if key == "trust" else getattr(facts, key)
        if value is None or str(value).strip().lower() not in accepted:
            return False
    return True


@dataclass(frozen=True)
class TrustRules:
    """The rules in force for one trust: the region's with that trust's overrides."""

    name: str
    version: int
    outer_bound: timedelta
    clock_start: tuple[str, ...]
    ageing_ceiling: int
    classes: Mapping[str, PriorityClass]
    rules: tuple[PriorityRule, ...]
    default_class: str
    effort_default: float
    effort_by_modality: Mapping[str, float]
    effort_by_procedure: Mapping[str, float]
    # Work that passes a full session's cap as stat work does (e.g. timing-critical orders).
    critical: tuple[CriticalRule, ...] = ()
    # A patient younger than this at the examination makes it a paediatric study: reported
    # by a radiologist with a paediatric credential (or one for any body area).
    paediatric_under_years: int | None = None


@dataclass(frozen=True)
class CriticalRule:
    """Orders matching `when` are critical: given even over a session's capacity."""

    name: str
    when: Mapping[str, frozenset[str]]
    source: str = ""

    def matches(self, facts: OrderFacts) -> bool:
        return _matches(self.when, facts)


@dataclass(frozen=True)
class RuleSet:
    """A validated rules document; `for_trust` resolves one trust's rules."""

    region: TrustRules
    trusts: Mapping[str, TrustRules] = field(default_factory=dict)

    def for_trust(self, trust_code: str | None) -> TrustRules:
        if trust_code is not None:
            found = self.trusts.get(trust_code.strip().upper())
            if found is not None:
                return found
        return self.region


# --- the study as the rules see it -------------------------------------------


@dataclass(frozen=True)
class OrderFacts:
    """What prioritisation needs to know about a study (plain data, no ORM)."""

    trust_code: str | None = None
    order_priority: str | None = None  # OBR-27 / ORC-7 / TQ1-9: S A R P T
    patient_class: str | None = None  # PV1-2: E I O ...
    modality: str | None = None
    body_area: str | None = None
    procedure_code: str | None = None
    pathway: str | None = None
    referral_at: datetime | None = None
    requested_at: datetime | None = None
    performed_at: datetime | None = None
    images_available_at: datetime | None = None
    ready_at: datetime | None = None
    patient_birth_date: date | None = None


@dataclass(frozen=True)
class Priority:
    """Where a study sits and why. `urgency`: higher is more urgent."""

    class_code: str
    class_label: str
    base_tier: int
    tier: int
    rule_name: str
    rule_source: str
    target: timedelta
    clock_start: datetime
    clock_start_field: str
    due_at: datetime
    due_reason: str  # "target" | "outer_bound" | "pathway"
    outer_bound_at: datetime
    pathway_name: str | None
    pathway_started_at: datetime | None
    pathway_ends_at: datetime | None
    ageing_reason: str | None
    review_at: datetime | None  # when the next ageing step will change the tier
    urgency: float
    rules_name: str
    rules_version: int
    critical: str | None = None  # the critical rule matched: passes a full session's cap
    paediatric: bool = False  # a child at the examination: needs a paediatric credential

    def explanation(self) -> dict[str, Any]:
        """JSON-ready explanation stored with the study (times in UTC ISO 8601)."""
        return {
            "rules": f"{self.rules_name} v{self.rules_version}",
            "rule": self.rule_name,
            "rule_source": self.rule_source,
            "class": self.class_code,
            "class_label": self.class_label,
            "base_tier": self.base_tier,
            "tier": self.tier,
            "target": _iso_duration(self.target),
            "target_text": format_duration(self.target),
            "clock_start": self.clock_start.isoformat(),
            "clock_start_field": self.clock_start_field,
            "due_at": self.due_at.isoformat(),
            "due_reason": self.due_reason,
            "outer_bound_at": self.outer_bound_at.isoformat(),
            "pathway": (
                None
                if self.pathway_name is None
                else {
                    "name": self.pathway_name,
                    "started_at": _iso(self.pathway_started_at),
                    "ends_at": _iso(self.pathway_ends_at),
                }
            ),
            "ageing": self.ageing_reason,
            "review_at": _iso(self.review_at),
            "urgency": self.urgency,
            "critical": self.critical,
            "paediatric": self.paediatric,
            "summary": self.summary(),
        }

    def summary(self, tz: tzinfo | None = None) -> str:
        """The explanation without the time left (which `describe` adds at read time)."""
        due = self.due_at.astimezone(tz or ZoneInfo("Europe/London")).strftime("%d %b %H:%M")
        start_word = _CLOCK_START_WORDS.get(self.clock_start_field, "first seen")
        text = (
            f"{self.class_label} (tier {self.tier}): rule '{self.rule_name}'; target "
            f"{format_duration(self.target)} from {start_word}; due {due}"
        )
        if self.due_reason == "outer_bound":
            text += " (the national 28-day maximum)"
        elif self.due_reason == "pathway" and self.pathway_name:
            text += f" ({self.pathway_name} clock)"
        if self.ageing_reason:
            text += f"; {self.ageing_reason}"
        if self.critical:
            text += f"; critical ({self.critical}): given even over a full session"
        return text


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# --- loading and validating rules --------------------------------------------


def default_rules() -> RuleSet:
    """The UK defaults, validated (cheap enough to call; callers may cache)."""
    return load_rules(DEFAULT_RULES)


def parse_rules_json(text: str) -> RuleSet:
    """Validate a rules document held as JSON text (a config file or database row)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PriorityRulesError([f"not valid JSON: {exc}"]) from exc
    return load_rules(document)


def load_rules(document: Mapping[str, Any]) -> RuleSet:
    """Validate a rules document; raise PriorityRulesError listing every problem."""
    problems: list[str] = []
    if not isinstance(document, Mapping):
        raise PriorityRulesError(["the document must be a JSON object"])
    known = {
        "version", "name", "outer_bound", "clock_start", "default_class", "ageing_ceiling",
        "classes", "rules", "effort", "trusts", "critical", "paediatric_under_years",
    }  # fmt: skip
    for key in document:
        if key not in known:
            problems.append(f"{key}: unknown key (expected one of {sorted(known)})")
    region = _resolve(document, None, "", problems)
    trusts: dict[str, TrustRules] = {}
    trust_docs = document.get("trusts", {}) or {}
    if not isinstance(trust_docs, Mapping):
        problems.append("trusts: must be an object keyed by trust code")
        trust_docs = {}
    for code, override in trust_docs.items():
        path = f"trusts.{code}."
        if not isinstance(override, Mapping):
            problems.append(f"trusts.{code}: must be an object")
            continue
        for key in override:
            if key not in ("classes", "rules", "effort", "name"):
                problems.append(f"{path}{key}: unknown key (expected classes, rules, effort)")
        resolved = _resolve(document, override, path, problems)
        if resolved is not None:
            trusts[str(code).strip().upper()] = resolved
    if problems or region is None:
        raise PriorityRulesError(problems or ["rules could not be resolved"])
    return RuleSet(region=region, trusts=trusts)


def _resolve(
    document: Mapping[str, Any],
    override: Mapping[str, Any] | None,
    path: str,
    problems: list[str],
) -> TrustRules | None:
    """Merge a trust's override over the region document, then type-check it."""
    start = len(problems)
    classes_doc: dict[str, Any] = copy.deepcopy(dict(document.get("classes") or {}))
    rules_doc: list[Any] = list(document.get("rules") or [])
    effort_doc: dict[str, Any] = copy.deepcopy(dict(document.get("effort") or {}))
    origin_of_rule = ["region"] * len(rules_doc)
    if override is not None:
        for code, partial in (override.get("classes") or {}).items():
            if not isinstance(partial, Mapping):
                problems.append(f"{path}classes.{code}: must be an object")
                continue
            merged = dict(classes_doc.get(code, {}))
            merged.update(partial)
            classes_doc[code] = merged
        trust_rules = list(override.get("rules") or [])
        rules_doc = trust_rules + rules_doc
        origin_of_rule = ["trust"] * len(trust_rules) + origin_of_rule
        for key, value in (override.get("effort") or {}).items():
            if isinstance(value, Mapping) and isinstance(effort_doc.get(key), Mapping):
                effort_doc[key] = {**effort_doc[key], **value}
            else:
                effort_doc[key] = value

    outer_bound = _duration(document.get("outer_bound", "P28D"), "outer_bound", problems)
    ceiling = document.get("ageing_ceiling", 2)
    if not isinstance(ceiling, int) or not 1 <= ceiling <= MAX_TIER:
        problems.append(f"ageing_ceiling: must be a whole number 1..{MAX_TIER}, got {ceiling!r}")
        ceiling = 1
    clock_start = document.get("clock_start", list(CLOCK_START_FIELDS))
    if (
        not isinstance(clock_start, list)
        or not clock_start
        or any(f not in CLOCK_START_FIELDS for f in clock_start)
    ):
        problems.append(f"clock_start: must be a list drawn from {list(CLOCK_START_FIELDS)}")
        clock_start = list(CLOCK_START_FIELDS)

    classes: dict[str, PriorityClass] = {}
    if not classes_doc:
        problems.append(f"{path}classes: at least one priority class is needed")
    for code, spec in classes_doc.items():
        cls = _priority_class(
            code, spec, f"{path}classes.{code}", outer_bound or timedelta(days=28), ceiling,
            problems,
        )  # fmt: skip
        if cls is not None:
            classes[code] = cls

    rules: list[PriorityRule] = []
    if not isinstance(rules_doc, list) or not rules_doc:
        problems.append(f"{path}rules: must be a non-empty list")
        rules_doc = []
    for index, (spec, origin) in enumerate(zip(rules_doc, origin_of_rule, strict=False)):
        rule = _rule(spec, f"{path}rules[{index}]", classes_doc, origin, problems)
        if rule is not None:
            rules.append(rule)

    critical_doc = document.get("critical") or []
    critical: list[CriticalRule] = []
    if not isinstance(critical_doc, list):
        problems.append("critical: must be a list of {name, when, source}")
        critical_doc = []
    for index, spec in enumerate(critical_doc):
        found = _critical_rule(spec, f"critical[{index}]", problems)
        if found is not None:
            critical.append(found)

    paediatric_under = document.get("paediatric_under_years")
    if paediatric_under is not None and (
        not isinstance(paediatric_under, int) or isinstance(paediatric_under, bool)
        or not 1 <= paediatric_under <= 25
    ):  # fmt: skip
        problems.append(
            "paediatric_under_years: must be a whole number of years 1..25, "
            f"got {paediatric_under!r}"
        )
        paediatric_under = None

    default_class = document.get("default_class")
    if default_class not in classes_doc:
        problems.append(f"default_class: {default_class!r} is not one of the classes")

    effort_default = effort_doc.get("default", 1.0)
    if not _positive_number(effort_default):
        problems.append(f"{path}effort.default: must be a positive number")
        effort_default = 1.0
    by_modality = _effort_table(effort_doc.get("modality", {}), f"{path}effort.modality", problems)
    by_procedure = _effort_table(
        effort_doc.get("procedure_code", {}), f"{path}effort.procedure_code", problems
    )
    for key in effort_doc:
        if key not in ("default", "modality", "procedure_code"):
            problems.append(f"{path}effort.{key}: unknown key")

    if len(problems) > start or outer_bound is None:
        return None
    name = str(document.get("name", "rules"))
    if override is not None and override.get("name"):
        name = f"{name} + {override['name']}"
    version = document.get("version", 1)
    return TrustRules(
        name=name,
        version=version if isinstance(version, int) else 1,
        outer_bound=outer_bound,
        clock_start=tuple(clock_start),
        ageing_ceiling=ceiling,
        classes=classes,
        rules=tuple(rules),
        default_class=str(default_class),
        effort_default=float(effort_default),
        effort_by_modality={k.upper(): float(v) for k, v in by_modality.items()},
        effort_by_procedure={k.upper(): float(v) for k, v in by_procedure.items()},
        critical=tuple(critical),
        paediatric_under_years=paediatric_under,
    )


def _duration(value: Any, path: str, problems: list[str]) -> timedelta | None:
    try:
        return parse_duration(value)
    except (ValueError, AttributeError):
        problems.append(f"{path}: {value!r} is not an ISO 8601 duration such as PT1H or P28D")
        return None


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _effort_table(table: Any, path: str, problems: list[str]) -> dict[str, float]:
    if not isinstance(table, Mapping):
        problems.append(f"{path}: must be an object of code -> relative effort")
        return {}
    good = {}
    for key, value in table.items():
        if _positive_number(value):
            good[str(key)] = float(value)
        else:
            problems.append(f"{path}.{key}: must be a positive number, got {value!r}")
    return good


def _priority_class(
    code: str,
    spec: Any,
    path: str,
    outer_bound: timedelta,
    ceiling: int,
    problems: list[str],
) -> PriorityClass | None:
    if not isinstance(spec, Mapping):
        problems.append(f"{path}: must be an object")
        return None
    start = len(problems)
    for key in spec:
        if key not in ("label", "tier", "target", "ageing", "pathway_clock"):
            problems.append(f"{path}.{key}: unknown key")
    tier = spec.get("tier")
    if not isinstance(tier, int) or isinstance(tier, bool) or not 1 <= tier <= MAX_TIER:
        problems.append(f"{path}.tier: must be a whole number 1..{MAX_TIER}, got {tier!r}")
        tier = MAX_TIER
    target = _duration(spec.get("target"), f"{path}.target", problems)
    if target is not None and target > outer_bound:
        problems.append(
            f"{path}.target: {spec.get('target')} is longer than the outer bound "
            f"({_iso_duration(outer_bound)})"
        )
    steps: list[AgeingStep] = []
    ageing = spec.get("ageing", [])
    if not isinstance(ageing, list):
        problems.append(f"{path}.ageing: must be a list of steps")
        ageing = []
    for index, step in enumerate(ageing):
        step_path = f"{path}.ageing[{index}]"
        if not isinstance(step, Mapping) or ("after" in step) == ("overdue_by" in step):
            problems.append(
                f"{step_path}: needs exactly one of 'after' or 'overdue_by', and 'tier'"
            )
            continue
        step_tier = step.get("tier")
        if not isinstance(step_tier, int) or not ceiling <= step_tier < tier:
            problems.append(
                f"{step_path}.tier: must raise the tier (below {tier}) but not above the "
                f"ageing ceiling {ceiling}, got {step_tier!r}"
            )
            continue
        key = "after" if "after" in step else "overdue_by"
        delta = _duration(step[key], f"{step_path}.{key}", problems)
        if delta is None:
            continue
        steps.append(AgeingStep(tier=step_tier, **{key: delta}))
    if target is not None and tier > ceiling and len(problems) == start:
        # Nothing waits forever: some step must bring the class to the ceiling
        # before the national maximum wait.
        latest_due = min(target, outer_bound)
        reaches = [
            s
            for s in steps
            if s.tier == ceiling
            and (
                (s.after is not None and s.after <= outer_bound)
                or (s.overdue_by is not None and latest_due + s.overdue_by <= outer_bound)
            )
        ]
        if not reaches:
            problems.append(
                f"{path}.ageing: must reach tier {ceiling} before the outer bound "
                f"({_iso_duration(outer_bound)}) so that nothing waits forever"
            )
    pathway = None
    if "pathway_clock" in spec:
        pc = spec["pathway_clock"]
        if not isinstance(pc, Mapping):
            problems.append(f"{path}.pathway_clock: must be an object")
        else:
            length = _duration(pc.get("length"), f"{path}.pathway_clock.length", problems)
            report_by = _duration(
                pc.get("report_by", pc.get("length")), f"{path}.pathway_clock.report_by", problems
            )
            if length and report_by:
                if report_by > length:
                    problems.append(f"{path}.pathway_clock.report_by: longer than its length")
                pathway = PathwayClock(str(pc.get("name", code)), length, report_by)
    if len(problems) > start or target is None:
        return None
    return PriorityClass(
        code=code,
        label=str(spec.get("label", code)),
        tier=tier,
        target=target,
        ageing=tuple(sorted(steps, key=lambda s: -s.tier)),
        pathway_clock=pathway,
    )


def _rule(
    spec: Any,
    path: str,
    classes_doc: Mapping[str, Any],
    origin: str,
    problems: list[str],
) -> PriorityRule | None:
    if not isinstance(spec, Mapping):
        problems.append(f"{path}: must be an object")
        return None
    start = len(problems)
    for key in spec:
        if key not in ("name", "source", "when", "class", "target"):
            problems.append(f"{path}.{key}: unknown key")
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{path}.name: every rule needs a name (it is shown to radiologists)")
        name = path
    class_code = spec.get("class")
    if class_code not in classes_doc:
        problems.append(f"{path}.class: {class_code!r} is not one of {sorted(classes_doc)}")
    when = _when(spec.get("when", {}), f"{path}.when", problems)
    target = None
    if "target" in spec:
        target = _duration(spec["target"], f"{path}.target", problems)
    if len(problems) > start:
        return None
    return PriorityRule(
        name=name,
        class_code=str(class_code),
        when=when,
        target=target,
        source=str(spec.get("source", "")),
        origin=origin,
    )


def _when(when_doc: Any, path: str, problems: list[str]) -> dict[str, frozenset[str]]:
    when: dict[str, frozenset[str]] = {}
    if not isinstance(when_doc, Mapping):
        problems.append(f"{path}: must be an object of attribute -> accepted values")
        return when
    for key, values in when_doc.items():
        if key not in MATCH_KEYS:
            problems.append(f"{path}.{key}: unknown attribute (expected one of {MATCH_KEYS})")
            continue
        if isinstance(values, str):
            values = [values]
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) for v in values)
        ):
            problems.append(f"{path}.{key}: must be a non-empty list of strings")
            continue
        when[key] = frozenset(v.strip().lower() for v in values)
    return when


def _critical_rule(spec: Any, path: str, problems: list[str]) -> CriticalRule | None:
    if not isinstance(spec, Mapping):
        problems.append(f"{path}: must be an object")
        return None
    start = len(problems)
    for key in spec:
        if key not in ("name", "source", "when"):
            problems.append(f"{path}.{key}: unknown key")
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{path}.name: every critical rule needs a name (it is shown)")
    when = _when(spec.get("when", {}), f"{path}.when", problems)
    if not when:
        problems.append(f"{path}.when: must name at least one attribute (else all is critical)")
    if len(problems) > start:
        return None
    return CriticalRule(name=str(name), when=when, source=str(spec.get("source", "")))


# --- prioritising a study ----------------------------------------------------


def urgency_score(tier: int, due_at: datetime) -> float:
    """One sortable number: higher = more urgent; tier first, then earlier due."""
    return float((MAX_TIER + 1 - tier) * _TIER_SPAN - int(due_at.timestamp()))


def tier_from_urgency(urgency: float) -> int:
    """The effective tier encoded in an urgency score (MAX_TIER for an unscored study)."""
    if urgency <= 0:
        return MAX_TIER
    return max(1, min(MAX_TIER, MAX_TIER + 1 - math.ceil(urgency / _TIER_SPAN)))


def urgency_floor(tier: int) -> float:
    """Every study of `tier` or a more urgent tier has an urgency above this."""
    return float((MAX_TIER - tier) * _TIER_SPAN)


def prioritise(facts: OrderFacts, rules: RuleSet | TrustRules, now: datetime) -> Priority:
    """Class, due time, tier after ageing, urgency and explanation for one study at `now`."""
    trust_rules = rules.for_trust(facts.trust_code) if isinstance(rules, RuleSet) else rules
    rule = next((r for r in trust_rules.rules if r.matches(facts)), None)
    cls = trust_rules.classes[rule.class_code if rule else trust_rules.default_class]
    target = rule.target if rule is not None and rule.target is not None else cls.target

    clock_field, clock_start = _clock_start(facts, trust_rules.clock_start, now)
    outer_bound_at = clock_start + trust_rules.outer_bound
    due_at, due_reason = clock_start + target, "target"
    if outer_bound_at < due_at:
        due_at, due_reason = outer_bound_at, "outer_bound"
    pathway_started = pathway_ends = None
    if cls.pathway_clock is not None and facts.referral_at is not None:
        pathway_started = facts.referral_at
        pathway_ends = facts.referral_at + cls.pathway_clock.length
        report_by = facts.referral_at + cls.pathway_clock.report_by
        if report_by < due_at:
            due_at, due_reason = report_by, "pathway"

    tier, ageing_reason = cls.tier, None
    for step in cls.ageing:
        if step.reached_at(clock_start, due_at) <= now and step.tier < tier:
            tier = step.tier
            ageing_reason = f"raised from tier {cls.tier} to {tier} {step.describe()}"
    pending = [
        step.reached_at(clock_start, due_at)
        for step in cls.ageing
        if step.tier < tier and step.reached_at(clock_start, due_at) > now
    ]
    review_at = min(pending) if pending else None

    return Priority(
        class_code=cls.code,
        class_label=cls.label,
        base_tier=cls.tier,
        tier=tier,
        rule_name=rule.name if rule else f"default class {cls.code}",
        rule_source=rule.source if rule else "",
        target=target,
        clock_start=clock_start,
        clock_start_field=clock_field,
        due_at=due_at,
        due_reason=due_reason,
        outer_bound_at=outer_bound_at,
        pathway_name=cls.pathway_clock.name if pathway_started and cls.pathway_clock else None,
        pathway_started_at=pathway_started,
        pathway_ends_at=pathway_ends,
        ageing_reason=ageing_reason,
        review_at=review_at,
        urgency=urgency_score(tier, due_at),
        rules_name=trust_rules.name,
        rules_version=trust_rules.version,
        critical=next((c.name for c in trust_rules.critical if c.matches(facts)), None),
        paediatric=_is_child(facts.patient_birth_date, clock_start, trust_rules),
    )


def _is_child(birth_date: date | None, examined_at: datetime, rules: TrustRules) -> bool:
    """Younger than the rules' paediatric age on the day of the examination (UK date)."""
    if birth_date is None or rules.paediatric_under_years is None:
        return False
    day = examined_at.astimezone(ZoneInfo("Europe/London")).date()
    age = day.year - birth_date.year - ((day.month, day.day) < (birth_date.month, birth_date.day))
    return age < rules.paediatric_under_years


def _clock_start(facts: OrderFacts, fields: Sequence[str], now: datetime) -> tuple[str, datetime]:
    for name in fields:
        value = getattr(facts, name)
        if value is not None:
            return name, value
    # A study with no timestamps at all: its clock starts when we first see it.
    return "now", now


def effort_for(facts: OrderFacts, rules: RuleSet | TrustRules) -> float:
    """Relative reporting effort: procedure code first, then modality, then the default."""
    trust_rules = rules.for_trust(facts.trust_code) if isinstance(rules, RuleSet) else rules
    if facts.procedure_code and facts.procedure_code.upper() in trust_rules.effort_by_procedure:
        return trust_rules.effort_by_procedure[facts.procedure_code.upper()]
    if facts.modality and facts.modality.upper() in trust_rules.effort_by_modality:
        return trust_rules.effort_by_modality[facts.modality.upper()]
    return trust_rules.effort_default


# --- explaining --------------------------------------------------------------


def time_left(due_at: datetime, now: datetime) -> timedelta:
    """Time left before breach; negative once breached."""
    return due_at - now


#: The keys of a stored explanation that `describe` reads: what an assignment keeps of its
#: study's explanation, to say later why the study stood where it did.
DESCRIBED_KEYS = ("class_label", "tier", "rule", "target_text", "clock_start_field", "due_at",
                  "due_reason", "pathway", "ageing")  # fmt: skip


def described(explanation: Mapping[str, Any]) -> dict[str, Any]:
    """What `describe` reads of a stored explanation (the keys it has, not null)."""
    return {k: explanation[k] for k in DESCRIBED_KEYS if explanation.get(k) is not None}


def describe(
    explanation: Priority | Mapping[str, Any],
    now: datetime,
    tz: tzinfo | None = None,
) -> str:
    """One line a radiologist reads: the rule, the target, the due time and the time left.

    Accepts a `Priority` or the stored `Priority.explanation()` dict, so the
    API can describe a study from its stored explanation without re-running
    the rules.
    """
    data = explanation.explanation() if isinstance(explanation, Priority) else explanation
    zone = tz or ZoneInfo("Europe/London")
    due_at = datetime.fromisoformat(data["due_at"])
    left = time_left(due_at, now)
    local_due = due_at.astimezone(zone)
    due_text = local_due.strftime("%H:%M") if local_due.date() == now.astimezone(zone).date() \
        else local_due.strftime("%d %b %H:%M")  # fmt: skip
    if left >= timedelta(0):
        left_text = f"{format_duration(left)} left"
    else:
        left_text = f"breached {format_duration(left)} ago"
    start_word = _CLOCK_START_WORDS.get(data["clock_start_field"], "first seen")
    parts = [
        f"{data['class_label']} (tier {data['tier']}): rule '{data['rule']}'",
        f"target {data['target_text']} from {start_word}",
        f"due {due_text} ({left_text})",
    ]
    if data.get("due_reason") == "outer_bound":
        parts.append("due at the national 28-day maximum")
    pathway = data.get("pathway")
    if pathway:
        ends = datetime.fromisoformat(pathway["ends_at"])
        days = (ends - now).total_seconds() / 86400
        if days >= 0:
            parts.append(f"{pathway['name']}: {int(days)} days left of the pathway clock")
        else:
            parts.append(f"{pathway['name']}: pathway clock ran out {int(-days)} days ago")
    if data.get("ageing"):
        parts.append(str(data["ageing"]))
    return "; ".join(parts)
