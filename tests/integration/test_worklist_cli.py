"""`worklist rules check` and the worklist jobs run by hand, through the CLI's own parser."""

from __future__ import annotations

import json
from datetime import timedelta

from tests.factories import make_study, make_trust, make_user
from worklist.cli import build_parser
from worklist.db.models import Study
from worklist.domain.priority_rules import DEFAULT_RULES


def run(runtime, *argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return args.handler(args, runtime)


def test_rules_check_accepts_the_defaults_and_names_every_problem_in_a_bad_file(
    runtime, tmp_path, capsys
):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({**DEFAULT_RULES, "trusts": {"RW6": {"rules": []}}}))
    assert run(runtime, "rules", "check", str(good)) == 0
    out = capsys.readouterr().out
    assert "tier 1  stat" in out and out.strip().endswith("valid") and "RW6:" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**DEFAULT_RULES, "outer_bound": "4 weeks", "default_class": "x"}))
    assert run(runtime, "rules", "check", str(bad)) == 1
    out = capsys.readouterr().out
    assert "outer_bound: '4 weeks' is not an ISO 8601 duration" in out
    assert "default_class: 'x' is not one of the classes" in out


def test_the_worklist_jobs_run_by_hand(runtime, clock, capsys):
    with runtime.session() as s:
        trust = make_trust(s, now=clock.now(), code="RW6")
        make_user(s, now=clock.now(), trusts=("RW6",), credentials=("CT",), on_duty=True)
        study_id = make_study(s, trust=trust, now=clock.now(), order_priority="S").id
    assert run(runtime, "reprioritise") == 0
    assert run(runtime, "auto-assign") == 0
    assert "assigned: 1" in capsys.readouterr().out
    clock.advance(timedelta(hours=1))
    assert run(runtime, "expire-claims") == 0
    assert "claims ended: 1" in capsys.readouterr().out
    with runtime.session() as s:
        study = s.get(Study, study_id)
        assert study.priority_class == "stat" and study.claimed_by_id is None
