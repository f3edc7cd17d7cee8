"""Exactly one scheduler leads; a second one waits as standby and takes over when the first goes."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from worklist.bootstrap import build_runtime
from worklist.scheduler import Job, LeaderLock, run_scheduler


def test_a_second_scheduler_is_refused_the_lead_while_the_first_holds_it(runtime) -> None:
    first = LeaderLock(runtime, holder="node-a")
    second = LeaderLock(build_runtime(runtime.settings, clock=runtime.clock), holder="node-b")
    try:
        assert first.try_acquire()
        assert not second.try_acquire()
        assert first.try_acquire()  # renewing is fine
        first.release()
        assert second.try_acquire()
        assert not first.try_acquire()
    finally:
        first.release()
        second.release()
        second.runtime.dispose()


def test_a_standby_takes_over_when_the_leader_dies_without_releasing(runtime, clock) -> None:
    other = build_runtime(runtime.settings, clock=clock)
    first = LeaderLock(runtime, holder="node-a")
    second = LeaderLock(other, holder="node-b")
    try:
        assert first.try_acquire()
        assert not second.try_acquire()
        # The leader's process dies: its connection goes (PostgreSQL releases the advisory
        # lock) and it stops renewing its lease (SQLite: the lease runs out).
        runtime.dispose()
        if first._connection is not None:
            first._connection.invalidate()
            first._connection = None
        clock.advance(timedelta(seconds=runtime.settings.scheduler_lease_seconds + 1))
        # PostgreSQL lets the lock go once its backend has seen the connection close, a
        # moment later (a CI run once asked before that): the standby tries again, as
        # run_scheduler's loop does, and must lead within seconds.
        deadline = time.monotonic() + 5
        while not second.try_acquire():
            assert time.monotonic() < deadline, "the standby never took over"
            time.sleep(0.05)
    finally:
        second.release()
        other.dispose()


def test_two_schedulers_running_at_once_run_each_job_in_one_of_them_only(runtime) -> None:
    runs: list[str] = []
    lock = threading.Lock()

    def make_job(node: str) -> Job:
        def record(_runtime) -> None:  # type: ignore[no-untyped-def]
            with lock:
                runs.append(node)

        return Job(name="record", run=record, every_seconds=0.05)

    stop = threading.Event()
    other = build_runtime(runtime.settings, clock=runtime.clock)
    threads = [
        threading.Thread(
            target=run_scheduler,
            args=(rt, [make_job(node)]),
            kwargs={"stop": stop, "poll_seconds": 0.05},
        )
        for rt, node in ((runtime, "a"), (other, "b"))
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    other.dispose()
    assert runs, "the leader ran no job"
    assert len(set(runs)) == 1, f"both schedulers ran jobs: {sorted(set(runs))}"
