"""The `worklist` command: one sub-command per process kind, plus admin commands.

Exit codes: 0 done, 1 the request could not be carried out (the message says why),
2 bad arguments (argparse), 3 configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from worklist.bootstrap import Runtime, build_runtime, settle_after_start_up
from worklist.config import Settings
from worklist.errors import ConfigurationError, WorklistError

logger = logging.getLogger("worklist")

# Areas that add their own sub-commands: each module exposes register(subparsers).
EXTENSION_MODULES = ("worklist.cli_messages", "worklist.cli_reports", "worklist.cli_worklist")

Handler = Callable[[argparse.Namespace, Runtime], int]

# `serve --demo`: how many orders the simulated RIS systems send, and how fast (per second).
DEMO_ORDERS = 2000
DEMO_ORDER_RATE = 0.5


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"port {port} is out of range 0-65535")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worklist",
        description="Regional radiology reporting worklist. The database comes from "
        "WORKLIST_DATABASE_URL (default: SQLite under WORKLIST_INSTANCE_PATH or ./instance).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "serve", help="web + HL7 listener + scheduler in one process (embedded default)"
    )
    p.add_argument("--host", default="127.0.0.1", help="web bind address (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=5000, help="web port (default 5000)")
    p.add_argument("--hl7-host", default=None, help="MLLP bind address (default WORKLIST_HL7_HOST)")
    p.add_argument("--hl7-port", type=_port, default=None, help="MLLP port (default 2575)")
    p.add_argument(
        "--demo", action="store_true", help="load the demo region if the database is empty"
    )
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("web", help="the web app under gunicorn (production)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument(
        "--workers", type=int, default=None, help="gunicorn workers (default 2 x cores + 1)"
    )
    p.set_defaults(handler=cmd_web)

    p = sub.add_parser("hl7-listen", help="the MLLP listener alone (production)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=_port, default=None)
    p.set_defaults(handler=cmd_hl7_listen)

    p = sub.add_parser("scheduler", help="the scheduler alone; a second one waits as standby")
    p.set_defaults(handler=cmd_scheduler)

    p = sub.add_parser("db", help="database schema")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    dbsub.add_parser("upgrade", help="apply migrations up to head").set_defaults(
        handler=cmd_db_upgrade
    )
    dbsub.add_parser("current", help="show the applied revision").set_defaults(
        handler=cmd_db_current
    )

    p = sub.add_parser("demo", help="load the demo region (8 Greater Manchester trusts)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("trust", help="trusts")
    tsub = p.add_subparsers(dest="trust_command", metavar="ACTION", required=True)
    t = tsub.add_parser("add", help="add a trust")
    t.add_argument("--code", required=True, help="ODS code, e.g. RW6")
    t.add_argument("--name", required=True)
    t.add_argument("--sending-facility", required=True, help="MSH-4 of the trust's RIS")
    t.add_argument("--sending-application", default=None, help="MSH-3 of the trust's RIS")
    t.add_argument("--ris-host", default=None, help="where ORU reports are sent")
    t.add_argument("--ris-port", type=_port, default=None)
    t.add_argument(
        "--ack-mode",
        choices=("original", "enhanced", "auto"),
        default="original",
        help="original AA/AE/AR, enhanced CA/CE/CR, or auto (as MSH-15/16 ask)",
    )
    t.set_defaults(handler=cmd_trust_add)
    tsub.add_parser("list", help="list trusts").set_defaults(handler=cmd_trust_list)

    p = sub.add_parser("user", help="accounts")
    usub = p.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    u = usub.add_parser("add", help="create an account")
    u.add_argument("username")
    u.add_argument(
        "--role", required=True, choices=("radiologist", "manager", "admin", "integration")
    )
    u.add_argument("--full-name", default=None)
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    u.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="CODE",
        help="a trust the radiologist may report for (repeatable)",
    )
    u.add_argument(
        "--credential",
        action="append",
        default=[],
        metavar="MODALITY[:BODY_AREA]",
        help="a reporting credential, e.g. CT or MR:NEURO (repeatable)",
    )
    u.add_argument(
        "--on-duty", action="store_true", help="add a duty session for the next 24 hours"
    )
    u.add_argument("--trainee", action="store_true", help="may sign preliminary reports only")
    u.set_defaults(handler=cmd_user_add)

    p = sub.add_parser("token", help="API tokens")
    ksub = p.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    k = ksub.add_parser("create", help="print a new API token for a user")
    k.add_argument("username")
    k.add_argument("--name", default=None, help="what the token is for")
    k.set_defaults(handler=cmd_token_create)

    for module_name in EXTENSION_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env()
        runtime = build_runtime(settings)
    except ConfigurationError as exc:
        print(f"worklist: configuration error: {exc}", file=sys.stderr)
        return 3
    try:
        return int(args.handler(args, runtime))
    except WorklistError as exc:
        print(f"worklist: {exc}", file=sys.stderr)
        return 1
    finally:
        runtime.dispose()


# --- handlers --------------------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace, runtime: Runtime) -> int:
    from worklist.db import migrate

    migrate.upgrade(runtime.engine)
    print(f"database at revision {migrate.current_revision(runtime.engine)}")
    return 0


def cmd_db_current(args: argparse.Namespace, runtime: Runtime) -> int:
    from worklist.db import migrate

    current, head = migrate.current_revision(runtime.engine), migrate.head_revision(runtime.engine)
    print(f"current {current or '(empty)'}; head {head}")
    return 0 if current == head else 1


def cmd_demo(args: argparse.Namespace, runtime: Runtime) -> int:
    from worklist import demo
    from worklist.db import migrate

    if runtime.settings.is_production:
        raise ConfigurationError("refusing to load demo data with WORKLIST_ENV=production")
    migrate.upgrade(runtime.engine)
    with runtime.session() as session:
        summary = demo.load(session, now=runtime.clock.now(), seed=args.seed)
    print(summary)
    return 0


def cmd_trust_add(args: argparse.Namespace, runtime: Runtime) -> int:
    from worklist.services import trusts

    with runtime.session() as session:
        trust = trusts.add_trust(
            session,
            code=args.code,
            name=args.name,
            sending_facility=args.sending_facility,
            sending_application=args.sending_application,
            ris_host=args.ris_host,
            ris_port=args.ris_port,
            ack_mode=args.ack_mode,
            now=runtime.clock.now(),
        )
        print(f"added trust {trust.code} ({trust.name})")
    return 0


def cmd_trust_list(args: argparse.Namespace, runtime: Runtime) -> int:
    from worklist.services import trusts

    with runtime.session() as session:
        rows = trusts.list_trusts(session)
        print(f"{'CODE':<6} {'SENDER (MSH-3/MSH-4)':<32} {'RIS ENDPOINT':<24} NAME")
        for t in rows:
            sender = f"{t.sending_application or ''}/{t.sending_facility}"
            endpoint = f"{t.ris_host}:{t.ris_port}" if t.ris_host else "-"
            print(f"{t.code:<6} {sender:<32} {endpoint:<24} {t.name}")
    return 0


def cmd_user_add(args: argparse.Namespace, runtime: Runtime) -> int:
    from worklist.services import accounts

    password = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if len(password) < 8:
            raise accounts.InvalidInput("the password must be at least 8 characters")
    credentials = [accounts.CredentialSpec.parse(c) for c in args.credential]
    with runtime.session() as session:
        user = accounts.add_user(
            session,
            username=args.username,
            role=args.role,
            full_name=args.full_name,
            password=password,
            trust_codes=args.trust,
            credentials=credentials,
            on_duty_hours=24 if args.on_duty else None,
            can_finalise=not args.trainee,
            now=runtime.clock.now(),
        )
        print(f"added {user.role} {user.username}")
    return 0


def cmd_token_create(args: argparse.Namespace, runtime: Runtime) -> int:
    from worklist.services import accounts

    with runtime.session() as session:
        user = accounts.user_by_name(session, args.username)
        token = accounts.create_token(session, user=user, now=runtime.clock.now(), name=args.name)
    print(token)
    return 0


# --- processes -------------------------------------------------------------------------------


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def _handle(signum: int, _frame: object) -> None:
        logger.info("received signal %s; stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    return stop


def _listener() -> Callable[..., None]:
    try:
        from hl7.listener import serve_hl7
    except ImportError as exc:
        raise ConfigurationError(f"the HL7 listener is not available: {exc}") from exc
    return serve_hl7  # type: ignore[no-any-return]


def cmd_hl7_listen(args: argparse.Namespace, runtime: Runtime) -> int:
    serve_hl7 = _listener()
    stop = _stop_on_signals()
    host = args.host or runtime.settings.hl7_host
    port = runtime.settings.hl7_port if args.port is None else args.port
    settle_after_start_up()
    serve_hl7(runtime, host, port, stop=stop)
    return 0


def cmd_scheduler(args: argparse.Namespace, runtime: Runtime) -> int:
    from worklist.jobs import scheduled_jobs
    from worklist.scheduler import run_scheduler

    stop = _stop_on_signals()
    settle_after_start_up()
    run_scheduler(runtime, scheduled_jobs(runtime.settings), stop=stop)
    return 0


def cmd_web(args: argparse.Namespace, runtime: Runtime) -> int:
    """Replace this process with gunicorn serving wsgi:app (config in gunicorn.conf.py)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",
        str(root / "gunicorn.conf.py"),
        "--bind",
        f"{args.host}:{args.port}",
    ]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    argv.append("wsgi:app")
    runtime.dispose()
    os.chdir(root)
    os.execvp(argv[0], argv)
    return 0  # not reached


def cmd_serve(args: argparse.Namespace, runtime: Runtime) -> int:
    """Everything in one process for the embedded default: web, HL7 listener, scheduler."""
    from werkzeug.serving import make_server

    from worklist import create_app, demo
    from worklist.db import migrate
    from worklist.jobs import scheduled_jobs
    from worklist.scheduler import run_scheduler

    migrate.upgrade(runtime.engine)
    if args.demo:
        with runtime.session() as session:
            if demo.is_empty(session):
                print(demo.load(session, now=runtime.clock.now()))
    stop = _stop_on_signals()
    threads = [
        threading.Thread(
            target=run_scheduler,
            args=(runtime, scheduled_jobs(runtime.settings)),
            kwargs={"stop": stop},
            name="scheduler",
            daemon=True,
        )
    ]
    hl7_host = args.hl7_host or runtime.settings.hl7_host
    hl7_port = runtime.settings.hl7_port if args.hl7_port is None else args.hl7_port
    listening = threading.Event()
    try:
        serve_hl7 = _listener()
    except ConfigurationError as exc:
        logger.warning("%s; serving without it", exc)
    else:
        threads.append(
            threading.Thread(
                target=serve_hl7,
                args=(runtime, hl7_host, hl7_port),
                kwargs={"stop": stop, "ready": listening},
                name="hl7-listener",
                daemon=True,
            )
        )
    app = create_app(runtime=runtime)
    server = make_server(args.host, args.port, app, threaded=True)
    settle_after_start_up()
    web = threading.Thread(target=server.serve_forever, name="web", daemon=True)
    for thread in [*threads, web]:
        thread.start()
    web_url = f"http://{args.host}:{server.server_port}/"
    print(f"worklist: web on {web_url} · HL7 MLLP on {hl7_host}:{hl7_port}")
    stop_ris = None
    if args.demo and listening.wait(timeout=30):
        # The trusts' RIS systems, played for real: they receive the ORUs and send a
        # trickle of new orders, changes, cancellations and completed exams.
        from worklist.cli_reports import SimulationOptions, start_simulation_thread

        _, stop_ris = start_simulation_thread(
            runtime,
            SimulationOptions(
                orders=DEMO_ORDERS, rate=DEMO_ORDER_RATE, listener=(hl7_host, hl7_port)
            ),
        )
    stop.wait()
    if stop_ris is not None:
        stop_ris()
    server.shutdown()
    for thread in threads:
        thread.join(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
