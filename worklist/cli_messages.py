"""`worklist messages list|show|edit|replay`: the inbound HL7 message log and error queue by hand.

Registered by `worklist.cli`; a thin edge over `worklist.services.messages`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from worklist.bootstrap import Runtime
from worklist.db.models import User
from worklist.errors import InvalidInput, NotFound
from worklist.services import messages


def register(sub: Any) -> None:
    p = sub.add_parser("messages", help="inbound HL7 messages: log, error queue, edit and replay")
    msub = p.add_subparsers(dest="messages_command", metavar="ACTION", required=True)

    m = msub.add_parser("list", help="the message log, newest first")
    m.add_argument("--trust", default=None, metavar="CODE")
    m.add_argument("--accession", default=None)
    m.add_argument("--patient", default=None, metavar="ID", help="hospital number or NHS number")
    m.add_argument("--control-id", default=None, help="MSH-10 exactly as sent")
    m.add_argument(
        "--state",
        action="append",
        default=[],
        choices=messages.STATES,
        help="only these states (repeatable); 'failed' and 'rejected' are the error queue",
    )
    m.add_argument(
        "--since", default=None, help="ISO 8601 date/time (local time without an offset)"
    )
    m.add_argument("--until", default=None, help="ISO 8601 date/time")
    m.add_argument("--limit", type=int, default=50)
    m.add_argument("--json", action="store_true", help="print JSON lines")
    m.set_defaults(handler=cmd_list)

    m = msub.add_parser("show", help="one message: details, raw text and the ACK sent")
    m.add_argument("message_id", type=int)
    m.set_defaults(handler=cmd_show)

    m = msub.add_parser("edit", help="replace the text of a failed or rejected message")
    m.add_argument("message_id", type=int)
    m.add_argument("--file", required=True, help="the corrected message ('-' for stdin)")
    m.add_argument("--by", default=None, metavar="USERNAME", help="who is editing (audited)")
    m.set_defaults(handler=cmd_edit)

    m = msub.add_parser("replay", help="apply a failed or rejected message now (exactly once)")
    m.add_argument("message_id", type=int)
    m.add_argument("--by", default=None, metavar="USERNAME", help="who is replaying (audited)")
    m.set_defaults(handler=cmd_replay)


def _time(runtime: Runtime, text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"{text!r} is not an ISO 8601 date/time") from exc
    return value if value.tzinfo else value.replace(tzinfo=runtime.settings.tz)


def _user(session: sa.orm.Session, username: str | None) -> User | None:
    if username is None:
        return None
    user = session.scalar(sa.select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"no user {username}")
    return user


def cmd_list(args: argparse.Namespace, runtime: Runtime) -> int:
    with runtime.session() as session:
        rows = messages.list_messages(
            session,
            trust_code=args.trust,
            accession_number=args.accession,
            patient_identifier=args.patient,
            control_id=args.control_id,
            state=args.state or None,
            since=_time(runtime, args.since),
            until=_time(runtime, args.until),
            limit=args.limit,
        )
        codes = messages.trust_codes(session, rows)
        for row in rows:
            data = messages.message_json(row, trust_code=codes.get(row.trust_id or 0))
            if args.json:
                print(json.dumps(data))
            else:
                print(
                    f"{data['id']:>7}  {data['received_at'][:19]}  {(data['trust'] or '-'):<6}"
                    f" {data['message_type'] or '-':<8} {data['control_id'] or '(none)':<22}"
                    f" {data['state']:<9} {data['ack_code'] or '':<3}"
                    f" {data['accession_number'] or ''}"
                    f"  {(data['error'] or '')[:80]}"
                )
    return 0


def cmd_show(args: argparse.Namespace, runtime: Runtime) -> int:
    with runtime.session() as session:
        row = messages.get_message(session, args.message_id)
        data = messages.message_json(
            row, trust_code=messages.trust_codes(session, [row]).get(row.trust_id or 0), full=True
        )
    raw, ack = data.pop("raw"), data.pop("ack")
    print(json.dumps(data, indent=2))
    print("--- message ---")
    print(raw)
    print("--- ACK sent ---")
    print(ack or "(none)")
    return 0


def cmd_edit(args: argparse.Namespace, runtime: Runtime) -> int:
    raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    raw = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    with runtime.session() as session:
        row = messages.edit_message(
            session, args.message_id, raw=raw, now=runtime.clock.now(), user=_user(session, args.by)
        )
        print(
            f"message {row.id} edited; state {row.state}."
            f" Replay it with: worklist messages replay {row.id}"
        )
    return 0


def cmd_replay(args: argparse.Namespace, runtime: Runtime) -> int:
    with runtime.session() as session:
        row = messages.replay_message(
            session,
            args.message_id,
            directory=messages.TrustDirectory(runtime.settings),
            now=runtime.clock.now(),
            user=_user(session, args.by),
        )
        print(f"message {row.id}: {row.state}" + (f" ({row.error})" if row.error else ""))
    return 0 if row.state == messages.APPLIED else 1
