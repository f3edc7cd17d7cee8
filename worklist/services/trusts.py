"""Trusts: adding and listing the trusts whose RIS feeds the regional worklist."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from hl7.ack import ACK_MODES  # original AA/AE/AR, enhanced CA/CE/CR, auto as MSH-15/16 ask
from worklist.db.models import Trust
from worklist.errors import Conflict, InvalidInput

_ODS_CODE = re.compile(r"^[A-Z0-9]{3,5}$")


def add_trust(
    session: Session,
    *,
    code: str,
    name: str,
    sending_facility: str,
    now: datetime,
    sending_application: str | None = None,
    ris_host: str | None = None,
    ris_port: int | None = None,
    hl7_profile: dict[str, Any] | None = None,
    ack_mode: str = "original",
) -> Trust:
    code = code.strip().upper()
    if not _ODS_CODE.match(code):
        raise InvalidInput(f"trust code {code!r} is not an ODS code (3 to 5 letters and digits)")
    if not name.strip():
        raise InvalidInput("trust name must not be empty")
    if not sending_facility.strip():
        raise InvalidInput("sending facility (MSH-4) must not be empty")
    if (ris_host is None) != (ris_port is None):
        raise InvalidInput("give both --ris-host and --ris-port, or neither")
    if ris_port is not None and not 0 < ris_port < 65536:
        raise InvalidInput(f"RIS port {ris_port} is out of range")
    if ack_mode not in ACK_MODES:
        raise InvalidInput(f"ack mode must be one of {', '.join(ACK_MODES)}, not {ack_mode!r}")
    if session.scalar(sa.select(Trust.id).where(Trust.code == code)) is not None:
        raise Conflict(f"trust {code} already exists")
    clash = session.scalar(
        sa.select(Trust).where(
            Trust.sending_facility == sending_facility,
            Trust.sending_application.is_(None)
            if sending_application is None
            else Trust.sending_application == sending_application,
        )
    )
    if clash is not None:
        raise Conflict(
            f"sender {sending_application or ''}/{sending_facility} already belongs to"
            f" trust {clash.code}"
        )
    trust = Trust(
        code=code,
        name=name.strip(),
        sending_application=sending_application,
        sending_facility=sending_facility,
        ris_host=ris_host,
        ris_port=ris_port,
        hl7_profile=hl7_profile or {},
        ack_mode=ack_mode,
        created_at=now,
    )
    session.add(trust)
    session.flush()
    return trust


def list_trusts(session: Session) -> list[Trust]:
    return list(session.scalars(sa.select(Trust).order_by(Trust.code)))
