"""The hot-loop caches change nothing: collated batches equal a fresh ``padding=True`` tokenisation, and
dataset items equal running the whole MONAI pipeline, epoch after epoch, while the cache is really used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dataset_items

from mlip_fed.data.collate import MLIPCollator, token_word_ids
from mlip_fed.data.dataset import ImageReportDataset
from mlip_fed.data.records import StudyRecord
from mlip_fed.data.tokenizer import load_tokenizer
from mlip_fed.data.transforms import build_transforms, build_view_pair

REPORTS = [
    "FINDINGS: Small left pleural effusion. No pneumothorax. IMPRESSION: Left effusion, mild cardiomegaly.",
    "No acute cardiopulmonary process. Heart size is normal.",
    "Right lower lobe consolidation concerning for pneumonia. Possible small right pleural effusion.",
    "No acute cardiopulmonary process. Heart size is normal.",  # a repeat: served from the cache
]


def _items() -> list[dict]:
    return dataset_items(len(REPORTS), reports=REPORTS, size=8, second_view=False, positives=False)


@pytest.mark.parametrize("max_length", [128, 12])
def test_cached_tokenisation_equals_batch_tokenisation(max_length: int) -> None:
    tokenizer = load_tokenizer()
    collator = MLIPCollator(tokenizer, max_length=max_length, swap_prob=1.0, seed=0)
    for epoch in range(2):
        collator.set_epoch(epoch)
        batch = collator(_items())
        ref = tokenizer(REPORTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        assert torch.equal(batch["input_ids"], ref["input_ids"])
        assert torch.equal(batch["attention_mask"], ref["attention_mask"])
        assert torch.equal(batch["word_ids"], token_word_ids(tokenizer, ref["input_ids"], ref["attention_mask"]))
        # spans over L word slots (the text tower's fixed word axis: no host read of the word count per step)
        assert batch["entity_words"].shape[2] == batch["word_ids"].shape[1] > int(batch["word_ids"].max())
        # every entity word is a real word of its row
        for row in range(len(REPORTS)):
            words = batch["entity_words"][row].any(dim=0).nonzero().flatten()
            assert set(words.tolist()) <= set(batch["word_ids"][row][batch["word_ids"][row] >= 0].tolist())
        swapped = [collator.tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["swap_input_ids"]]
        assert len(swapped) == len(REPORTS)
    assert len(collator._encodings) >= 3  # three distinct reports, plus counterfactual texts
    assert batch["entity_mask"][0].sum() > 0  # the effusion report has knowledge entities


def _records(tmp_path: Path, n: int) -> list[StudyRecord]:
    from PIL import Image

    records = []
    rng = np.random.default_rng(0)
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(path)
        records.append(StudyRecord(image_path=path, report="report", patient_id=f"p{i}", study_id=f"s{i}"))
    return records


def test_cached_pipeline_heads_give_identical_items(tmp_path: Path) -> None:
    records = _records(tmp_path, 3)
    reads: list[Path] = []

    def counting_reader(path: Path) -> np.ndarray:
        from mlip_fed.data.imageio import read_image

        reads.append(path)
        return read_image(path)

    cached = ImageReportDataset(records, *build_view_pair(16, seed=5), reader=counting_reader)
    plain = ImageReportDataset(records, *build_view_pair(16, seed=5), cache_bytes=0)
    for _ in range(3):  # epochs: the random tail keeps drawing from the same streams
        for i in range(len(records)):
            a, b = cached[i], plain[i]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_view2"], b["image_view2"])
    assert len(reads) == len(records)  # decoded once per record, then served from the cache
    first = cached[0]["image"]
    assert not torch.equal(first, cached[0]["image"])  # still augmented afresh each time

    eval_cached = ImageReportDataset(records, build_transforms(16, train=False))
    eval_plain = ImageReportDataset(records, build_transforms(16, train=False), cache_bytes=0)
    for i in range(len(records)):
        assert torch.equal(eval_cached[i]["image"], eval_plain[i]["image"])
        eval_cached[i]["image"].add_(1.0)  # a caller mutating an item must not corrupt the cache
        assert torch.equal(eval_cached[i]["image"], eval_plain[i]["image"])


def test_cache_budget_is_respected(tmp_path: Path) -> None:
    records = _records(tmp_path, 4)
    one_view = 16 * 16 * 4  # a cached [1, 16, 16] float32 head
    dataset = ImageReportDataset(records, build_transforms(16, train=False), cache_bytes=2 * one_view)
    for i in range(len(records)):
        dataset[i]
    assert len(dataset._views[0].cache) == 2
    with pytest.raises(ValueError, match="cache_bytes"):
        ImageReportDataset(records, build_transforms(16, train=False), cache_bytes=-1)


def test_items_are_the_pixels_of_the_metadata_tracking_pipeline(tmp_path: Path) -> None:
    """The dataset runs MONAI without MetaTensor bookkeeping (for speed): same seeds, same pixels as with it."""
    from monai.data import get_track_meta

    from mlip_fed.data.imageio import read_image

    records = _records(tmp_path, 3)
    dataset = ImageReportDataset(records, *build_view_pair(16, seed=7), cache_bytes=0)
    reference = build_view_pair(16, seed=7)
    assert get_track_meta()
    for _ in range(2):
        for i, record in enumerate(records):
            item = dataset[i]
            expected = [view(read_image(record.image_path)) for view in reference]  # MONAI's default: tracked
            assert torch.equal(item["image"], expected[0]) and torch.equal(item["image_view2"], expected[1])
            assert type(item["image"]) is torch.Tensor
    assert get_track_meta()  # restored for the rest of the process
