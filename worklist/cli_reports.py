"""`worklist deliveries ...` (the outbox by hand) and `worklist simulate-ris` (play the trusts'
RIS systems: receive our ORUs and send order traffic), registered by `worklist.cli`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from worklist.bootstrap import Runtime
from worklist.db.models import Trust
from worklist.errors import InvalidInput
from worklist.services import accounts, delivery

logger = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("deliveries", help="the ORU outbox: list, resend, deliver now")
    dsub = p.add_subparsers(dest="deliveries_command", metavar="ACTION", required=True)
    d = dsub.add_parser("list", help="outbox rows, newest first")
    d.add_argument("--state", choices=("pending", "delivered", "parked"), default=None)
    d.add_argument("--trust", default=None, metavar="CODE")
    d.add_argument("--limit", type=int, default=50)
    d.add_argument("--json", action="store_true", help="print JSON lines")
    d.set_defaults(handler=cmd_deliveries_list)
    d = dsub.add_parser("resend", help="queue an ORU again (parked: same control id)")
    d.add_argument("message_id", type=int)
    d.add_argument("--by", required=True, metavar="USERNAME", help="the manager or admin asking")
    d.set_defaults(handler=cmd_deliveries_resend)
    d = dsub.add_parser("run", help="deliver due ORUs now (once, or until interrupted)")
    d.add_argument("--loop", action="store_true", help="keep delivering until Ctrl-C / SIGTERM")
    d.set_defaults(handler=cmd_deliveries_run)

    p = sub.add_parser(
        "simulate-ris",
        help="play the trusts' RIS systems: receive ORUs on each trust's RIS port, send orders",
    )
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="CODE",
        help="only these trusts (repeatable; default every trust with a RIS port)",
    )
    p.add_argument(
        "--ack",
        choices=("AA", "AE", "AR", "CA"),
        default="AA",
        help="how to answer ORUs (default AA)",
    )
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each ACK")
    p.add_argument("--silent", action="store_true", help="never acknowledge")
    p.add_argument(
        "--refuse-first",
        type=int,
        default=0,
        metavar="N",
        help="drop the connection on the first N ORUs",
    )
    p.add_argument(
        "--orders",
        type=int,
        default=0,
        metavar="N",
        help="send N order messages (NW/XO/CA/SC) to the HL7 listener",
    )
    p.add_argument("--rate", type=float, default=5.0, help="order messages per second (0 = max)")
    p.add_argument(
        "--listener",
        default=None,
        metavar="HOST:PORT",
        help="where to send orders (default WORKLIST_HL7_HOST:WORKLIST_HL7_PORT)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    p.add_argument(
        "--dump",
        default=None,
        metavar="DIR",
        help="write what each trust's RIS received to DIR/<code>.json",
    )
    p.set_defaults(handler=cmd_simulate_ris)  # fmt: skip


def cmd_deliveries_list(args: argparse.Namespace, runtime: Runtime) -> int:
    with runtime.session() as session:
        codes = dict(session.execute(sa.select(Trust.id, Trust.code)).tuples().all())
        rows = delivery.list_deliveries(
            session, state=args.state, trust_code=args.trust, limit=args.limit
        )
        for m in rows:
            if args.json:
                print(json.dumps({**delivery.delivery_json(m), "trust": codes.get(m.trust_id)}))
                continue
            print(
                f"{m.id:>7} {codes.get(m.trust_id, '?'):<5} {m.control_id:<20} {m.state:<9} "
                f"tries={m.attempts:<3} ack={m.last_ack_code or '-':<3} "
                f"study={m.study_id} {('| ' + m.last_error) if m.last_error else ''}"
            )
    return 0


def cmd_deliveries_resend(args: argparse.Namespace, runtime: Runtime) -> int:
    with runtime.session() as session:
        user = accounts.user_by_name(session, args.by)
        message = delivery.resend(
            session, message_id=args.message_id, user=user, now=runtime.clock.now()
        )
        print(f"queued ORU {message.control_id} (outbox row {message.id})")
    return 0


def cmd_deliveries_run(args: argparse.Namespace, runtime: Runtime) -> int:
    if args.loop:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        delivery.run_delivery(runtime, stop)
        return 0
    from hl7.sender import MllpSender

    with MllpSender() as sender:
        result = delivery.deliver_pending(runtime, sender=sender)
    for r in result.rounds:
        print(f"trust {r.trust_id}: delivered {r.delivered}, negative {r.negative}, "
              f"parked {r.parked}, failures {r.failures} {r.stopped}")  # fmt: skip
    return 0


# --- the simulator ------------------------------------------------------------------------


@dataclass
class SimulationOptions:
    trust_codes: list[str] = field(default_factory=list)
    ack: str = "AA"
    delay: float = 0.0
    silent: bool = False
    refuse_first: int = 0
    orders: int = 0
    rate: float = 5.0
    listener: tuple[str, int] | None = None
    seed: int = 1
    duration: float = 0.0
    dump_dir: Path | None = None


def _trusts(runtime: Runtime, codes: list[str]) -> list[dict[str, Any]]:
    with runtime.session() as session:
        query = sa.select(Trust).order_by(Trust.code)
        if codes:
            query = query.where(Trust.code.in_([c.upper() for c in codes]))
        return [
            {"code": t.code, "host": t.ris_host, "port": t.ris_port,
             "application": t.sending_application or "RIS", "facility": t.sending_facility}
            for t in session.scalars(query)
        ]  # fmt: skip


async def simulate(runtime: Runtime, options: SimulationOptions,
                   stop: asyncio.Event | None = None) -> dict[str, Any]:  # fmt: skip
    """Run a RIS simulator for every chosen trust (on its configured RIS host/port) and, if
    asked, send order traffic to the HL7 listener; returns what each RIS received."""
    from worklist.ris_simulator import (
        RisBehaviour,
        RisSimulator,
        TrustFeed,
        order_traffic,
        send_orders,
    )

    trusts = _trusts(runtime, options.trust_codes)
    sims: list[RisSimulator] = []
    for t in trusts:
        if not t["port"]:
            continue
        sim = RisSimulator(
            host=t["host"] or "127.0.0.1", port=int(t["port"]), name=t["code"],
            behaviour=RisBehaviour(ack_code=options.ack, delay_seconds=options.delay,
                                   silent=options.silent, refuse_first=options.refuse_first),
            dump_path=(options.dump_dir / f"{t['code']}.json") if options.dump_dir else None,
        )  # fmt: skip
        try:
            await sim.start()
        except OSError as exc:  # one busy port must not stop the other trusts' RIS
            print(f"RIS {t['code']} cannot listen on {sim.host}:{sim.port}: {exc}", flush=True)
            continue
        sims.append(sim)
        print(f"RIS {t['code']} listening on {sim.host}:{sim.port}", flush=True)
    stop = stop or asyncio.Event()
    summary: dict[str, Any] = {}
    try:
        if options.orders:
            host, port = options.listener or (runtime.settings.hl7_host, runtime.settings.hl7_port)
            feeds = [TrustFeed(t["code"], t["application"], t["facility"]) for t in trusts]
            if not feeds:
                raise InvalidInput("no trusts to send orders for")
            report = await send_orders(
                host,
                port,
                order_traffic(feeds, count=options.orders, seed=options.seed),
                rate_per_second=options.rate,
            )
            summary["orders"] = {
                "sent": report.sent,
                "acks": report.acks,
                "failures": report.failures,
                "seconds": round(report.seconds, 2),
            }
            print(f"orders: {summary['orders']}", flush=True)  # fmt: skip
        if options.duration:
            try:
                await asyncio.wait_for(stop.wait(), options.duration)
            except TimeoutError:
                pass
        else:
            await stop.wait()
    finally:
        for sim in sims:
            await sim.stop()
        summary["received"] = {
            sim.name: {
                "orus": len(sim.received),
                "by_status": {s: sum(1 for m in sim.received if m.result_status == s)
                              for s in sorted({m.result_status for m in sim.received})},
                "refused": sim.refused,
            }
            for sim in sims
        }  # fmt: skip
    return summary


def cmd_simulate_ris(args: argparse.Namespace, runtime: Runtime) -> int:
    listener = None
    if args.listener:
        host, _, port = args.listener.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidInput("--listener must be HOST:PORT")
        listener = (host, int(port))
    if args.dump:
        Path(args.dump).mkdir(parents=True, exist_ok=True)
    options = SimulationOptions(
        trust_codes=args.trust, ack=args.ack, delay=args.delay, silent=args.silent,
        refuse_first=args.refuse_first, orders=args.orders, rate=args.rate, listener=listener,
        seed=args.seed, duration=args.duration, dump_dir=Path(args.dump) if args.dump else None,
    )  # fmt: skip

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await simulate(runtime, options, stop)

    summary = asyncio.run(main())
    print(json.dumps(summary["received"], indent=1))
    return 0


def start_simulation_thread(
    runtime: Runtime, options: SimulationOptions | None = None
) -> tuple[threading.Thread, Any]:
    """Run `simulate` on its own event loop in a daemon thread (for `worklist serve --demo`:
    the trusts' RIS receive the ORUs and, with ``options.orders``, send a trickle of orders).
    Returns the thread and a function that stops it."""
    options = options or SimulationOptions(duration=0.0)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(simulate(runtime, options, stop))
        except Exception:
            logger.exception("RIS simulator stopped")
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="ris-simulator", daemon=True)
    thread.start()

    def stop_simulation() -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(10)

    return thread, stop_simulation
