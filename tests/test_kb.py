"""The packaged knowledge base and the report structure parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES, load_knowledge_base
from mlip_fed.knowledge.report import split_clauses, split_report, split_sections, split_sentences


@pytest.fixture(scope="module")
def kb():
    return load_knowledge_base()


def test_packaged_kb_validates_and_covers_every_category(kb) -> None:
    for category in CHEXPERT_CATEGORIES:
        assert kb.category_descriptions[category].strip(), category
        assert kb.prompts_positive[category], category
        assert kb.prompts_negative[category], category
        if category != "No Finding":
            assert kb.for_category(category), f"no concept maps to {category}"


def test_concept_groups_and_required_content(kb) -> None:
    groups = {c.group for c in kb.concepts}
    assert groups == {"finding", "anatomy", "device", "modifier"}
    for concept in kb.concepts:
        assert concept.definition.strip(), concept.id
        if concept.group == "device" and concept.chexpert_category is not None:
            assert concept.chexpert_category == "Support Devices", concept.id
    # Findings outside the 14 categories exist: they cancel No Finding.
    assert {"emphysema", "granuloma", "scoliosis", "hernia", "copd"} <= {
        c.id for c in kb.by_group("finding") if c.chexpert_category is None
    }
    anatomy = {c.id for c in kb.by_group("anatomy")}
    assert {
        "right_upper_lobe",
        "right_middle_lobe",
        "right_lower_lobe",
        "left_upper_lobe",
        "left_lower_lobe",
    } <= anatomy
    assert {"lingula", "costophrenic_angle", "hilum", "lung_apex", "lung_base", "mediastinum_anatomy"} <= anatomy


def test_key_mappings(kb) -> None:
    assert kb.concept("pleural_effusion").cui == "C0032227"
    assert "pericardial effusion" in kb.concept("pleural_effusion").unmention
    assert kb.concept("heart_failure").chexpert_category == "Edema"
    assert "chf" in kb.concept("heart_failure").surface_forms
    for concept_id in ("opacity", "infiltrate", "airspace_disease", "scarring"):
        assert kb.concept(concept_id).chexpert_category == "Lung Opacity"
    for concept_id in ("nodule", "mass", "tumor"):
        assert kb.concept(concept_id).chexpert_category == "Lung Lesion"
    for concept_id in ("endotracheal_tube", "enteric_tube", "central_line", "picc", "pacemaker", "chest_tube"):
        assert kb.concept(concept_id).group == "device"


def test_surface_forms_are_longest_first_and_lower_case(kb) -> None:
    forms = kb.concept("pleural_effusion").surface_forms
    assert forms[0] == max(forms, key=len)
    assert all(f == f.lower() for f in forms)


def test_a_surface_form_names_one_finding_only(kb) -> None:
    """Two findings sharing a phrase would make the labeler's choice arbitrary."""
    owner: dict[str, str] = {}
    for concept in kb.concepts:
        if concept.group not in ("finding", "device"):
            continue
        for form in concept.surface_forms:
            assert form not in owner, f"{form!r} in both {owner.get(form)} and {concept.id}"
            owner[form] = concept.id


def _write(tmp_path: Path, payload: object) -> Path:
    path = tmp_path / "kb.json"
    path.write_text(json.dumps(payload) if not isinstance(payload, str) else payload, encoding="utf-8")
    return path


def _minimal() -> dict:
    return {
        "version": "t",
        "concepts": [{"id": "x", "name": "x", "definition": "d", "group": "finding"}],
        "category_descriptions": {c: c for c in CHEXPERT_CATEGORIES},
    }


def test_minimal_kb_loads(tmp_path) -> None:
    assert load_knowledge_base(_write(tmp_path, _minimal())).concept("x").name == "x"


def test_bad_json_names_the_file(tmp_path) -> None:
    path = _write(tmp_path, "{not json")
    with pytest.raises(ValueError, match="not valid JSON") as err:
        load_knowledge_base(path)
    assert str(path) in str(err.value)


def test_unknown_category_is_named(tmp_path) -> None:
    payload = _minimal()
    payload["concepts"][0]["chexpert_category"] = "Lung Thing"
    with pytest.raises(ValueError, match="Lung Thing"):
        load_knowledge_base(_write(tmp_path, payload))


def test_missing_category_description_is_named(tmp_path) -> None:
    payload = _minimal()
    del payload["category_descriptions"]["Fracture"]
    with pytest.raises(ValueError, match="Fracture"):
        load_knowledge_base(_write(tmp_path, payload))


def test_duplicate_concept_id_is_named(tmp_path) -> None:
    payload = _minimal()
    payload["concepts"].append(dict(payload["concepts"][0]))
    with pytest.raises(ValueError, match="duplicate concept id 'x'"):
        load_knowledge_base(_write(tmp_path, payload))


def test_bad_group_and_cui_are_rejected(tmp_path) -> None:
    payload = _minimal()
    payload["concepts"][0]["group"] = "organ"
    with pytest.raises(ValueError, match="group"):
        load_knowledge_base(_write(tmp_path, payload))
    payload = _minimal()
    payload["concepts"][0]["cui"] = "12345"
    with pytest.raises(ValueError, match="cui"):
        load_knowledge_base(_write(tmp_path, payload))


# --- report structure -------------------------------------------------------------------------


def _texts(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [text[a:b] for a, b in spans]


def test_sections_mimic_style() -> None:
    # "FINAL REPORT" has no colon: it is preamble, not a header.
    text = "FINAL REPORT\n INDICATION: cough.\n\n FINDINGS: No effusion.\n IMPRESSION: Normal chest."
    sections = split_sections(text)
    assert [s.name for s in sections] == [None, "indication", "findings", "impression"]
    findings = sections[2]
    assert text[findings.start : findings.end].strip() == "No effusion."


def test_report_without_headers_is_one_section() -> None:
    text = "Lungs are clear. No effusion."
    assert [(s.name, s.start, s.end) for s in split_sections(text)] == [(None, 0, len(text))]
    assert split_sections("   ") == []


def test_sentences_handle_missing_space_lists_and_decimals() -> None:
    text = "Opacity in the left apex.There is a 2.5 cm nodule. 1. Small effusion. 2. No pneumothorax"
    assert _texts(text, split_sentences(text)) == [
        "Opacity in the left apex.",
        "There is a 2.5 cm nodule.",
        "Small effusion.",
        "No pneumothorax",
    ]


def test_sentences_keep_abbreviations_and_split_paragraphs() -> None:
    text = "Atelectasis vs. pneumonia\n\nheart normal"
    assert _texts(text, split_sentences(text)) == ["Atelectasis vs. pneumonia", "heart normal"]


def test_split_report_carries_section_names_and_spans() -> None:
    text = "FINDINGS: No effusion. Heart normal.\nIMPRESSION: Normal."
    sentences = split_report(text)
    assert [(text[s.start : s.end], s.section) for s in sentences] == [
        ("No effusion.", "findings"),
        ("Heart normal.", "findings"),
        ("Normal.", "impression"),
    ]


def test_clauses_break_at_contrast_words() -> None:
    text = "No effusion but there is a small pneumothorax; mild atelectasis"
    clauses = _texts(text, split_clauses(text, 0, len(text)))
    assert clauses[0].strip() == "No effusion"
    assert any("pneumothorax" in c for c in clauses[1:])
    assert clauses[-1].strip().endswith("mild atelectasis")
    assert "".join(clauses) == text
