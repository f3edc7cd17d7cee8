"""Next case, two versions of the code at once: which claims faster on this machine.

Not a test. These machines are shared and their speed moves by a third within minutes,
so two versions measured one after the other differ by more than most changes do. Here
both run at the same time, on the same CPUs: 8 processes, one radiologist each, as
`bench/worklist.py` runs next case at 8, four running version A and four version B.
Each round swaps which radiologists each version serves. It prints each version's
claims per second and CPU a claim, round by round, then B's claims as a share of A's.

The same code as A and B gave B/A 0.951 and 1.024 on PostgreSQL and 1.002 on SQLite
(2 rounds each, 2026-12-08); use 4 rounds or more and read a difference under ~5 % as
none.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python bench/ab_next_case.py --database URL --a /tmp/before --b .

URL: a database kept by `bench/worklist.py --keep`. Version A and B are checkouts
(the `worklist` package is imported from each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)  # as bench/worklist.py
READERS = (1, 2, 3, 4, 5, 6, 7, 8)


def worker(args: argparse.Namespace) -> None:
    """One process claiming for one radiologist from `args.start` for `args.duration`
    seconds, with the code of `args.code`; prints its claims and CPU a claim."""
    sys.path.insert(0, str(Path(args.code).resolve()))
    import worklist
    from worklist.bootstrap import build_runtime, settle_after_start_up
    from worklist.clock import FixedClock
    from worklist.config import Settings
    from worklist.services import accounts
    from worklist.services import worklist as service

    assert worklist.__file__.startswith(str(Path(args.code).resolve())), worklist.__file__
    settings = Settings(instance_path=Path(tempfile.gettempdir()), database_url=args.database,
                        environment="test", db_pool_size=1).validated()  # fmt: skip
    runtime = build_runtime(settings, clock=FixedClock(NOW))
    settle_after_start_up()

    def claim() -> bool:
        with runtime.session(read_committed=True) as session:
            user = accounts.get_user(session, args.user)
            return service.next_case(session, user=user, now=NOW).study is not None

    for _ in range(10):  # statements built and prepared, as bench/worklist.py does
        claim()
    time.sleep(max(0.0, args.start - time.time()))
    cpu, claims = time.process_time(), 0
    while time.time() < args.start + args.duration and claim():
        claims += 1
    cpu_ms = 1000 * (time.process_time() - cpu) / max(claims, 1)
    print(json.dumps({"claims": claims, "cpu_ms": cpu_ms}))
    runtime.dispose()


def return_claims(database: str) -> None:
    """The pool as loaded again (bench/worklist.py's `return_all_claims`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_worklist", ROOT / "bench" / "worklist.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings = bench.Settings(instance_path=Path(tempfile.gettempdir()), database_url=database,
                              environment="test", db_pool_size=2).validated()  # fmt: skip
    runtime = bench.build_runtime(settings)
    try:
        bench.return_all_claims(runtime)
    finally:
        runtime.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", required=True)
    parser.add_argument("--a", required=True, help="checkout of version A")
    parser.add_argument("--b", required=True, help="checkout of version B")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds a round")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--user", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    totals = {"A": [0, 0.0], "B": [0, 0.0]}
    for index in range(args.rounds):
        half = READERS[index % 2 :: 2], READERS[1 - index % 2 :: 2]
        start = time.time() + 10  # imports and warm-up first
        running = [
            (version, subprocess.Popen(
                [sys.executable, __file__, "--worker", "--database", args.database,
                 "--a", args.a, "--b", args.b, "--code", code, "--user", str(user),
                 "--start", str(start), "--duration", str(args.duration)],
                stdout=subprocess.PIPE, text=True,
            ))
            for version, code, readers in (("A", args.a, half[0]), ("B", args.b, half[1]))
            for user in readers
        ]  # fmt: skip
        figures = {"A": [0, 0.0], "B": [0, 0.0]}
        for version, process in running:
            out, _ = process.communicate()
            done = json.loads(out.strip().splitlines()[-1])
            figures[version][0] += done["claims"]
            figures[version][1] += done["cpu_ms"] * done["claims"]
        return_claims(args.database)
        line = []
        for version, (claims, cpu) in figures.items():
            totals[version][0] += claims
            totals[version][1] += cpu
            line.append(f"{version} {claims / args.duration:.0f}/s, "
                        f"CPU {cpu / max(claims, 1):.2f} ms a claim")  # fmt: skip
        print(f"round {index + 1}: " + "; ".join(line), flush=True)
    share = totals["B"][0] / max(totals["A"][0], 1)
    print("all rounds: " + "; ".join(
        f"{v} {c / args.duration / args.rounds:.0f}/s, CPU {t / max(c, 1):.2f} ms a claim"
        for v, (c, t) in totals.items()
    ) + f"; B/A {share:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
