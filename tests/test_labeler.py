"""Behaviour of the CheXpert-compatible labeler on hand-written report sentences."""

from __future__ import annotations

import csv
import math

import pytest

from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES
from mlip_fed.knowledge.labeler import LabeledReport, aggregate, extract_mentions, label_report, label_reports
from mlip_fed.knowledge.mentions import Mention


def label(text: str, category: str) -> float:
    return label_report(text).labels[CHEXPERT_CATEGORIES.index(category)]


def is_blank(value: float) -> bool:
    return math.isnan(value)


def test_plain_positive_and_negation() -> None:
    assert label("Small left pleural effusion.", "Pleural Effusion") == 1.0
    assert label("No pleural effusion.", "Pleural Effusion") == 0.0
    assert label("There is no evidence of pneumothorax.", "Pneumothorax") == 0.0
    assert label("Pneumothorax is not seen.", "Pneumothorax") == 0.0
    assert is_blank(label("Small left pleural effusion.", "Pneumothorax"))


def test_pre_negation_uncertainty_wins_over_negation() -> None:
    # "cannot" and "no" are negation words, yet these phrases are hedges (NegBio order).
    assert label("Cannot exclude pneumonia.", "Pneumonia") == -1.0
    assert label("Pneumonia cannot be excluded.", "Pneumonia") == -1.0
    assert label("No new effusion.", "Pleural Effusion") == -1.0


def test_post_negation_uncertainty() -> None:
    assert label("Possible right lower lobe pneumonia.", "Pneumonia") == -1.0
    assert label("Opacity, likely atelectasis.", "Atelectasis") == -1.0
    assert label("Opacity, likely atelectasis.", "Lung Opacity") == 1.0


def test_list_negation_covers_every_item() -> None:
    report = label_report("No effusion, pneumothorax, or consolidation.")
    values = report.as_dict()
    assert values["Pleural Effusion"] == 0.0
    assert values["Pneumothorax"] == 0.0
    assert values["Consolidation"] == 0.0


def test_negation_does_not_cross_clause_boundary() -> None:
    values = label_report("No pneumothorax, but there is a small right pleural effusion.").as_dict()
    assert values["Pneumothorax"] == 0.0
    assert values["Pleural Effusion"] == 1.0


def test_pseudo_trigger_does_not_negate() -> None:
    assert label("No change in the left pleural effusion.", "Pleural Effusion") == 1.0


def test_neutral_forms_need_a_qualifier() -> None:
    assert label("Normal heart size.", "Cardiomegaly") == 0.0
    assert label("The heart is not enlarged.", "Cardiomegaly") == 0.0
    assert label("The heart is enlarged.", "Cardiomegaly") == 1.0
    assert label("Heart size is mildly enlarged.", "Cardiomegaly") == 1.0
    assert label("Heart size and pulmonary vascularity are within normal limits.", "Cardiomegaly") == 0.0
    # CheXpert reads a stable silhouette as uncertain.
    assert label("Stable cardiomediastinal silhouette.", "Enlarged Cardiomediastinum") == -1.0
    # A bare organ word is anatomy, not a finding.
    assert is_blank(label("Pacemaker leads project over the heart.", "Cardiomegaly"))


def test_clear_lungs_negate_lung_opacity() -> None:
    assert label("The lungs are clear.", "Lung Opacity") == 0.0
    assert label("Clear lungs.", "Lung Opacity") == 0.0


def test_chf_adds_uncertain_cardiomegaly() -> None:
    values = label_report("Findings consistent with CHF.").as_dict()
    assert values["Edema"] == 1.0
    assert values["Cardiomegaly"] == -1.0
    # A positive cardiomegaly still wins over the chf-derived uncertainty.
    assert label("Cardiomegaly with congestive heart failure.", "Cardiomegaly") == 1.0


def test_unmention_pericardial_effusion() -> None:
    values = label_report("Small pericardial effusion.").as_dict()
    assert is_blank(values["Pleural Effusion"])
    # Still a finding: it cancels No Finding.
    assert is_blank(values["No Finding"])


def test_no_finding_rule() -> None:
    normal = label_report("Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.")
    assert normal.as_dict()["No Finding"] == 1.0
    # Support devices do not cancel No Finding; uncertain findings and "other findings" do.
    assert label("Left chest wall pacemaker. Lungs are clear.", "No Finding") == 1.0
    assert label("Left chest wall pacemaker.", "Support Devices") == 1.0
    assert is_blank(label("Possible pneumonia.", "No Finding"))
    assert is_blank(label("Emphysema. No pneumothorax.", "No Finding"))
    assert is_blank(label("Small left pleural effusion.", "No Finding"))


def test_aggregation_order() -> None:
    def m(certainty: str) -> Mention:
        return Mention("pleural_effusion", "Pleural Effusion", 0, 8, "effusion", certainty)  # type: ignore[arg-type]

    idx = CHEXPERT_CATEGORIES.index("Pleural Effusion")
    assert aggregate([m("negative"), m("uncertain")])[idx] == -1.0
    assert aggregate([m("negative"), m("positive")])[idx] == 1.0
    assert aggregate([m("uncertain"), m("positive")])[idx] == 1.0
    assert aggregate([m("negative")])[idx] == 0.0
    assert is_blank(aggregate([])[idx])


def test_laterality_and_location() -> None:
    by_concept = {m.category: m for m in extract_mentions("Small left pleural effusion. Right lower lobe opacity.")}
    assert by_concept["Pleural Effusion"].laterality == "left"
    opacity = by_concept["Lung Opacity"]
    assert opacity.laterality == "right"
    assert opacity.location == "right_lower_lobe"
    bilateral = [m for m in extract_mentions("Bibasilar atelectasis.") if m.category == "Atelectasis"]
    assert bilateral[0].laterality == "bilateral"


def test_spans_index_the_given_text() -> None:
    text = "FINDINGS:\n  Heart size is normal.There is a small RIGHT pleural effusion.\n\nIMPRESSION: 1. Effusion. 2. No pneumothorax."
    mentions = extract_mentions(text)
    assert mentions, "expected mentions"
    for mention in mentions:
        assert text[mention.start : mention.end] == mention.text
        assert mention.sentence_start <= mention.start < mention.end <= mention.sentence_end
    sections = {m.section for m in mentions if m.category == "Pleural Effusion"}
    assert sections == {"findings", "impression"}
    effusion = next(m for m in mentions if m.category == "Pleural Effusion")
    assert effusion.laterality == "right"


def test_indication_section_is_not_labelled() -> None:
    text = "INDICATION: Rule out pneumonia.\nFINDINGS: The lungs are clear."
    assert is_blank(label(text, "Pneumonia"))


def test_label_reports_batch_matches_single() -> None:
    texts = ["No pneumothorax.", "Mild cardiomegaly."]
    batch = label_reports(texts)
    assert all(isinstance(r, LabeledReport) for r in batch)
    for text, result in zip(texts, batch, strict=True):
        single = label_report(text)
        assert [str(v) for v in single.labels] == [str(v) for v in result.labels]
    assert len(batch[0].labels) == len(CHEXPERT_CATEGORIES)


def _run_label(argv: list[str]) -> int:
    """Run ``mlip-data label`` through its own subparser (the dispatcher also loads siblings)."""
    import argparse

    from mlip_fed.cli import data_label

    parser = argparse.ArgumentParser(prog="mlip-data")
    data_label.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["label", *argv])
    return int(args.func(args) or 0)


def _write_reports(path, rows: list[dict[str, str]]) -> None:  # noqa: ANN001
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_cli_writes_chexpert_columns(tmp_path) -> None:  # noqa: ANN001
    reports = tmp_path / "reports.csv"
    _write_reports(
        reports,
        [
            {"uid": "1", "findings": "Small left pleural effusion.", "impression": "No pneumothorax."},
            {"uid": "2", "findings": "The lungs are clear.", "impression": "Cannot exclude pneumonia."},
        ],
    )
    out = tmp_path / "labels.csv"
    rc = _run_label(["--reports", str(reports), "--text-columns", "findings,impression", "--out", str(out)])
    assert rc == 0
    with out.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["Reports", *CHEXPERT_CATEGORIES]
    first = dict(zip(rows[0], rows[1], strict=True))
    assert "Small left pleural effusion." in first["Reports"] and "No pneumothorax." in first["Reports"]
    assert first["Pleural Effusion"] == "1.0"
    assert first["Pneumothorax"] == "0.0"
    assert first["Edema"] == ""
    second = dict(zip(rows[0], rows[2], strict=True))
    assert second["Pneumonia"] == "-1.0"


def test_cli_missing_column_is_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    reports = tmp_path / "reports.csv"
    _write_reports(reports, [{"uid": "1", "findings": "No effusion."}])
    out = tmp_path / "o.csv"
    with pytest.raises(ValueError, match="impression"):
        _run_label(["--reports", str(reports), "--text-columns", "findings,impression", "--out", str(out)])
    assert not out.exists()


def test_cli_missing_file_is_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        _run_label(["--reports", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o.csv")])


@pytest.mark.parametrize(
    ("text", "category", "expected"),
    [
        ("Heart size is at the upper limits of normal.", "Cardiomegaly", 0.0),
        ("Borderline cardiomegaly.", "Cardiomegaly", 1.0),
        ("Interval resolution of the left pleural effusion.", "Pleural Effusion", 0.0),
        ("Atelectasis versus pneumonia.", "Pneumonia", -1.0),
        ("Lungs are clear without focal airspace disease, pleural effusion or pneumothorax.", "Pneumothorax", 0.0),
    ],
)
def test_radiology_phrasings(text: str, category: str, expected: float) -> None:
    assert label(text, category) == expected
