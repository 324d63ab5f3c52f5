"""Split records into federated sites and train/test sets, always whole patients at a time.

A patient's studies are correlated (same anatomy, same devices, follow-up reports that cite the
previous one). Putting one patient on two sites, or in train and test, leaks exactly the signal the
evaluation is meant to measure, so every function here assigns patients, and a record follows
its patient. Patients are sorted by id before the seeded shuffle, so the result depends only on
the set of records and the seed, not on the order the reader produced them in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from mlip_fed.data.records import StudyRecord
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

#: How many Dirichlet draws :func:`partition_dirichlet` tries before giving up on filling every site.
MAX_DIRICHLET_DRAWS = 200


def _patients(records: Sequence[StudyRecord]) -> list[str]:
    if not records:
        raise ValueError("cannot partition an empty list of records")
    return sorted({record.patient_id for record in records})


def _assign(records: Sequence[StudyRecord], site_of: dict[str, int], num_sites: int) -> list[list[StudyRecord]]:
    sites: list[list[StudyRecord]] = [[] for _ in range(num_sites)]
    for record in records:
        sites[site_of[record.patient_id]].append(record)
    return sites


def _check_sites(num_sites: int, num_patients: int) -> None:
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if num_sites > num_patients:
        raise ValueError(
            f"num_sites={num_sites} exceeds the {num_patients} patients available: some site would be empty"
        )


def partition_iid(records: Sequence[StudyRecord], num_sites: int, seed: int) -> list[list[StudyRecord]]:
    """Shuffle patients and deal them round-robin: sites differ in patient count by at most one."""
    patients = _patients(records)
    _check_sites(num_sites, len(patients))
    order = np.random.default_rng(seed).permutation(len(patients))
    site_of = {patients[p]: rank % num_sites for rank, p in enumerate(order)}
    return _assign(records, site_of, num_sites)


def dominant_category(records: Sequence[StudyRecord], label_index: Sequence[int] | None = None) -> dict[str, int]:
    """Patient → position in ``label_index`` of their most frequent positive label (1.0 only).

    Counts are over all the patient's studies; ties go to the category listed first; a patient with
    no positive among ``label_index`` gets the extra class ``len(label_index)`` ("none"). Uncertain
    (-1) and blank labels never count as positive.
    """
    columns = list(range(len(CHEXPERT_CATEGORIES))) if label_index is None else list(label_index)
    if not columns or any(not 0 <= c < len(CHEXPERT_CATEGORIES) for c in columns):
        raise ValueError(
            f"label_index must be a non-empty list of indices in [0, {len(CHEXPERT_CATEGORIES)}), got {columns}"
        )
    counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(columns), dtype=np.int64))
    for record in records:
        counts[record.patient_id] += np.array([record.labels[c] == 1.0 for c in columns], dtype=np.int64)
    return {patient: int(np.argmax(total)) if total.max() > 0 else len(columns) for patient, total in counts.items()}


def partition_dirichlet(
    records: Sequence[StudyRecord],
    num_sites: int,
    alpha: float,
    seed: int,
    *,
    label_index: Sequence[int] | None = None,
    min_patients_per_site: int = 1,
) -> list[list[StudyRecord]]:
    """Label-skewed sites: each patient class is spread over sites by proportions ~ Dirichlet(alpha).

    A patient's class is their dominant positive category (:func:`dominant_category`). Small
    ``alpha`` (0.1) concentrates each class on few sites; large ``alpha`` (100) approaches IID. Draws
    that leave a site with fewer than ``min_patients_per_site`` patients are redrawn from the same
    seeded generator, so the result stays deterministic.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    patients = _patients(records)
    _check_sites(num_sites, len(patients))
    if min_patients_per_site * num_sites > len(patients):
        raise ValueError(
            f"min_patients_per_site={min_patients_per_site} x {num_sites} sites exceeds {len(patients)} patients"
        )
    classes = dominant_category(records, label_index)
    by_class: dict[int, list[str]] = defaultdict(list)
    for patient in patients:
        by_class[classes[patient]].append(patient)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_DRAWS):
        site_of: dict[str, int] = {}
        for cls in sorted(by_class):
            members = [by_class[cls][i] for i in rng.permutation(len(by_class[cls]))]
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
            for site, chunk in enumerate(np.split(np.array(members, dtype=object), cuts)):
                site_of.update(dict.fromkeys(chunk.tolist(), site))
        sizes = np.bincount(list(site_of.values()), minlength=num_sites)
        if sizes.min() >= min_patients_per_site:
            return _assign(records, site_of, num_sites)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DIRICHLET_DRAWS} gave every one of {num_sites} sites "
        f">= {min_patients_per_site} patients; raise alpha or lower num_sites"
    )


def partition_by_source(records: Sequence[StudyRecord], key: str = "site_id") -> list[list[StudyRecord]]:
    """One site per distinct value of ``record.<key>``, in sorted order of that value.

    Real hospitals are their own sites; this keeps them so. A record without the key, or a patient id
    that appears under two values, is an error rather than a guess.
    """
    if not records:
        raise ValueError("cannot partition an empty list of records")
    groups: dict[str, list[StudyRecord]] = defaultdict(list)
    source_of: dict[str, str] = {}
    for record in records:
        if not hasattr(record, key):
            raise ValueError(f"StudyRecord has no field {key!r}")
        value = getattr(record, key)
        if value is None or value == "":
            raise ValueError(f"study {record.study_id} (patient {record.patient_id}) has no {key}")
        value = str(value)
        previous = source_of.setdefault(record.patient_id, value)
        if previous != value:
            raise ValueError(f"patient {record.patient_id} appears under {key}={previous!r} and {key}={value!r}")
        groups[value].append(record)
    return [groups[value] for value in sorted(groups)]


def split_patients(
    records: Sequence[StudyRecord], test_fraction: float, seed: int
) -> tuple[list[StudyRecord], list[StudyRecord]]:
    """(train, test) with ``round(test_fraction * patients)`` patients in test, at least one in each."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    patients = _patients(records)
    if len(patients) < 2:
        raise ValueError(f"need >= 2 patients to split train/test, got {len(patients)}")
    n_test = min(max(1, round(test_fraction * len(patients))), len(patients) - 1)
    order = np.random.default_rng(seed).permutation(len(patients))
    test_patients = {patients[i] for i in order[:n_test]}
    train = [r for r in records if r.patient_id not in test_patients]
    test = [r for r in records if r.patient_id in test_patients]
    return train, test


def label_skew(sites: Sequence[Sequence[StudyRecord]], label_index: Sequence[int] | None = None) -> float:
    """Mean over sites of KL(site's patient-class distribution || pooled distribution), in nats.

    0 for identical sites; grows as sites specialise. Used to check and report how non-IID a
    partition is.
    """
    pooled = [record for site in sites for record in site]
    classes = dominant_category(pooled, label_index)
    num_classes = (len(CHEXPERT_CATEGORIES) if label_index is None else len(label_index)) + 1
    overall = np.bincount(list(classes.values()), minlength=num_classes).astype(float)
    overall /= overall.sum()
    divergences = []
    for site in sites:
        patients = {record.patient_id for record in site}
        if not patients:
            continue
        counts = np.bincount([classes[p] for p in patients], minlength=num_classes).astype(float)
        share = counts / counts.sum()
        mask = share > 0
        divergences.append(float(np.sum(share[mask] * np.log(share[mask] / overall[mask]))))
    return float(np.mean(divergences))
