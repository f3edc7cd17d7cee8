"""`worklist rules ...` (check and print prioritisation rules) and the worklist jobs by hand
(`worklist reprioritise`, `worklist expire-claims`, `worklist auto-assign`), registered by
`worklist.cli`."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from worklist.bootstrap import Runtime
from worklist.domain.priority import PriorityRulesError, format_duration, parse_rules_json
from worklist.domain.priority_rules import DEFAULT_RULES
from worklist.services import auto_assignment
from worklist.services import worklist as service


def register(sub: Any) -> None:
    p = sub.add_parser("rules", help="prioritisation rules: check a document, print the defaults")
    rsub = p.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    r = rsub.add_parser("check", help="validate a rules JSON file and summarise it per trust")
    r.add_argument("path", type=Path, help="the rules document (JSON)")
    r.set_defaults(handler=cmd_rules_check)
    r = rsub.add_parser("defaults", help="print the UK default rules as JSON (a starting point)")
    r.set_defaults(handler=cmd_rules_defaults)

    p = sub.add_parser("reprioritise", help="recompute every ready study's priority now")
    p.set_defaults(handler=cmd_reprioritise)
    p = sub.add_parser("expire-claims", help="return expired claims to the pool now")
    p.set_defaults(handler=cmd_expire_claims)
    p = sub.add_parser("auto-assign", help="push waiting studies to on-duty radiologists now")
    p.set_defaults(handler=cmd_auto_assign)


def cmd_rules_check(args: argparse.Namespace, runtime: Runtime) -> int:
    try:
        rules = parse_rules_json(Path(args.path).read_text(encoding="utf-8"))
    except OSError as exc:
        print(f"cannot read {args.path}: {exc}")
        return 2
    except PriorityRulesError as exc:
        print(exc)
        return 1
    for code, trust_rules in [("region", rules.region), *sorted(rules.trusts.items())]:
        print(f"{code}: {trust_rules.name} v{trust_rules.version}; "
              f"outer bound {format_duration(trust_rules.outer_bound)}")  # fmt: skip
        for cls in sorted(trust_rules.classes.values(), key=lambda c: (c.tier, c.target)):
            print(f"  tier {cls.tier}  {cls.code:<20} target {format_duration(cls.target)}")
        print(f"  {len(trust_rules.rules)} rules, first match wins")
    print("valid")
    return 0


def cmd_rules_defaults(args: argparse.Namespace, runtime: Runtime) -> int:
    print(json.dumps(DEFAULT_RULES, indent=2))
    return 0


def cmd_reprioritise(args: argparse.Namespace, runtime: Runtime) -> int:
    with runtime.session() as session:
        changed = service.reprioritise(
            session, now=runtime.clock.now(), rules=service.rules_for(runtime.settings)
        )
    print(f"reprioritised: {changed} studies changed")
    return 0


def cmd_expire_claims(args: argparse.Namespace, runtime: Runtime) -> int:
    with runtime.session() as session:
        ended = service.expire_claims(session, now=runtime.clock.now())
    print(f"claims ended: {ended}")
    return 0


def cmd_auto_assign(args: argparse.Namespace, runtime: Runtime) -> int:
    lease = timedelta(minutes=runtime.settings.claim_lease_minutes)
    with runtime.session() as session:
        made = auto_assignment.auto_assign(session, now=runtime.clock.now(), lease=lease)
        for assignment in made:
            print(f"study {assignment.study_id} -> user {assignment.user_id}: "
                  f"{assignment.explanation['why']}")  # fmt: skip
    print(f"assigned: {len(made)}")
    return 0
