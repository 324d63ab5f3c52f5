"""Long work shows a progress bar on a terminal and nothing in a log file or pipe."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_features import FakeEncoder, ToyCXR

from mlip_fed.data.dataset import validate_records
from mlip_fed.data.records import StudyRecord
from mlip_fed.eval.features import extract_features


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _records(n: int) -> list[StudyRecord]:
    return [
        StudyRecord(
            study_id=f"s{i}",
            patient_id=f"p{i}",
            image_path=Path(f"/nowhere/{i}.png"),
            report="No acute findings.",
            split="train",
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("stream, shown", [(_Terminal(), True), (io.StringIO(), False)])
def test_decoding_and_feature_extraction_bars_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, stream: io.StringIO, shown: bool
) -> None:
    monkeypatch.setattr(sys, "stderr", stream)
    kept, report = validate_records(_records(5), reader=lambda path: np.zeros((4, 4)), progress=True)
    assert len(kept) == 5 and report.loaded == 5
    features = extract_features(FakeEncoder(), ToyCXR(6), 2, torch.device("cpu"), progress=True)
    assert features["pooled"].shape[0] == 6
    text = stream.getvalue()
    assert ("decoding" in text and "5/5" in text and "features" in text) is shown, text
    assert shown or text == ""


def test_no_bar_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    validate_records(_records(3), reader=lambda path: np.zeros((4, 4)))
    extract_features(FakeEncoder(), ToyCXR(4), 2, torch.device("cpu"))
    assert stream.getvalue() == ""
