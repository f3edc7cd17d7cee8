"""Message type -> handler: the visible routing table for inbound HL7, with a negative-ACK fallback.

Routing is on MSH-9 code and trigger (``ORM^O01``), never the structure
component (``OMI^O23^OMI_O23`` routes as ``OMI^O23``), because the third
component is optional before v2.3.1 and often missing. Each handler is a
function of `hl7/inbound.py` taking (message, profile, message time) and
returning domain events. Anything not in the table is refused with AR 200
(unknown type) or AR 201 (known type, unknown trigger); other ADT events are
acknowledged and ignored unless the trust's profile says otherwise
(HL7-NOTES 6.3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from hl7.er7 import Er7Message
from hl7.errors import UnsupportedEvent, UnsupportedMessageType
from hl7.inbound import (
    InboundProfile,
    check_header,
    merge_events,
    message_time,
    order_events,
    patient_update_events,
)
from worklist.domain.events import DomainEvent

Handler = Callable[[Er7Message, InboundProfile, datetime], list[DomainEvent]]

ROUTES: dict[str, Handler] = {
    # Orders: IHE RAD-4/RAD-13 from the trust's RIS.
    "ORM^O01": order_events,
    "OMI^O23": order_events,
    # Patient demographics.
    "ADT^A01": patient_update_events,
    "ADT^A04": patient_update_events,
    "ADT^A05": patient_update_events,
    "ADT^A08": patient_update_events,
    "ADT^A28": patient_update_events,
    "ADT^A31": patient_update_events,
    # Merges and identifier changes: MRG-1 prior identifiers -> PID-3 survivor.
    "ADT^A18": merge_events,
    "ADT^A34": merge_events,
    "ADT^A40": merge_events,
    "ADT^A47": merge_events,
}


def ignore(message: Er7Message, profile: InboundProfile, when: datetime) -> list[DomainEvent]:
    """Acknowledge and do nothing (ADT events the worklist does not need, e.g. A03 discharge)."""
    return []


def handler_for(key: str, profile: InboundProfile) -> Handler:
    """The handler for `code^trigger`, or the Hl7Error a message of that type deserves."""
    handler = ROUTES.get(key)
    if handler is not None:
        return handler
    code, _, trigger = key.partition("^")
    if code == "ADT" and trigger and profile.ignore_other_adt:
        return ignore
    if any(k.startswith(code + "^") for k in ROUTES):
        raise UnsupportedEvent(
            f"{code}^{trigger or '(no trigger)'} is not accepted here; accepted: {accepted(code)}",
            segment="MSH",
            sequence=1,
            field=9,
            component=2,
        )
    raise UnsupportedMessageType(
        f"message type {key} is not accepted here; send ORM^O01, OMI^O23 or ADT",
        segment="MSH",
        sequence=1,
        field=9,
    )


def accepted(code: str) -> str:
    return ", ".join(k for k in ROUTES if k.startswith(code + "^"))


def route(
    message: Er7Message,
    profile: InboundProfile | Mapping[str, Any] | None = None,
    *,
    received_at: datetime | None = None,
) -> list[DomainEvent]:
    """Check the header, pick the handler by message type and run it."""
    if not isinstance(profile, InboundProfile):
        profile = InboundProfile.from_dict(profile)
    key = check_header(message, profile)
    handler = handler_for(key, profile)
    return handler(message, profile, message_time(message, profile, received_at))
