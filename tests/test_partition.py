"""Patient-level partitioning: no patient on two sites or in two splits, seeded, skew grows as alpha shrinks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mlip_fed.data.partition import (
    dominant_category,
    label_skew,
    partition_by_source,
    partition_dirichlet,
    partition_iid,
    split_patients,
)
from mlip_fed.data.records import StudyRecord

CATEGORIES = (2, 5, 8, 10, 9)  # Cardiomegaly, Edema, Atelectasis, Pleural Effusion, Pneumothorax


def _records(num_patients: int = 300, seed: int = 0) -> list[StudyRecord]:
    """1-3 studies per patient; each patient has one finding that recurs in their studies."""
    rng = np.random.default_rng(seed)
    records = []
    for p in range(num_patients):
        finding = CATEGORIES[p % len(CATEGORIES)]
        for s in range(int(rng.integers(1, 4))):
            labels = [math.nan] * 14
            labels[finding] = 1.0 if s == 0 or rng.random() < 0.7 else -1.0
            records.append(
                StudyRecord(
                    image_path=Path(f"/x/{p}_{s}.png"),
                    report="r",
                    patient_id=f"pat{p:04d}",
                    study_id=f"pat{p:04d}_s{s}",
                    site_id=f"hospital{p % 3}",
                    labels=tuple(labels),
                )
            )
    return records


def _patients(site: list[StudyRecord]) -> set[str]:
    return {r.patient_id for r in site}


def _assert_patient_disjoint(sites: list[list[StudyRecord]], records: list[StudyRecord]) -> None:
    seen: set[str] = set()
    for site in sites:
        assert site, "no site may be empty"
        assert not (_patients(site) & seen)
        seen |= _patients(site)
    assert sorted(r.study_id for site in sites for r in site) == sorted(r.study_id for r in records)


def test_iid_is_patient_disjoint_balanced_and_seeded() -> None:
    records = _records()
    sites = partition_iid(records, 4, seed=1)
    _assert_patient_disjoint(sites, records)
    counts = [len(_patients(s)) for s in sites]
    assert max(counts) - min(counts) <= 1
    again = partition_iid(list(reversed(records)), 4, seed=1)  # input order must not matter
    assert [_patients(s) for s in again] == [_patients(s) for s in sites]
    assert [_patients(s) for s in partition_iid(records, 4, seed=2)] != [_patients(s) for s in sites]
    with pytest.raises(ValueError, match="exceeds"):
        partition_iid(records[:3], 10, seed=0)


def test_dominant_category_counts_positives_only() -> None:
    def rec(pid: str, positives: dict[int, float]) -> StudyRecord:
        labels = [math.nan] * 14
        for i, v in positives.items():
            labels[i] = v
        return StudyRecord(Path("/x.png"), "r", pid, pid + str(len(positives)), labels=tuple(labels))

    classes = dominant_category(
        [rec("a", {2: 1.0}), rec("a", {5: 1.0, 2: 1.0}), rec("b", {5: -1.0}), rec("c", {8: 1.0, 10: 1.0})]
    )
    assert classes == {"a": 2, "b": 14, "c": 8}  # b has no positive; c's tie goes to the first category
    assert dominant_category([rec("a", {10: 1.0})], label_index=[10, 2]) == {"a": 0}


def test_dirichlet_small_alpha_skews_more_than_large_alpha() -> None:
    records = _records(400)
    skews = {}
    for alpha in (0.1, 100.0):
        values = []
        for seed in range(3):
            sites = partition_dirichlet(records, 4, alpha, seed=seed)
            _assert_patient_disjoint(sites, records)
            values.append(label_skew(sites))
        skews[alpha] = float(np.mean(values))
    assert skews[0.1] > 0.3 > 0.05 > skews[100.0]
    first = partition_dirichlet(records, 4, 0.5, seed=7)
    assert [_patients(s) for s in partition_dirichlet(records, 4, 0.5, seed=7)] == [_patients(s) for s in first]
    assert label_skew(partition_iid(records, 4, seed=0)) < 0.05
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(records, 4, 0.0, seed=0)


def test_partition_by_source_and_conflicts() -> None:
    records = _records(30)
    sites = partition_by_source(records)
    assert [{r.site_id for r in s} for s in sites] == [{"hospital0"}, {"hospital1"}, {"hospital2"}]
    _assert_patient_disjoint(sites, records)
    moved = StudyRecord(Path("/y.png"), "r", records[0].patient_id, "extra", site_id="hospital9")
    with pytest.raises(ValueError, match="appears under site_id="):
        partition_by_source([*records, moved])
    with pytest.raises(ValueError, match="has no site_id"):
        partition_by_source([StudyRecord(Path("/z.png"), "r", "p", "s")])


def test_split_patients_keeps_patients_whole() -> None:
    records = _records(100)
    train, test = split_patients(records, 0.2, seed=3)
    assert not (_patients(train) & _patients(test))
    assert len(_patients(test)) == 20 and len(train) + len(test) == len(records)
    assert split_patients(records, 0.2, seed=3) == (train, test)
    with pytest.raises(ValueError, match="test_fraction"):
        split_patients(records, 1.0, seed=0)
