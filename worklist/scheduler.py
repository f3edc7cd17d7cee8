"""Exactly one scheduler: leader election, then APScheduler running the jobs.

A second `worklist scheduler` started by mistake waits as a standby instead of
running every job twice. PostgreSQL: a session-level advisory lock held on a
dedicated connection (released by the server if the process dies). SQLite: a
lease row renewed well before it expires. Jobs are still written to be safe if
they ever run twice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from apscheduler.schedulers.background import BackgroundScheduler

from worklist.bootstrap import Runtime
from worklist.db.models import SchedulerLease

logger = logging.getLogger(__name__)

LOCK_NAME = "worklist-scheduler"
# pg_advisory_lock takes a bigint; a fixed key derived from the name ("WLSCHED1").
ADVISORY_KEY = int.from_bytes(b"WLSCHED1", "big") & 0x7FFF_FFFF_FFFF_FFFF


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class LeaderLock:
    """Who runs the jobs. `try_acquire()` is called repeatedly; True means lead now."""

    def __init__(self, runtime: Runtime, *, holder: str | None = None) -> None:
        self.runtime = runtime
        self.holder = holder or holder_id()
        self._connection: sa.Connection | None = None

    def try_acquire(self) -> bool:
        if self.runtime.dialect == "postgresql":
            return self._try_advisory()
        return self._try_lease()

    def release(self) -> None:
        if self._connection is not None:
            try:
                self._connection.execute(
                    sa.text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_KEY}
                )
                self._connection.commit()
            finally:
                self._connection.close()
                self._connection = None
            return
        if self.runtime.dialect != "postgresql":
            with self.runtime.session() as session:
                session.execute(
                    sa.delete(SchedulerLease).where(
                        SchedulerLease.name == LOCK_NAME, SchedulerLease.holder == self.holder
                    )
                )

    def _try_advisory(self) -> bool:
        if self._connection is not None:
            try:  # still holding it, as long as the connection is alive
                self._connection.execute(sa.text("SELECT 1"))
                return True
            except sa.exc.DBAPIError:
                self._connection = None
                return False
        connection = self.runtime.engine.connect()
        got = connection.execute(
            sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_KEY}
        ).scalar()
        connection.commit()
        if got:
            self._connection = connection
            return True
        connection.close()
        return False

    def _try_lease(self) -> bool:
        now = self.runtime.clock.now()
        expires = now + timedelta(seconds=self.runtime.settings.scheduler_lease_seconds)
        with self.runtime.session() as session:
            lease = session.get(SchedulerLease, LOCK_NAME)
            if lease is None:
                session.add(SchedulerLease(name=LOCK_NAME, holder=self.holder, expires_at=expires))
                return True
            if lease.holder == self.holder or lease.expires_at <= now:
                lease.holder = self.holder
                lease.expires_at = expires
                return True
            return False


@dataclass(frozen=True)
class Job:
    name: str
    run: Callable[[Runtime], None]
    every_seconds: float


def run_scheduler(
    runtime: Runtime,
    jobs: list[Job],
    *,
    stop: threading.Event,
    poll_seconds: float = 1.0,
    on_leading: Callable[[], None] | None = None,
) -> None:
    """Wait to lead, run the jobs while leading, stop cleanly when `stop` is set."""
    lock = LeaderLock(runtime)
    scheduler: BackgroundScheduler | None = None
    announced_wait = False
    renew_every = max(runtime.settings.scheduler_lease_seconds / 3, poll_seconds)
    try:
        while not stop.is_set():
            leading = lock.try_acquire()
            if leading and scheduler is None:
                logger.info("scheduler %s is the leader; starting %d jobs", lock.holder, len(jobs))
                scheduler = BackgroundScheduler(timezone="UTC")
                for job in jobs:
                    scheduler.add_job(
                        _guarded(job, runtime),
                        "interval",
                        seconds=job.every_seconds,
                        id=job.name,
                        max_instances=1,
                        coalesce=True,
                    )
                scheduler.start()
                if on_leading:
                    on_leading()
            elif not leading and scheduler is not None:
                logger.warning("scheduler %s lost the leadership; stopping jobs", lock.holder)
                scheduler.shutdown(wait=True)
                scheduler = None
            elif not leading and not announced_wait:
                logger.info("another scheduler is the leader; %s waits as standby", lock.holder)
                announced_wait = True
            stop.wait(renew_every if leading else poll_seconds)
    finally:
        if scheduler is not None:
            scheduler.shutdown(wait=True)
        lock.release()


def _guarded(job: Job, runtime: Runtime) -> Callable[[], None]:
    def run() -> None:
        try:
            job.run(runtime)
        except Exception:  # one failing run must not kill the scheduler
            logger.exception("scheduled job %s failed", job.name)

    return run
