"""Stored report templates and personal macros through the JSON API with real bearer tokens.

Claims are made by setting Study.claimed_by_id / claim_expires_at through the factory, as the
worklist engine's own tests cover how claims are taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import pytest
import sqlalchemy as sa

from tests.factories import make_patient, make_study, make_token, make_trust, make_user
from worklist.db.models import AuditEvent, ReportVersion


@dataclass
class World:
    studies: dict[str, int]
    auth: dict[str, dict[str, str]]


@pytest.fixture
def world(runtime, clock) -> World:  # type: ignore[no-untyped-def]
    """RW6 and RM3; two RW6 CT radiologists (asingh holds the claim on the RW6 study), a
    manager, an admin; one CT head study ready in each trust."""
    now = clock.now()
    with runtime.session() as s:
        rw6 = make_trust(s, now=now, code="RW6")
        rm3 = make_trust(s, now=now, code="RM3")
        reader = make_user(s, now=now, username="asingh", trusts=("RW6",), credentials=("CT",),
                           full_name="Dr Asha Singh")  # fmt: skip
        other = make_user(s, now=now, username="bjones", trusts=("RW6",), credentials=("CT",))
        manager = make_user(s, now=now, username="boss", role="manager")
        admin = make_user(s, now=now, username="root", role="admin")
        patient = make_patient(s, trust=rw6, now=now, given_name="Ada", family_name="Lovelace")
        patient.birth_date = date(1950, 12, 10)
        rw6_study = make_study(
            s, trust=rw6, now=now, patient=patient, accession_number="RW6ACC1",
            claimed_by_id=reader.id, claimed_at=now, claim_expires_at=now + timedelta(minutes=30),
        )  # fmt: skip
        rm3_study = make_study(s, trust=rm3, now=now)
        tokens = {
            name: make_token(s, user=user, now=now)
            for name, user in (
                ("reader", reader), ("other", other), ("manager", manager), ("admin", admin)
            )
        }  # fmt: skip
    return World(
        studies={"rw6": rw6_study.id, "rm3": rm3_study.id},
        auth={k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()},
    )


def add_template(client, auth, **fields):  # type: ignore[no-untyped-def]
    body = {"name": "CT report", "text": "Findings:\n", "modality": "CT", **fields}
    response = client.post("/api/v1/templates", json=body, headers=auth)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


# --- templates ----------------------------------------------------------------------------


def test_a_trusts_own_template_beats_the_region_wide_one_for_that_trusts_study(client, world):
    manager = world.auth["manager"]
    add_template(client, manager, name="CT regional", trust=None, text="Regional CT.\n")
    add_template(
        client, manager, name="CT RW6", trust="RW6",
        text="{{procedure}} for {{patient_name}} (born {{birth_date}}), {{accession_number}}, "
        "{{exam_date}}.\nReported by {{radiologist}}.\nClinical details: {{clinical_details}}",
    )  # fmt: skip
    rw6 = client.get(f"/api/v1/studies/{world.studies['rw6']}/report/template",
                     headers=world.auth["reader"]).get_json()  # fmt: skip
    assert rw6["template"] == "CT RW6"
    assert rw6["text"].startswith(
        "CT Head for Ada Lovelace (born 1950-12-10), RW6ACC1, 23/11/2026.\n"
        "Reported by Dr Asha Singh."
    )
    assert rw6["unfilled"] == ["clinical_details"]  # the study has none: left visible
    rm3 = client.get(f"/api/v1/studies/{world.studies['rm3']}/report/template",
                     headers=manager).get_json()  # fmt: skip
    assert rm3 == {"template": "CT regional", "text": "Regional CT.\n", "unfilled": []}


def test_the_built_in_templates_apply_only_when_no_stored_template_fits(client, world):
    url = f"/api/v1/studies/{world.studies['rw6']}/report/template"
    assert client.get(url, headers=world.auth["reader"]).get_json()["template"] == "CT head"
    add_template(client, world.auth["manager"], name="MR brain", modality="MR")
    add_template(client, world.auth["manager"], name="CT for RM3", trust="RM3")
    assert client.get(url, headers=world.auth["reader"]).get_json()["template"] == "CT head"
    stored = add_template(client, world.auth["manager"], name="Any study", modality=None,
                          text="Stored generic.")  # fmt: skip
    assert client.get(url, headers=world.auth["reader"]).get_json()["template"] == "Any study"
    client.put(f"/api/v1/templates/{stored['id']}", json={"active": False},
               headers=world.auth["manager"])  # fmt: skip
    assert client.get(url, headers=world.auth["reader"]).get_json()["template"] == "CT head"


def test_an_unknown_or_malformed_placeholder_is_refused_with_400(client, world):
    manager = world.auth["manager"]
    typo = client.post("/api/v1/templates", json={"name": "T", "text": "For {{patient_nmae}}"},
                       headers=manager)  # fmt: skip
    assert typo.status_code == 400
    assert "{{patient_nmae}}" in typo.get_json()["message"]
    assert "patient_name" in typo.get_json()["message"]  # the known ones are listed
    broken = client.post("/api/v1/templates", json={"name": "T", "text": "On {{exam date}}"},
                         headers=manager)  # fmt: skip
    assert broken.status_code == 400 and "malformed" in broken.get_json()["message"]
    good = add_template(client, manager, name="T")
    change = client.put(f"/api/v1/templates/{good['id']}", json={"text": "{{nope}}"},
                        headers=manager)  # fmt: skip
    assert change.status_code == 400
    assert client.get(f"/api/v1/templates/{good['id']}", headers=manager).get_json()["text"] == (
        "Findings:\n"
    )
    for bad in ({"text": "x"}, {"name": "T2", "text": ""}, {"name": "T2", "text": "x",
                                                             "trust": "NOPE"}):  # fmt: skip
        assert client.post("/api/v1/templates", json=bad, headers=manager).status_code == 400


def test_a_radiologist_cannot_create_change_or_delete_templates(client, world):
    reader = world.auth["reader"]
    body = {"name": "Mine", "text": "Findings:"}
    assert client.post("/api/v1/templates", json=body, headers=reader).status_code == 403
    stored = add_template(client, world.auth["manager"])
    url = f"/api/v1/templates/{stored['id']}"
    assert client.put(url, json={"text": "x"}, headers=reader).status_code == 403
    assert client.delete(url, headers=reader).status_code == 403
    assert client.get(url, headers=reader).get_json()["text"] == "Findings:\n"


def test_a_radiologist_reads_region_wide_templates_and_their_own_trusts_only(client, world):
    manager, reader = world.auth["manager"], world.auth["reader"]
    regional = add_template(client, manager, name="Regional")
    own = add_template(client, manager, name="RW6 only", trust="RW6")
    foreign = add_template(client, manager, name="RM3 only", trust="RM3")
    listed = client.get("/api/v1/templates", headers=reader).get_json()
    assert [t["name"] for t in listed["templates"]] == ["Regional", "RW6 only"]
    assert "exam_date" in listed["placeholders"]
    assert client.get(f"/api/v1/templates/{own['id']}", headers=reader).status_code == 200
    assert client.get(f"/api/v1/templates/{foreign['id']}", headers=reader).status_code == 404
    everything = client.get("/api/v1/templates", headers=manager).get_json()["templates"]
    assert {t["id"] for t in everything} == {regional["id"], own["id"], foreign["id"]}
    for_rm3 = client.get("/api/v1/templates?trust=RM3", headers=manager).get_json()["templates"]
    assert [t["name"] for t in for_rm3] == ["Regional", "RM3 only"]


def test_template_changes_are_audited_and_names_are_unique_per_scope(client, world, runtime):
    admin = world.auth["admin"]
    stored = add_template(client, admin, name="CT report")
    again = client.post("/api/v1/templates", json={"name": "CT report", "text": "x"},
                        headers=admin)  # fmt: skip
    assert again.status_code == 409  # region-wide: NULL trust, still one per name
    add_template(client, admin, name="CT report", trust="RW6")  # another scope: fine
    url = f"/api/v1/templates/{stored['id']}"
    changed = client.put(url, json={"modality": "mr", "procedure_code": "MBRAIN"}, headers=admin)
    assert changed.status_code == 200
    assert (changed.get_json()["modality"], changed.get_json()["procedure_code"]) == (
        "MR", "MBRAIN",
    )  # fmt: skip
    assert client.delete(url, headers=admin).status_code == 204
    assert client.get(url, headers=admin).status_code == 404
    with runtime.session() as s:
        events = s.scalars(
            sa.select(AuditEvent)
            .where(AuditEvent.object_type == "report_template")
            .order_by(AuditEvent.id)
        ).all()
        assert [(e.action, e.username) for e in events] == [
            ("template_create", "root"), ("template_create", "root"),
            ("template_update", "root"), ("template_delete", "root"),
        ]  # fmt: skip
        assert events[2].detail["changed"] == ["procedure_code", "modality"]
        assert events[3].detail["text"] == "Findings:\n"  # what was removed stays readable


# --- macros -------------------------------------------------------------------------------


def add_macro(client, auth, name, text):  # type: ignore[no-untyped-def]
    response = client.post("/api/v1/macros", json={"name": name, "text": text}, headers=auth)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_macros_are_personal_and_another_users_macro_answers_404(client, world):
    mine = add_macro(client, world.auth["reader"], ".NormChest", "Clear lungs.")
    assert mine["name"] == ".normchest"
    other = world.auth["other"]
    assert client.get("/api/v1/macros", headers=other).get_json() == {"macros": []}
    url = f"/api/v1/macros/{mine['id']}"
    assert client.put(url, json={"text": "Hijacked."}, headers=other).status_code == 404
    assert client.delete(url, headers=other).status_code == 404
    assert client.delete(url, headers=world.auth["manager"]).status_code == 404
    add_macro(client, other, "normchest", "Lungs clear.")  # the same trigger, another person
    listed = client.get("/api/v1/macros", headers=world.auth["reader"]).get_json()["macros"]
    assert [(m["name"], m["text"]) for m in listed] == [(".normchest", "Clear lungs.")]
    again = client.post("/api/v1/macros", json={"name": ".normchest", "text": "x"},
                        headers=world.auth["reader"])  # fmt: skip
    assert again.status_code == 409
    renamed = client.put(url, json={"name": ".cxr"}, headers=world.auth["reader"])
    assert renamed.get_json()["name"] == ".cxr" and renamed.get_json()["text"] == "Clear lungs."
    assert client.delete(url, headers=world.auth["reader"]).status_code == 204
    assert client.get("/api/v1/macros", headers=world.auth["reader"]).get_json() == {"macros": []}


def test_expansion_uses_only_the_callers_own_macros(client, world):
    add_macro(client, world.auth["reader"], ".normchest", "The lungs are clear.")
    text = "Findings: .NormChest Nodule 0.5 cm, e.g. stable. .unknown"
    mine = client.post("/api/v1/macros/expand", json={"text": text}, headers=world.auth["reader"])
    assert mine.get_json() == {
        "text": "Findings: The lungs are clear. Nodule 0.5 cm, e.g. stable. .unknown"
    }
    theirs = client.post("/api/v1/macros/expand", json={"text": text},
                         headers=world.auth["other"])  # fmt: skip
    assert theirs.get_json() == {"text": text}
    assert client.post("/api/v1/macros/expand", json={"text": 5},
                       headers=world.auth["reader"]).status_code == 400  # fmt: skip


def test_bad_macro_names_and_macros_inside_macros_are_refused(client, world):
    reader = world.auth["reader"]
    for name in ("norm chest", ".5cm", ".", "", ".x" + "y" * 40, 7):
        response = client.post("/api/v1/macros", json={"name": name, "text": "x"}, headers=reader)
        assert response.status_code == 400, name
    for body in ({"name": ".a", "text": "  "}, {"name": ".a", "text": "again .a"}):
        assert client.post("/api/v1/macros", json=body, headers=reader).status_code == 400
    add_macro(client, reader, ".normchest", "Clear.")
    nested = client.post("/api/v1/macros", json={"name": ".full", "text": "CXR: .normchest"},
                         headers=reader)  # fmt: skip
    assert nested.status_code == 400
    add_macro(client, reader, ".full", "CXR: .later")
    clash = client.post("/api/v1/macros", json={"name": ".later", "text": "x"}, headers=reader)
    assert clash.status_code == 400 and ".full" in clash.get_json()["message"]
    admin = client.post("/api/v1/macros", json={"name": ".x", "text": "x"},
                        headers=world.auth["admin"])  # fmt: skip
    assert admin.status_code == 403  # an admin writes no reports


def test_saving_a_draft_and_signing_expand_the_authors_macros(client, world, runtime):
    reader = world.auth["reader"]
    add_macro(client, reader, ".normchest", "The lungs are clear.")
    add_macro(client, reader, ".nad", "No acute abnormality.")
    report_url = f"/api/v1/studies/{world.studies['rw6']}/report"
    saved = client.put(report_url, json={"text": "Findings: .normchest"}, headers=reader)
    assert saved.status_code == 200
    assert saved.get_json()["text"] == "Findings: The lungs are clear."
    draft = client.get(report_url, headers=reader).get_json()["draft_text"]
    assert draft == "Findings: The lungs are clear."
    signed = client.post(f"{report_url}/sign", headers=reader, json={
        "status": "final", "text": "Findings: .normchest\nImpression: .NAD"})  # fmt: skip
    assert signed.status_code == 201, signed.get_json()
    with runtime.session() as s:
        version = s.scalars(sa.select(ReportVersion)).one()
        assert version.text == "Findings: The lungs are clear.\nImpression: No acute abnormality."
