"""Where a slow SQLite priors call's time goes: a probe beside bench/worklist.py.

Not a test. bench/worklist.py gives the priors lookup's p50/p99; this says, per call,
what the time was spent on and what the call waited for, so that a tail can be put down
to its cause instead of guessed: wall and CPU time; the wait for the writer queue
(`worklist.db.sqlite_writers`), the statements and the COMMIT; how often the call
blocked (voluntary context switches: a page read from disk, a lock) and how much it
read from disk (getrusage); and whether a WAL checkpoint ran during it (the wal-index's
backfill count, in the -shm file). It measures a database kept by `bench/worklist.py
--keep`, as that script's priors part does (same patients for the same --seed).

What we found (2026-12-07, 100,000 ready / 2,000,000 history, one kept 1.2 GB file;
p50/p99 from bench/worklist.py's priors part, the same 200 patients each time; the
parts from this probe):

* The tail is pages read from disk, each read a wait, made longer by other work on the
  2 cores. The bench's patients are read for the first time, and this machine keeps
  little of the file in the page cache (288 MB of the 1.2 GB just after loading it).
  Page cache warm (the same patients again): p50 1.3-1.5 ms, p99 1.7-2.3. Cold (this
  file's pages dropped first): p50 3.0-3.3, p99 8.0-12.5 (load average 2.6-3.5 from
  other work); with two CPU-bound loops beside it p50 5.8, p99 13.8 (warm: p99 7.0);
  with a large write to the disk beside it p50 8.7, p99 23.1 -- the 14-26 ms seen
  before.
* A cold call blocks ~22 times (p99 ~60): per prior about four pages of its own (the
  study row, the report's index entry, the latest version's index entry and row), plus
  the patient and index leaves. Statement time follows the count of blocking reads; the
  call's CPU is 1.3 ms warm, 2.2 ms cold.
* Not WAL checkpoints: a priors call appends 2 WAL frames, so the default checkpoint
  (1,000 frames) comes once in ~500 calls, none in a 200-call run; that call's COMMIT
  took 4.4-6.5 ms. Not the writer queue (alone, it waits 0 ms), nor the audit row
  (insert 0.02 ms, COMMIT 0.04 ms).
* Rejected: a larger cache_size (64 MB) cut SQLite's cache misses a third (the B-tree
  interior pages), but those were page-cache hits; the blocking reads, and the time,
  stayed the same. It would not last in service either: a connection's cache is
  emptied whenever another connection has committed (with one next-case process
  writing, misses per call went from 0 to 50). mmap_size (2 GB) made it worse: this
  machine reads ahead 8 MB around each page fault (read_ahead_kb 8192), p99 31 ms.
* Beside next-case processes (the service as deployed), a priors call waits for the
  writer queue: every SQLite transaction takes it at its first statement (BEGIN
  IMMEDIATE), reads included, and holds it to COMMIT. `--claimers 1`: priors p50 3.4 ms,
  p99 10.4 (writer wait p50 1.0, p99 6.5); `--claimers 4`: p50 21 ms, p99 35 (wait p50
  17, p99 29), the page cache warm. Tried: a second lock as a gate, held by the next
  writer while it waits, so that one that has just committed cannot take the queue
  again first: with one claiming process p99 20 -> 11 ms in one pair of runs, with four
  no better (36 vs 64, then 33 vs 26 ms); not kept.

    .venv/bin/python bench/priors_probe.py --database sqlite:////tmp/.../bench.db
    ... --cold            # first drop this database file's pages from the page cache
    ... --claimers 4      # with 4 processes claiming next case meanwhile
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import resource
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from worklist.bootstrap import build_runtime  # noqa: E402
from worklist.clock import FixedClock  # noqa: E402
from worklist.config import Settings  # noqa: E402
from worklist.db import sqlite_writers  # noqa: E402
from worklist.db.models import User  # noqa: E402
from worklist.services import priors as priors_service  # noqa: E402
from worklist.services import worklist as service  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_worklist", ROOT / "bench" / "worklist.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

MEASURES = ("wall", "cpu", "writer_wait", "statements", "commit", "blocked", "disk_kb")
COUNTS = ("blocked", "disk_kb")


def wal_index(database: str) -> tuple[int, int]:
    """(last valid frame, frames backfilled into the database) from the -shm file's
    header (https://sqlite.org/walformat.html: mxFrame at byte 16, nBackfill at 96)."""
    try:
        with open(f"{database}-shm", "rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        return 0, 0
    if len(head) < 100:
        return 0, 0
    return struct.unpack_from("=I", head, 16)[0], struct.unpack_from("=I", head, 96)[0]


def drop_from_page_cache(database: str) -> None:
    """This file's pages only: other work's cached files are left alone."""
    fd = os.open(database, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(runtime: Any, parts: dict[str, float]) -> None:
    """Add each call's writer-queue wait, statement and COMMIT time to `parts`."""
    wait_turn = sqlite_writers.WriterQueue.wait_turn

    def waiting(queue: sqlite_writers.WriterQueue, dbapi_connection: Any) -> None:
        t0 = time.perf_counter()
        try:
            wait_turn(queue, dbapi_connection)
        finally:
            parts["writer_wait"] += time.perf_counter() - t0

    sqlite_writers.WriterQueue.wait_turn = waiting  # type: ignore[method-assign,assignment]
    started: list[float] = []
    sa.event.listen(runtime.engine, "before_cursor_execute",
                    lambda *_: started.append(time.perf_counter()))  # fmt: skip

    def executed(*_: Any) -> None:
        parts["statements"] += time.perf_counter() - started.pop()

    sa.event.listen(runtime.engine, "after_cursor_execute", executed)
    dialect = runtime.engine.dialect
    commit = dialect.do_commit

    def committing(dbapi_connection: Any) -> None:
        t0 = time.perf_counter()
        try:
            commit(dbapi_connection)
        finally:
            parts["commit"] += time.perf_counter() - t0

    dialect.do_commit = committing


def claiming(url: str, processes: int) -> Any:
    """Start `processes` radiologists claiming next case, each a process, as deployed;
    returns the function that stops them."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no connection inherited
    done = context.Event()
    children = [context.Process(target=_claim_until, args=(url, i, done)) for i in range(processes)]
    for child in children:
        child.start()
    time.sleep(2.0 if processes else 0)  # until they claim

    def stop() -> None:
        done.set()
        for child in children:
            child.join()

    return stop


def _claim_until(url: str, index: int, done: Any) -> None:
    settings = Settings(instance_path=Path(tempfile.gettempdir()), database_url=url,
                        environment="test", db_pool_size=1).validated()  # fmt: skip
    runtime = build_runtime(settings, clock=FixedClock(bench.NOW))
    with runtime.session() as s:
        user_id = s.scalars(
            sa.select(User.id).where(User.role == "radiologist").order_by(User.id)
        ).all()[index]
    while not done.is_set():
        with runtime.session() as s:
            if service.next_case(s, user=s.get(User, user_id), now=bench.NOW).study is None:
                break
    runtime.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", required=True, help="a SQLite database kept by --keep")
    parser.add_argument("--ready", type=int, default=100_000)
    parser.add_argument("--historical", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--cold", action="store_true", help="drop the file from the page cache")
    parser.add_argument("--claimers", type=int, default=0,
                        help="processes claiming next case meanwhile (returned after)")  # fmt: skip
    args = parser.parse_args(argv)
    database = sa.make_url(args.database).database
    assert args.database.startswith("sqlite") and database, "a SQLite file"
    if args.cold:
        drop_from_page_cache(database)
    settings = Settings(instance_path=Path(tempfile.gettempdir()), database_url=args.database,
                        environment="test", db_pool_size=1).validated()  # fmt: skip
    runtime = build_runtime(settings, clock=FixedClock(bench.NOW))
    parts = dict.fromkeys(("writer_wait", "statements", "commit"), 0.0)
    timed(runtime, parts)
    rng = random.Random(args.seed)  # the patients of bench/worklist.py's priors part
    with runtime.session() as s:
        name = f"bench-manager-{args.seed}"
        manager = s.scalar(sa.select(User).where(User.username == name))
        if manager is None:
            manager = User(username=name, role="manager", created_at=bench.NOW)
            s.add(manager)
            s.flush()
        manager_id = manager.id

    def view(study_id: int) -> int:
        with runtime.session() as s:
            found = priors_service.priors(
                s, study_id=study_id, user=s.get(User, manager_id), now=bench.NOW
            )
        return len(found)

    stop = claiming(args.database, args.claimers)
    for _ in range(bench.PRIORS_WARM_UP):
        view(rng.randint(args.historical + 1, args.historical + args.ready))
    calls = []
    for _ in range(args.repeats):
        study_id = rng.randint(args.historical + 1, args.historical + args.ready)
        for key in parts:
            parts[key] = 0.0
        frame, backfilled = wal_index(database)
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        cpu, t0 = time.thread_time(), time.perf_counter()
        priors = view(study_id)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu
        after = resource.getrusage(resource.RUSAGE_THREAD)
        frame_after, backfilled_after = wal_index(database)
        calls.append({
            "study_id": study_id, "priors": priors, "wall": wall, "cpu": cpu, **parts,
            "blocked": after.ru_nvcsw - usage.ru_nvcsw,
            "disk_kb": (after.ru_inblock - usage.ru_inblock) / 2,  # 512-byte blocks
            "checkpoint": backfilled_after != backfilled or frame_after < frame,
        })  # fmt: skip
    stop()
    if args.claimers:
        bench.return_all_claims(runtime)
    runtime.dispose()
    report(calls)
    return 0


def report(calls: list[dict[str, Any]]) -> None:
    print(f"{len(calls)} priors calls, load average {os.getloadavg()[0]:.2f}")
    for measure in MEASURES:
        values = [c[measure] for c in calls]
        scale, unit = (1, "") if measure in COUNTS else (1000, " ms")
        p50, p99 = (bench.percentile(values, p) * scale for p in (50, 99))
        most = max(values) * scale
        print(f"  {measure:12} p50 {p50:8.2f}  p99 {p99:8.2f}  max {most:8.2f}{unit}")
    print(f"  calls with a WAL checkpoint: {sum(c['checkpoint'] for c in calls)}")
    slowest = sorted(calls, key=lambda c: c["wall"], reverse=True)
    cut = max(1, len(calls) // 50)
    for name, group in (("slowest 2 %", slowest[:cut]), ("the rest", slowest[cut:])):
        mean = {m: statistics.fmean(c[m] for c in group) for m in (*MEASURES, "priors")}
        print(f"  {name:12} mean: wall {mean['wall'] * 1000:.2f} ms, cpu {mean['cpu'] * 1000:.2f},"
              f" writer wait {mean['writer_wait'] * 1000:.2f}, commit {mean['commit'] * 1000:.2f};"
              f" blocked {mean['blocked']:.1f} times, read {mean['disk_kb']:.0f} KB from disk;"
              f" {mean['priors']:.1f} priors")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
