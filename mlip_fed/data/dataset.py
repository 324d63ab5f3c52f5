"""Torch dataset of image–report pairs that survives a corrupt image mid-epoch.

A site's archive always holds a few files that pass the manifest check but fail to decode (a
truncated copy, a DICOM with an unsupported codec). Crashing a multi-hour federated round for one
image is worse than dropping it, so ``__getitem__`` returns ``None`` for such a record, counts it
once in the dataset's ``SkipReport`` and :func:`collate_skipping_none` leaves it out of the batch.

The deterministic head of each view's MONAI pipeline (channel-first, resize longest side, pad) does
not change between epochs, so its output is cached per record (within ``cache_bytes``): a federated
site trains on the same records every round, and at the CPU default the read + resize + pad was ~25 %
of the per-image cost (docs/federation.md, "Performance fixes"). Only the random tail (crop, rotation,
intensity jitter) runs every step; its random stream is untouched, so items are bit-identical.

Counting is exact in the main process (``num_workers=0``). With worker processes each worker
counts into its own copy of the dataset, which the main process never sees; run
:func:`validate_records` first (``mlip-data check`` does) when the count matters.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose, Randomizable
from torch.utils.data import Dataset, default_collate, get_worker_info

from mlip_fed.data.imageio import ImageDecodeError, read_image, read_label_mask
from mlip_fed.data.records import SkipReport, StudyRecord
from mlip_fed.data.shared_value import SharedInt
from mlip_fed.data.transforms import build_mask_transform, second_view_seed

if TYPE_CHECKING:
    from mlip_fed.data.device_augment import DeviceAugment

Transform = Callable[[np.ndarray], torch.Tensor]

#: Default budget of the per-record cache of deterministic pipeline heads (64² float32 is 16 KiB a view).
DEFAULT_CACHE_BYTES = 1 << 30


class _CachedView:
    """A view's transform split into its deterministic head (computed once per record) and its random tail.

    Only a MONAI ``Compose`` is split; any other callable runs whole every time. The tail's transforms are the
    pipeline's own objects, so ``set_random_state`` on the pipeline still seeds them.
    """

    def __init__(self, transform: Transform) -> None:
        self.transform = transform
        steps = list(transform.transforms) if isinstance(transform, Compose) else []
        split = 0
        while split < len(steps) and not _is_random(steps[split]) and not _is_lazy(steps[split]):
            split += 1
        self.head = self.tail = None
        if split and isinstance(transform, Compose) and not transform.lazy:
            states = [(step, step.R) for step in steps if isinstance(step, Randomizable)]
            self.head, self.tail = (
                Compose(part, map_items=transform.map_items, unpack_items=transform.unpack_items, lazy=False)
                for part in (steps[:split], steps[split:])
            )
            for step, state in states:  # a new Compose reseeds its members; keep the pipeline's own streams
                step.R = state
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, index: int, pixels: Callable[[], np.ndarray], budget: list[int]) -> torch.Tensor:
        with _untracked_meta():
            if self.head is None or self.tail is None:
                return self.transform(pixels())
            prepared = self.cache.get(index)
            if prepared is None:
                prepared = self.head(pixels())
                size = prepared.numel() * prepared.element_size()
                if size <= budget[0]:
                    budget[0] -= size
                    self.cache[index] = prepared
            return self.tail(prepared.clone())


@contextmanager
def _untracked_meta() -> Iterator[None]:
    """Run MONAI transforms on plain tensors: nothing here inverts a transform, so the MetaTensor bookkeeping
    (affine and history per step) is pure cost -- about two thirds of the random tail's time at 64², with the
    same pixels (``tests/test_transforms.py``). The pipeline's last step returns a plain tensor either way."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def decode_skip_reason(err: ImageDecodeError, kind: str = "image") -> str:
    """One countable reason per failure kind, e.g. ``image decode failed: truncated or corrupt``."""
    return f"{kind} decode failed: {err.reason}"


class ImageReportDataset(Dataset):
    """Items are dicts: ``image`` [1, S, S], optional ``image_view2``, ``report``, ``labels`` [14]
    (NaN = not mentioned), ``patient_id``, ``study_id`` and ``index`` (position in ``records``)."""

    def __init__(
        self,
        records: Sequence[StudyRecord],
        transform: Transform,
        second_view_transform: Transform | None = None,
        *,
        reader: Callable[[Any], np.ndarray] = read_image,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        device_augment: DeviceAugment | None = None,
    ) -> None:
        """``cache_bytes``: memory for the cached pipeline heads of both views (0 turns the cache off).

        ``device_augment``: the random part of the augmentation, left out of ``transform`` and applied by the trainer
        to this dataset's batches on the training device (``data.augment_on_device``). It rides on the dataset so
        every loader over it (the training loader, the DP Poisson loader) gets it and a loader over an eval dataset
        (evaluation, bank statistics) never does."""
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.device_augment = device_augment
        self.records = list(records)
        self.transform = transform
        self.second_view_transform = second_view_transform
        self.reader = reader
        self._views = [_CachedView(t) for t in (transform, second_view_transform) if t is not None]
        self._budget = [cache_bytes]
        self.skips = SkipReport(loaded=len(self.records))
        self._bad: set[int] = set()
        self._lock = threading.Lock()
        #: The seed of the last ``reseed`` (-1: never), shared with loader workers, and the (seed, worker) this
        #: process last seeded its transforms for.
        self._epoch_seed = SharedInt(-1)
        self._seeded_for: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        if index in self._bad:
            return None
        self._seed_worker_for_epoch()
        decoded: list[np.ndarray] = []

        def pixels() -> np.ndarray:  # read at most once per item, and not at all when every view is cached
            if not decoded:
                decoded.append(self.reader(record.image_path))
            return decoded[0]

        try:
            views = [view(index, pixels, self._budget) for view in self._views]
        except ImageDecodeError as err:
            self._mark_bad(index, err)
            return None
        item: dict[str, Any] = {
            "image": views[0],
            "report": record.report,
            "labels": torch.tensor(record.labels, dtype=torch.float32),
            "patient_id": record.patient_id,
            "study_id": record.study_id,
            "index": index,
        }
        if self.second_view_transform is not None:
            item["image_view2"] = views[1]
        return item

    def _mark_bad(self, index: int, err: ImageDecodeError, kind: str = "image") -> None:
        with self._lock:
            if index in self._bad:
                return
            self._bad.add(index)
            self.skips.loaded -= 1
            self.skips.skip(decode_skip_reason(err, kind), f"{err.path}" + (f" ({err.detail})" if err.detail else ""))

    def reseed(self, seed: int) -> None:
        """Reseed the random transforms (both views, differently); MONAI ``Compose`` supports it.

        Loader workers, persistent ones included, follow: each reseeds itself for (``seed``, its worker id) before
        its first item of the epoch (``_seed_worker_for_epoch``)."""
        self._seed_transforms(seed)
        self._epoch_seed.value = seed % (2**62)

    def _seed_transforms(self, seed: int) -> None:
        for transform, view_seed in ((self.transform, seed), (self.second_view_transform, second_view_seed(seed))):
            set_state = getattr(transform, "set_random_state", None)
            if set_state is not None:
                set_state(seed=view_seed % (2**32))

    def _seed_worker_for_epoch(self) -> None:
        """In a loader worker: reseed for (epoch seed, worker id) when the trainer has reseeded since this worker last
        did. Batches go to workers round-robin from each epoch's start, so every worker's stream, and therefore every
        item, is the same in an uninterrupted run and in one resumed mid-epoch, with or without persistent workers."""
        info = get_worker_info()
        seed = self._epoch_seed.value
        if info is None or seed < 0 or self._seeded_for == (seed, info.id):
            return
        seeded = worker_seed(seed, info.id)
        self._seed_transforms(seeded)
        # A worker's global generators start from the loader's per-iterator base seed, which a persistent worker
        # draws once and a fresh one every epoch; some transforms draw from them, so they follow the epoch too.
        random.seed(seeded)
        np.random.seed(seeded)
        torch.manual_seed(seeded)
        self._seeded_for = (seed, info.id)


class MaskedImageReportDataset(Dataset):
    """An eval :class:`ImageReportDataset` whose items also carry ``mask``: long [S, S] class labels.

    The mask gets the image's eval geometry (resize longest side, pad, centre crop) with nearest
    neighbour, so pixel (i, j) of ``mask`` labels pixel (i, j) of ``image``. A mask that fails to
    decode drops the item like a bad image, counted in the same ``skips``.
    """

    def __init__(self, dataset: ImageReportDataset, image_size: int) -> None:
        if _is_random(dataset.transform) or dataset.second_view_transform is not None:
            raise ValueError("masks need the deterministic eval transform: random crops would misalign image and mask")
        missing = [r.study_id for r in dataset.records if r.mask_path is None]
        if missing:
            raise ValueError(f"{len(missing)} record(s) have no mask_path, e.g. study {missing[0]}")
        self.dataset = dataset
        self.mask_transform = build_mask_transform(image_size)

    @property
    def records(self) -> list[StudyRecord]:
        return self.dataset.records

    @property
    def skips(self) -> SkipReport:
        return self.dataset.skips

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.dataset[index]
        if item is None:
            return None
        mask_path = self.dataset.records[index].mask_path
        try:
            labels = read_label_mask(mask_path)
        except ImageDecodeError as err:
            self.dataset._mark_bad(index, err, kind="mask")
            return None
        item["mask"] = self.mask_transform(labels.astype(np.float32))[0].round().long()
        return item


def with_masks(dataset: ImageReportDataset, image_size: int) -> MaskedImageReportDataset:
    """Add aligned segmentation masks to an eval dataset (SynthCXR writes one label PNG per study)."""
    return MaskedImageReportDataset(dataset, image_size)


def _is_random(transform: Any) -> bool:
    """True when any step draws random numbers (MONAI's ``Compose`` is itself ``Randomizable``)."""
    if isinstance(transform, Compose):
        return any(_is_random(t) for t in transform.transforms)
    return isinstance(transform, Randomizable)


def _is_lazy(transform: Any) -> bool:
    """MONAI lazy resampling defers work to a later step: such a step cannot end a cached head."""
    return bool(getattr(transform, "lazy", False))


def worker_seed(epoch_seed: int, worker_id: int) -> int:
    """The augmentation seed of loader worker ``worker_id`` in the epoch seeded ``epoch_seed`` (never the epoch seed
    itself, so worker 0 does not replay the stream the training process would use)."""
    return (epoch_seed * 1_000_003 + 7919 * (worker_id + 1)) % (2**32)


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: give each worker its own augmentation stream.

    Without it every worker holds an identical copy of the transforms' random state and the workers
    augment in lock-step. The seed comes from torch's per-worker seed, so ``torch.manual_seed`` in
    the main process still makes the whole run reproducible. Only this worker's transforms are seeded (the
    shared epoch seed is the training process's to set); once the trainer has reseeded the dataset for an epoch,
    each worker follows that seed instead (``ImageReportDataset._seed_worker_for_epoch``).
    """
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, ImageReportDataset):
        info.dataset._seed_transforms(info.seed % (2**32))


def collate_skipping_none(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Drop ``None`` items, then stack: tensors stack, strings become lists, ints a LongTensor.

    Returns ``None`` when every item in the batch was skipped; the training loop skips that step.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)


def validate_records(
    records: Sequence[StudyRecord], *, reader: Callable[[Any], np.ndarray] = read_image, progress: bool = False
) -> tuple[list[StudyRecord], SkipReport]:
    """Decode every image (and mask) once; keep the records that decode, count the rest by reason.

    ``progress``: a progress bar on a terminal (a MIMIC site decodes ~377k images); never in a log file or pipe.
    """
    from tqdm.auto import tqdm

    report = SkipReport()
    ok: list[StudyRecord] = []
    for record in tqdm(records, desc="decoding", unit="image", disable=None if progress else True):
        try:
            reader(record.image_path)
            if record.mask_path is not None:
                read_label_mask(record.mask_path)
        except ImageDecodeError as err:
            kind = "mask" if record.mask_path is not None and err.path == record.mask_path else "image"
            report.skip(decode_skip_reason(err, kind), f"{err.path}" + (f" ({err.detail})" if err.detail else ""))
            continue
        ok.append(record)
    report.loaded = len(ok)
    return ok, report
