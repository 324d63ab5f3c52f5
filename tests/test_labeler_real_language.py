"""The labeler's rules for real report language (issue #17), one test per rule, on sentences written here.

None of these sentences comes from a data file: each is made up to exercise one rule, with a
near miss next to it that the rule must leave alone.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from bench import labeler_iu
from bench.docs_block import block_names
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES
from mlip_fed.knowledge.labeler import extract_mentions, label_report


def label(text: str, category: str) -> float:
    return label_report(text).labels[CHEXPERT_CATEGORIES.index(category)]


def is_blank(value: float) -> bool:
    return math.isnan(value)


# ----------------------------------------------------------------------------------------------
# Negation and normality stated after the mention, through coordinated subjects
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Heart size and pulmonary vascular congestion appear within normal limits.",
        "The cardiac silhouette and pulmonary vascular engorgement are within limits of normal.",
        "Pulmonary vascular congestion, heart size, and mediastinal contours are unremarkable.",
        "Heart size and pulmonary vascular prominence within normal limits.",
        "Interstitial edema is not seen.",
    ],
)
def test_post_modifier_normality_negates_through_coordinated_subject(text: str) -> None:
    assert label(text, "Edema") == 0.0


def test_coordinated_subject_negation_covers_every_item() -> None:
    values = label_report("Pneumothorax, pleural effusion, and focal consolidation are not seen.").as_dict()
    assert values["Pneumothorax"] == 0.0
    assert values["Pleural Effusion"] == 0.0
    assert values["Consolidation"] == 0.0


@pytest.mark.parametrize(
    "text",
    [
        # A bare comma joins two statements, not a list of subjects.
        "Cardiomegaly with pulmonary vascular congestion, pleural effusions are not seen.",
        # A severity word asserts the finding; it does not head a list of normal structures.
        "Mild interstitial edema and the heart size is normal.",
        "Mild pulmonary edema.",
    ],
)
def test_coordination_near_misses_stay_positive(text: str) -> None:
    assert label(text, "Edema") == 1.0


# ----------------------------------------------------------------------------------------------
# Resolution and history
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("Since the last study, interstitial infiltrates and pulmonary vascular congestion have resolved.", "Edema"),
        (
            "Since the last study, interstitial infiltrates and pulmonary vascular congestion have resolved.",
            "Lung Opacity",
        ),
        ("Interval resolution of the right lower lobe pneumonia.", "Pneumonia"),
        ("Interval clearing of the left basilar opacity.", "Lung Opacity"),
        ("The left apical pneumothorax is no longer seen.", "Pneumothorax"),
        ("The small right effusion has cleared.", "Pleural Effusion"),
        ("Resolved interstitial edema.", "Edema"),
    ],
)
def test_complete_resolution_negates(text: str, category: str) -> None:
    assert label(text, category) == 0.0


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("Resolving bilateral interstitial edema.", "Edema"),
        ("The perihilar edema is resolving.", "Edema"),
        ("The left pleural effusion has nearly resolved.", "Pleural Effusion"),
        ("Partial resolution of the right lower lobe pneumonia.", "Pneumonia"),
        ("Partial clearing of the lingular consolidation.", "Consolidation"),
    ],
)
def test_partial_resolution_is_uncertain(text: str, category: str) -> None:
    assert label(text, category) == -1.0


def test_improving_is_still_present() -> None:
    # CheXpert's reading, kept: an improving finding is there.
    assert label("Improving left lower lobe pneumonia.", "Pneumonia") == 1.0


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("History of congestive heart failure. The lungs are clear.", "Edema"),
        ("Calcified hilar nodes, sequelae of prior granulomatous infection.", "Pneumonia"),
        ("Remote pneumothorax on the left.", "Pneumothorax"),
    ],
)
def test_history_of_an_acute_process_sets_no_label(text: str, category: str) -> None:
    assert is_blank(label(text, category))


def test_history_does_not_erase_chronic_findings() -> None:
    assert label("Old healed fracture of the right 6th rib.", "Fracture") == 1.0


# ----------------------------------------------------------------------------------------------
# Attribution
# ----------------------------------------------------------------------------------------------


def test_attributed_nodular_density_moves_to_fracture() -> None:
    values = label_report(
        "Nodular density overlying the anterior right 5th rib represents a healing rib fracture."
    ).as_dict()
    assert is_blank(values["Lung Lesion"])
    assert values["Fracture"] == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "Rounded density at the right base corresponds to the nipple shadow.",
        "Right basilar opacity is due to overlying soft tissue.",
        "Linear density in the left upper zone is from the pacemaker lead.",
        "Increased density behind the heart is due to a hiatal hernia.",
    ],
)
def test_opacity_attributed_outside_the_lung_is_dropped(text: str) -> None:
    assert is_blank(label(text, "Lung Opacity"))


def test_qualifier_inside_a_finding_phrase_is_not_the_hearts() -> None:
    values = label_report("Increased density behind the heart is due to a hiatal hernia.").as_dict()
    assert is_blank(values["Cardiomegaly"])
    assert label("The heart is increased in size.", "Cardiomegaly") == 1.0


def test_attribution_to_a_lung_process_keeps_both_labels() -> None:
    values = label_report("Right basilar opacity consistent with pneumonia.").as_dict()
    assert values["Lung Opacity"] == 1.0
    assert values["Pneumonia"] == 1.0
    values = label_report("Coarse interstitial markings suggesting pulmonary fibrosis.").as_dict()
    assert values["Lung Opacity"] == 1.0


def test_attribution_to_the_same_category_keeps_the_lesion() -> None:
    assert label("Right upper lobe mass consistent with bronchogenic carcinoma.", "Lung Lesion") == 1.0


def test_hedged_attribution_to_artifact_is_uncertain() -> None:
    values = label_report("Faint nodular-like opacity in the left mid lung may be artifact.").as_dict()
    assert values["Lung Lesion"] == -1.0
    assert values["Lung Opacity"] == -1.0


def test_attribution_in_the_next_sentence() -> None:
    text = "A 6 mm nodule projects over the right lower lobe. This represents a bone island."
    assert is_blank(label(text, "Lung Lesion"))
    hedged = "A 6 mm nodule projects over the right lower lobe. This most likely represents the nipple."
    assert label(hedged, "Lung Lesion") == -1.0
    # Without a pointing-back opener the next sentence is about something else.
    unrelated = "A 6 mm nodule projects over the right lower lobe. Degenerative changes represent spondylosis."
    assert label(unrelated, "Lung Lesion") == 1.0


def test_another_finding_between_stops_the_attribution() -> None:
    text = "Streaky basilar opacity and blunting of the costophrenic angle, likely due to a small effusion."
    assert label(text, "Lung Opacity") == 1.0


def test_attribution_keeps_spans_in_the_text() -> None:
    text = "Nodular density over the left 4th rib represents a healing fracture. No pneumothorax."
    for mention in extract_mentions(text):
        assert text[mention.start : mention.end] == mention.text


# ----------------------------------------------------------------------------------------------
# Granulomas (documented choice: a calcified granuloma is not a Lung Lesion)
# ----------------------------------------------------------------------------------------------


def test_calcified_granuloma_is_not_a_lung_lesion() -> None:
    values = label_report("Calcified granuloma in the left upper lobe.").as_dict()
    assert is_blank(values["Lung Lesion"])
    # It is still an "other finding", so the study is not No Finding.
    assert is_blank(values["No Finding"])


def test_nodule_called_calcified_or_granulomatous_is_not_a_lung_lesion() -> None:
    assert is_blank(
        label("Small nodule in the right midlung is calcified, consistent with a granuloma.", "Lung Lesion")
    )
    assert is_blank(label("Scattered nodular densities consistent with old granulomatous disease.", "Lung Lesion"))


def test_nodule_only_hedged_as_granuloma_stays_a_lesion() -> None:
    # "Likely a granuloma" characterises a nodule that is there; it does not deny it.
    assert label("8 mm nodule in the left upper lobe, likely a granuloma.", "Lung Lesion") == 1.0


# ----------------------------------------------------------------------------------------------
# Smaller rules
# ----------------------------------------------------------------------------------------------


def test_extrapulmonary_lesions_are_not_lung_lesions() -> None:
    assert is_blank(label("Right chest wall mass.", "Lung Lesion"))
    assert is_blank(label("Known left breast carcinoma.", "Lung Lesion"))
    assert label("Left lower lobe mass.", "Lung Lesion") == 1.0


def test_hedge_reaches_through_due_to() -> None:
    assert label("Left basilar opacity. This may be due to atelectasis.", "Atelectasis") == -1.0
    assert label("Aspiration or edema is also possible.", "Edema") == -1.0


def test_age_indeterminate_fracture_is_present() -> None:
    assert label("Age-indeterminate fractures of the left 7th and 8th ribs.", "Fracture") == 1.0


def test_purpose_clause_is_not_a_finding() -> None:
    assert label("CT could be obtained to identify a small nodule.", "Lung Lesion") != 1.0


# ----------------------------------------------------------------------------------------------
# The benchmark's held-out split
# ----------------------------------------------------------------------------------------------


def _rows(n: int) -> list[dict[str, str]]:
    return [{"uid": str(i), "MeSH": "normal", "findings": "Clear lungs.", "impression": ""} for i in range(n)]


def test_holdout_is_a_fixed_seeded_30_percent_by_report_id() -> None:
    rows = _rows(200)
    held = labeler_iu.holdout_ids([r["uid"] for r in rows])
    assert len(held) == 60
    # Independent of row order, and tune/holdout partition the file.
    assert labeler_iu.holdout_ids([r["uid"] for r in reversed(rows)]) == held
    tune = {r["uid"] for r in labeler_iu.select_split(rows, "tune")}
    hold = {r["uid"] for r in labeler_iu.select_split(rows, "holdout")}
    assert hold == held and not tune & hold and tune | hold == {r["uid"] for r in rows}
    assert labeler_iu.select_split(rows, "all") == rows


def test_bench_writes_one_block_per_split(tmp_path: Path) -> None:
    reports = tmp_path / "reports.csv"
    rows = _rows(20)
    rows[0]["MeSH"] = "Pleural Effusion/left"
    rows[0]["findings"] = "Small left pleural effusion."
    with reports.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    doc = tmp_path / "labeler.md"
    doc.write_text("# Labeler\n\nHand-written text.\n", encoding="utf-8")
    assert labeler_iu.main(["--reports", str(reports), "--split", "tune", "holdout", "--out", str(doc)]) == 0
    assert labeler_iu.main(["--reports", str(reports), "--split", "tune", "--out", str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert "Hand-written text." in text
    for split in ("tune", "holdout"):
        assert block_names(text).count(labeler_iu.block_name(split)) == 1
    assert labeler_iu.block_name("all") not in text
    with pytest.raises(SystemExit, match="tune split only"):
        labeler_iu.main(["--reports", str(reports), "--split", "holdout", "--errors", "5"])
