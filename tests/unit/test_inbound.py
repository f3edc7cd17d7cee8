"""Inbound HL7 -> domain events (hl7/inbound.py), through `message_events`, on our fixtures."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from hl7.er7 import Er7Message
from hl7.errors import (
    DataTypeError,
    Hl7Error,
    RequiredFieldMissing,
    SegmentSequenceError,
    TableValueNotFound,
    UnsupportedEvent,
    UnsupportedMessageType,
    UnsupportedProcessingId,
    UnsupportedVersion,
)
from hl7.inbound import InboundProfile, message_events
from worklist.domain.events import (
    ExamStatusChanged,
    OrderCancelled,
    OrderChanged,
    OrderDiscontinued,
    OrderHeld,
    OrderPlaced,
    OrderReleased,
    PatientsMerged,
    PatientUpdated,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hl7"


def fixture(name: str) -> Er7Message:
    return Er7Message.parse((FIXTURES / name).read_bytes())


def message(*segments: str) -> Er7Message:
    return Er7Message.parse("\r".join(segments).encode())


MSH = "MSH|^~\\&|CRIS|RW6|WL|REG|20261123091500||ORM^O01|C1|P|2.4"
PID = "PID|1||RW6123456^^^RW6^MR||SMITH^Ann||19700101|F"


def order(control: str, status: str = "", extra_obr: str = "") -> Er7Message:
    return message(
        MSH,
        PID,
        f"ORC|{control}|PL1|FL1||{status}",
        f"OBR|1|PL1|FL1|CHEAD^CT Head^NICIP|||||||||||||ACC1|||||CT{extra_obr}",
    )


def test_a_new_ct_head_order_becomes_order_placed_with_everything_the_worklist_needs() -> None:
    [event] = message_events(fixture("orm-o01-v24-nw-ct-head.hl7"))
    assert isinstance(event, OrderPlaced)
    assert event.order_control == "NW"
    assert event.order_status == "SC"
    assert event.message_time == datetime(2026, 11, 23, 9, 15, tzinfo=UTC)
    o = event.order
    assert (o.placer_order_number, o.placer_order_namespace) == ("PL778899", "ICE")
    assert (o.filler_order_number, o.filler_order_namespace) == ("FL445566", "CRIS")
    assert o.accession_number == "RW6ACC0001"
    assert (o.procedure_code, o.procedure_name, o.procedure_coding_system) == (
        "CHEAD",
        "CT Head",
        "NICIP",
    )
    assert o.modality == "CT"
    assert o.order_priority == "S"
    assert o.patient_class == "E"
    assert o.clinical_details == "Fall with head injury, GCS 13\non anticoagulants"
    assert o.referrer == "Dr Amir Khan (C1234567)"
    assert o.requested_at == datetime(2026, 11, 23, 9, 12, tzinfo=UTC)
    assert o.scheduled_at == datetime(2026, 11, 23, 9, 30, tzinfo=UTC)
    assert o.study_instance_uid == "1.2.826.0.1.3680043.9.7001.1.20261123.1"
    p = event.patient
    assert p is not None
    assert (p.local_id, p.local_authority) == ("RW6123456", "RW6")
    assert (p.nhs_number, p.nhs_number_valid, p.nhs_number_status) == ("9434765919", True, "NSTS01")
    assert (p.family_name, p.given_name, p.birth_date, p.sex) == (
        "O'BRIEN",
        "Siobhan",
        date(1967, 4, 12),
        "F",
    )
    assert len(p.identifiers) == 2


def test_exam_complete_becomes_exam_status_changed_with_the_performed_time() -> None:
    [event] = message_events(fixture("orm-o01-v24-sc-cm.hl7"))
    assert isinstance(event, ExamStatusChanged)
    assert event.order_status == "CM"
    assert event.order.performed_at == datetime(2026, 11, 23, 9, 40, tzinfo=UTC)


def test_a_cancellation_carries_its_reason() -> None:
    [event] = message_events(fixture("orm-o01-v24-ca.hl7"))
    assert isinstance(event, OrderCancelled)
    assert event.reason == "Requested in error"
    assert event.order.accession_number == "RW6ACC0001"


def test_an_omi_with_two_orders_gives_two_events_read_from_tq1_and_ipc() -> None:
    first, second = message_events(fixture("omi-o23-v251-two-orders.hl7"))
    assert isinstance(first, OrderPlaced) and isinstance(second, OrderPlaced)
    assert (first.order.accession_number, second.order.accession_number) == (
        "R0A-ACC-1",
        "R0A-ACC-2",
    )
    assert (first.order.modality, second.order.modality) == ("MR", "US")
    assert (first.order.order_priority, second.order.order_priority) == ("R", "A")
    assert first.order.study_instance_uid == "1.2.826.0.1.3680043.9.7001.2.1"
    assert first.order.scheduled_at == datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    assert first.order.pathway == "suspected_cancer"
    assert second.order.pathway is None
    assert "claustrophobic" in (first.order.clinical_details or "")
    assert first.patient is not None and first.patient.given_name == "Ayodele"
    assert first.patient.family_name == "Zoë"
    assert first.message_time == datetime(2026, 11, 23, 10, 15, tzinfo=UTC)


def test_lf_separated_orders_unescape_notes_and_map_free_text_patient_class() -> None:
    [event] = message_events(fixture("orm-o01-v23-lf-escapes.hl7"))
    assert (
        event.order.clinical_details
        == "Query pneumonia & effusion\nSats 91|on air\nWard 7 \\ bay 3"
    )
    assert event.order.patient_class == "I"
    assert event.order.order_priority == "R"
    assert event.order.modality == "DX"


def test_an_adt_update_reads_latin1_names_and_an_nhs_number_from_pid19() -> None:
    [event] = message_events(fixture("adt-a08-v23-latin1-nhs-in-pid19.hl7"))
    assert isinstance(event, PatientUpdated)
    assert event.trigger == "A08"
    p = event.patient
    assert (p.family_name, p.given_name) == ("DÉSIRÉ", "René")
    assert (p.nhs_number, p.nhs_number_valid) == ("9434765919", True)
    assert (p.local_id, p.local_authority) == ("S0012345", "RM3")
    assert p.birth_date == date(1940, 2, 29)


def test_a_merge_names_the_surviving_patient_and_the_prior_identifier() -> None:
    [event] = message_events(fixture("adt-a40-v24-merge.hl7"))
    assert isinstance(event, PatientsMerged)
    assert event.surviving.local_id == "RW6123456"
    assert event.prior_local_id == "RW6999001"
    assert event.prior_identifiers[0].authority == "RW6"


def test_an_invalid_nhs_number_is_kept_but_flagged_and_never_linked() -> None:
    msg = message(
        MSH.replace("ORM^O01", "ADT^A31"),
        "PID|1||9219068409^^^NHS^NH~H1^^^RW6^MR||X^Y",
    )
    [event] = message_events(msg)
    assert event.patient.nhs_number == "9219068409"
    assert not event.patient.nhs_number_valid
    assert event.patient.link_nhs_number is None
    assert event.patient.local_id == "H1"


def test_an_nhs_number_typed_hn_is_recognised() -> None:
    msg = message(
        MSH.replace("ORM^O01", "ADT^A01"), "PID|1||MRN1^^^TRUST^MEDREC~943 476 5919^^^^HN"
    )
    [event] = message_events(msg)
    assert event.patient.nhs_number == "9434765919"
    assert event.patient.local_id == "MRN1"


def test_the_profile_chooses_the_local_authority_among_several_identifiers() -> None:
    msg = message(
        MSH.replace("ORM^O01", "ADT^A08"), "PID|1||E1^^^EMPI^PI~H1^^^RW6^MR~C1^^^CHART^MR"
    )
    [event] = message_events(msg, {"local_authority": "CHART"})
    assert event.patient.local_id == "C1"


@pytest.mark.parametrize(
    ("control", "status", "event_type"),
    [
        ("NW", "", OrderPlaced),
        ("XO", "", OrderChanged),
        ("XX", "", OrderChanged),
        ("CA", "", OrderCancelled),
        ("OC", "", OrderCancelled),
        ("DC", "", OrderDiscontinued),
        ("HD", "", OrderHeld),
        ("OH", "", OrderHeld),
        ("RL", "", OrderReleased),
        ("SC", "SC", ExamStatusChanged),
        ("SC", "IP", ExamStatusChanged),
        ("SC", "CM", ExamStatusChanged),
        ("SC", "CA", OrderCancelled),
    ],
)
def test_order_control_drives_the_event_type(control: str, status: str, event_type: type) -> None:
    [event] = message_events(order(control, status))
    assert type(event) is event_type
    assert event.order_control == control


def test_an_unknown_order_control_is_ae_103_at_orc1() -> None:
    with pytest.raises(TableValueNotFound) as caught:
        message_events(fixture("orm-o01-v24-unknown-order-control.hl7"))
    assert (caught.value.ack_code, caught.value.error_code, caught.value.location) == (
        "AE",
        "103",
        "ORC-1",
    )


def test_a_status_change_without_a_status_is_ae_101_at_orc5() -> None:
    with pytest.raises(RequiredFieldMissing) as caught:
        message_events(order("SC"))
    assert caught.value.location == "ORC-5"


def test_a_new_order_without_a_patient_identifier_is_ae_101_at_pid3() -> None:
    with pytest.raises(RequiredFieldMissing) as caught:
        message_events(fixture("orm-o01-v231-nw-missing-pid3.hl7"))
    assert (caught.value.ack_code, caught.value.error_code, caught.value.location) == (
        "AE",
        "101",
        "PID-3",
    )


def test_an_order_without_orc_is_ae_100() -> None:
    with pytest.raises(SegmentSequenceError) as caught:
        message_events(message(MSH, PID))
    assert caught.value.error_code == "100"


def test_an_order_with_no_accession_or_order_number_names_the_accession_field() -> None:
    msg = message(MSH, PID, "ORC|NW", "OBR|1|||CHEAD^CT Head")
    with pytest.raises(RequiredFieldMissing) as caught:
        message_events(msg, {"accession_fields": ["OBR-3"]})
    assert caught.value.location == "OBR-3"


def test_an_unsupported_message_type_is_ar_200() -> None:
    with pytest.raises(UnsupportedMessageType) as caught:
        message_events(fixture("oru-r01-v24-unsupported.hl7"))
    assert (caught.value.ack_code, caught.value.error_code) == ("AR", "200")


def test_an_unsupported_order_trigger_is_ar_201() -> None:
    with pytest.raises(UnsupportedEvent) as caught:
        message_events(message(MSH.replace("ORM^O01", "ORM^O99"), PID))
    assert caught.value.error_code == "201"


def test_an_unsupported_version_is_ar_203() -> None:
    with pytest.raises(UnsupportedVersion) as caught:
        message_events(fixture("orm-o01-v26-unsupported-version.hl7"))
    assert (caught.value.ack_code, caught.value.error_code, caught.value.location) == (
        "AR",
        "203",
        "MSH-12",
    )


def test_a_processing_id_the_trust_does_not_accept_is_ar_202() -> None:
    training = message(MSH.replace("|P|2.4", "|T|2.4"), PID, "ORC|NW|P|F", "OBR|1|P|F")
    assert message_events(training)
    with pytest.raises(UnsupportedProcessingId):
        message_events(training, {"processing_ids": ["P"]})


def test_other_adt_events_are_ignored_by_default_or_refused_if_the_trust_says() -> None:
    discharge = message(MSH.replace("ORM^O01", "ADT^A03"), PID)
    assert message_events(discharge) == []
    with pytest.raises(UnsupportedEvent):
        message_events(discharge, {"ignore_other_adt": False})


def test_an_unreadable_message_time_is_ae_102() -> None:
    with pytest.raises(DataTypeError) as caught:
        message_events(
            message(MSH.replace("20261123091500", "NOTADATE"), PID, "ORC|NW|P|F", "OBR|1|P|F")
        )
    assert caught.value.location == "MSH-7"


def test_an_empty_message_time_falls_back_to_the_receipt_time() -> None:
    received = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    [event] = message_events(
        message(MSH.replace("20261123091500", ""), PID, "ORC|NW|P|F", "OBR|1|P|F"),
        received_at=received,
    )
    assert event.message_time == received


def test_profile_fields_move_accession_priority_and_modality() -> None:
    msg = message(
        MSH,
        PID,
        "ORC|NW|PL1|FL1||SC||^^^^^U",
        "OBR|1|PL1|FL1|XKNEL^XR Knee Left^LOCAL|||||||||||||ACC-OBR18|||||RAD",
    )
    profile = {
        "accession_fields": ["ORC-3"],
        "priority_fields": ["ORC-7"],
        "modality_sources": ["procedure_table", "OBR-24"],
        "procedures": {"XKNEL": {"modality": "DX", "body_area": "knee"}},
    }
    [event] = message_events(msg, profile)
    assert event.order.accession_number == "FL1"
    assert event.order.order_priority == "A"
    assert (event.order.modality, event.order.body_area) == ("DX", "knee")


def test_a_profile_with_an_unknown_setting_or_field_is_refused() -> None:
    with pytest.raises(ValueError):
        InboundProfile.from_dict({"accesion_fields": ["OBR-18"]})
    with pytest.raises(ValueError):
        InboundProfile.from_dict({"accession_fields": ["PID-3"]})
    with pytest.raises(ValueError):
        InboundProfile.from_dict({"ack_mode": "sometimes"})


def test_every_inbound_error_is_an_hl7_error_with_an_ack_code() -> None:
    for name in ("orm-o01-v231-nw-missing-pid3.hl7", "oru-r01-v24-unsupported.hl7"):
        with pytest.raises(Hl7Error) as caught:
            message_events(fixture(name))
        assert caught.value.ack_code in ("AE", "AR")


def test_the_routing_table_names_every_accepted_message_type() -> None:
    from hl7.router import ROUTES

    assert {
        "ORM^O01",
        "OMI^O23",
        "ADT^A01",
        "ADT^A04",
        "ADT^A08",
        "ADT^A31",
        "ADT^A28",
        "ADT^A40",
    } <= set(ROUTES)
    assert "ORU^R01" not in ROUTES
