"""Outbound benchmark: signed report -> ORU -> MLLP -> 8 simulated RIS -> ACK recorded.

Not a test: it prints figures and writes JSON to bench/results/. Eight trusts, each
with its own RIS simulator (one asyncio loop in a thread of this process, answering AA
as soon as a message is read). Two runs against one database (a SQLite file, or
WORKLIST_BENCH_DATABASE_URL, e.g. a PostgreSQL database that may be emptied):

  paced   reports are signed at --rate per second (default 50, spread over the 8
          trusts) by --signers threads through `worklist.services.reports.sign_report`
          while `worklist.services.delivery.run_delivery` delivers; latency is from the
          signed version's commit time (outbox created_at) to the ACK being recorded
          (delivered_at): p50/p95/p99/max. Target: p99 under 1 s at 50 reports/second.
  burst   --burst reports are signed first with delivery stopped, then delivery
          starts: deliveries per second to the 8 RIS until the outbox is empty.

    .venv/bin/python bench/outbound.py
    .venv/bin/python bench/outbound.py --rate 80 --seconds 20 --burst 4000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.factories import make_study, make_trust, make_user  # noqa: E402
from worklist.bootstrap import build_runtime  # noqa: E402
from worklist.config import Settings  # noqa: E402
from worklist.db import migrate  # noqa: E402
from worklist.db.models import OutboundMessage, Trust, User  # noqa: E402
from worklist.ris_simulator import RisSimulator  # noqa: E402
from worklist.services import reports  # noqa: E402

TRUSTS = ("RMC", "RBV", "R0A", "RM3", "RW6", "RWJ", "RMP", "RRF")
REPORT = (
    "CT head without contrast.\n"
    "Findings: no intracranial haemorrhage | mass ^ or midline shift; ventricles normal.\n"
    "Grey-white differentiation preserved. Mastoids & sinuses clear.\n"
    "Impression: normal CT head."
)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


class Simulators:
    """Eight RIS simulators on one event loop in one thread."""

    def __init__(self, count: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sims = [RisSimulator(name=f"RIS{i}") for i in range(count)]
        for sim in self.sims:
            asyncio.run_coroutine_threadsafe(sim.start(), self.loop).result(10)

    def received(self) -> int:
        return sum(len(s.received) for s in self.sims)

    def close(self) -> None:
        for sim in self.sims:
            asyncio.run_coroutine_threadsafe(sim.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def setup(runtime, sims: Simulators, studies_per_trust: int):  # type: ignore[no-untyped-def]
    now = runtime.clock.now()
    with runtime.session() as s:
        signer = make_user(
            s,
            now=now,
            username=f"bench{time.time_ns()}",
            role="manager",
            full_name="Dr Bench Marker",
        )
        trust_ids = []
        for code, sim in zip(TRUSTS, sims.sims, strict=True):
            trust = s.scalar(sa.select(Trust).where(Trust.code == code))
            if trust is None:
                trust = make_trust(s, now=now, code=code, sending_application="CRIS")
            trust.ris_host, trust.ris_port = "127.0.0.1", sim.port
            trust.hl7_profile = {"outbound": {"ack_timeout_seconds": 10.0}}
            trust_ids.append(trust.id)
        signer_id = signer.id
    studies: list[int] = []
    for trust_id in trust_ids:
        with runtime.session() as s:
            trust = s.get(Trust, trust_id)
            for _ in range(studies_per_trust):
                studies.append(make_study(s, trust=trust, now=now).id)
    # interleave trusts so a paced run spreads over all eight
    per = len(trust_ids)
    ordered = [
        studies[t * studies_per_trust + i] for i in range(studies_per_trust) for t in range(per)
    ]
    return signer_id, ordered


DELIVERY_PROCESS = """
import signal, sys, threading
from pathlib import Path
from worklist.bootstrap import build_runtime
from worklist.config import Settings
from worklist.services.delivery import run_delivery
settings = Settings(instance_path=Path(sys.argv[2]), database_url=sys.argv[1],
                    environment="test").validated()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
print("ready", flush=True)
run_delivery(build_runtime(settings), stop, interval=float(sys.argv[3]))
"""


class DeliveryProcess:
    """The deliverer in a process of its own, as the scheduler runs it in production (the
    signers here play the web workers; they must not share its GIL)."""

    def __init__(self, url: str, workdir: Path, interval: float = 0.5) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", DELIVERY_PROCESS, url, str(workdir), str(interval)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.process.stdout.readline()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def sign(runtime, signer_id: int, study_id: int) -> None:  # type: ignore[no-untyped-def]
    with runtime.session() as s:
        user = s.get(User, signer_id)
        reports.sign_report(
            s, study_id=study_id, user=user, status="final", text=REPORT, now=runtime.clock.now()
        )


def last_outbox_id(runtime) -> int:  # type: ignore[no-untyped-def]
    with runtime.session() as s:
        return s.scalar(sa.select(sa.func.max(OutboundMessage.id))) or 0


def latencies(runtime, since: int) -> tuple[list[float], int]:  # type: ignore[no-untyped-def]
    """(signed -> ACK recorded, seconds) for outbox rows after id ``since``; and their count."""
    with runtime.session() as s:
        rows = s.execute(
            sa.select(OutboundMessage.created_at, OutboundMessage.delivered_at).where(
                OutboundMessage.id > since
            )
        ).all()
    done = [(d - c).total_seconds() for c, d in rows if d is not None]
    return done, len(rows)


def paced(
    runtime,
    signer_id: int,
    studies: list[int],
    rate: float,
    seconds: float,
    signers: int,
    url: str,
    workdir: Path,
) -> dict:  # type: ignore[type-arg, no-untyped-def]
    count = int(rate * seconds)
    todo = studies[:count]
    del studies[:count]
    since = last_outbox_id(runtime)
    deliverer = DeliveryProcess(url, workdir)
    began = time.monotonic()
    lag: list[float] = []

    def signer(offset: int) -> None:
        for i in range(offset, len(todo), signers):
            due = began + i / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                lag.append(-wait)
            sign(runtime, signer_id, todo[i])

    threads = [threading.Thread(target=signer, args=(k,)) for k in range(signers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    signing_seconds = time.monotonic() - began
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, total = latencies(runtime, since)
        if len(done) == total:
            break
        time.sleep(0.1)
    deliverer.stop()
    done, total = latencies(runtime, since)
    return {
        "offered_rate_per_second": rate,
        "reports": total,
        "delivered": len(done),
        "signing_seconds": round(signing_seconds, 2),
        "achieved_sign_rate_per_second": round(total / signing_seconds, 1),
        "signers_behind_schedule_max_seconds": round(max(lag), 3) if lag else 0.0,
        "latency_seconds": {
            "p50": round(percentile(done, 50), 3),
            "p95": round(percentile(done, 95), 3),
            "p99": round(percentile(done, 99), 3),
            "max": round(max(done), 3) if done else None,
            "mean": round(statistics.fmean(done), 3) if done else None,
        },
        "target_p99_under_1s": bool(done) and percentile(done, 99) < 1.0,
    }


def burst(
    runtime,
    signer_id: int,
    studies: list[int],
    count: int,  # type: ignore[no-untyped-def]
    sims: Simulators,
    url: str,
    workdir: Path,
) -> dict:  # type: ignore[type-arg]
    todo = studies[:count]
    del studies[:count]
    since = last_outbox_id(runtime)
    began = time.monotonic()
    for study_id in todo:
        sign(runtime, signer_id, study_id)
    sign_seconds = time.monotonic() - began
    before = sims.received()
    began = time.monotonic()
    deliverer = DeliveryProcess(url, workdir)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and sims.received() - before < count:
        time.sleep(0.05)
    seconds = time.monotonic() - began
    deliverer.stop()
    done, total = latencies(runtime, since)
    return {
        "reports": count,
        "signing_seconds": round(sign_seconds, 2),
        "sign_rate_per_second": round(count / sign_seconds, 1),
        "delivered": len(done),
        "delivery_seconds": round(seconds, 2),
        "deliveries_per_second": round((sims.received() - before) / seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="reports signed per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the paced run")
    parser.add_argument("--signers", type=int, default=4, help="signing threads (web workers)")
    parser.add_argument("--burst", type=int, default=2000, help="reports in the burst run")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="wl-bench-outbound-"))
    url = os.environ.get("WORKLIST_BENCH_DATABASE_URL") or f"sqlite:///{workdir / 'bench.db'}"
    settings = Settings(instance_path=workdir, database_url=url, environment="test").validated()
    runtime = build_runtime(settings)
    migrate.upgrade(runtime.engine)
    sims = Simulators(len(TRUSTS))
    try:
        need = int(args.rate * args.seconds) + args.burst
        signer_id, studies = setup(runtime, sims, need // len(TRUSTS) + 1)
        result = {
            "benchmark": "outbound",
            "at": datetime.now(UTC).isoformat(),
            "database": runtime.dialect,
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
            },
            "ris_simulators": len(sims.sims),
            "paced": paced(
                runtime, signer_id, studies, args.rate, args.seconds, args.signers, url, workdir
            ),
            "burst": burst(runtime, signer_id, studies, args.burst, sims, url, workdir),
        }
    finally:
        sims.close()
        runtime.dispose()
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / f"outbound-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
