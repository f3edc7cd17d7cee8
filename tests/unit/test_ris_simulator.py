"""The RIS simulator's orders, read by our own inbound interface with the default profile."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime

from hl7.er7 import Er7Message
from hl7.inbound import message_events
from worklist.domain.events import OrderPlaced
from worklist.ris_simulator import OrderMix, TrustFeed, new_order, order_message

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def test_an_order_carries_its_accession_number_in_obr_18_and_modality_in_obr_24() -> None:
    """IHE SWF: OBR-18 is the accession number. The accession differs from the filler
    number here, so reading OBR-3 (the default profile's fallback) would not pass."""
    feed = TrustFeed(code="RW6", sending_application="RIS")
    order = new_order(feed, random.Random(7), OrderMix(), serial=42, now=NOW)
    order = replace(order, accession="ACC-RW6-42")
    text = order_message(order, "NW", "SC", control_id="C1", when=NOW)

    obr = next(s for s in text.split("\r") if s.startswith("OBR|")).split("|")
    assert obr[18] == "ACC-RW6-42"
    assert obr[24] == order.procedure.modality
    (event,) = message_events(Er7Message.parse(text.encode()), {})
    assert isinstance(event, OrderPlaced)
    assert event.order.accession_number == "ACC-RW6-42"
    assert event.order.filler_order_number == order.filler
    assert event.order.modality == order.procedure.modality
