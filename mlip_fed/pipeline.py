"""Builds the pieces of a run from an ``ExperimentConfig``: data, model, loaders, trainer.

``mlip-pretrain``, ``mlip-eval``, the benchmarks and every Flower site call these same builders,
so a central run and a federated site differ only in which records they load.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from mlip_fed.config import DataConfig, ExperimentConfig
from mlip_fed.data.dataset import ImageReportDataset
from mlip_fed.data.records import SkipReport, StudyRecord
from mlip_fed.data.transforms import build_device_head, build_transforms, build_view_pair
from mlip_fed.model.config import ModelConfig


@dataclass
class SiteData:
    """One site's (or the pooled) train and test records, with what was skipped loading them."""

    train: list[StudyRecord]
    test: list[StudyRecord]
    skips: SkipReport
    name: str


# ---------------------------------------------------------------------------- records
def synthetic_manifests(data: DataConfig) -> list[Path]:
    """Generate the SynthCXR federation once (under a lock: sites may start together), return its manifests."""
    from mlip_fed.data.synthetic.write import generate_federation

    root = Path(data.root)
    syn = data.synthetic
    spec = {
        "num_sites": syn.num_sites,
        "studies_per_site": syn.studies_per_site,
        "image_size": data.image_size,
        "seed": syn.seed,
        "dirichlet_alpha": syn.dirichlet_alpha,
        "test_fraction": syn.test_fraction,
    }
    if syn.difficulty != "standard":  # standard keeps the marker it had before tiers existed (no regeneration)
        spec["difficulty"] = syn.difficulty
    marker = root / "synthcxr.json"
    with _file_lock(root / ".generate.lock"):
        if marker.is_file() and json.loads(marker.read_text()) == spec:
            return [root / f"site_{k}" / "manifest.csv" for k in range(syn.num_sites)]
        manifests = generate_federation(
            root,
            num_sites=syn.num_sites,
            studies_per_site=syn.studies_per_site,
            image_size=data.image_size,
            seed=syn.seed,
            dirichlet_alpha=syn.dirichlet_alpha,
            test_fraction=syn.test_fraction,
            difficulty=syn.difficulty,
        )
        from mlip_fed.io import atomic_write_json

        atomic_write_json(marker, spec)
    return list(manifests)


def load_records(data: DataConfig, site_index: int | None = None) -> SiteData:
    """Records of one synthetic site (``site_index``) or of everything the data config names (pooled)."""
    if data.source == "synthetic":
        manifests = synthetic_manifests(data)
        if site_index is not None:
            if not 0 <= site_index < len(manifests):
                raise ValueError(f"site index {site_index} out of range: the federation has {len(manifests)} sites")
            manifests = [manifests[site_index]]
        return records_from_manifests(manifests, name="pooled" if site_index is None else f"site_{site_index}")
    if data.source == "manifest":
        assert data.manifest is not None
        return records_from_manifests([Path(data.manifest)], name=Path(data.manifest).parent.name or "site")
    if data.source == "mimic":
        from mlip_fed.data.mimic import read_mimic

        records, skips = read_mimic(Path(data.root), reports_root=data.reports_root)
        return _split(records, skips, "mimic")
    raise ValueError(f"data.source={data.source!r} has no pretraining reader (CheXpert has no reports)")


def records_from_manifests(manifests: Sequence[Path], name: str) -> SiteData:
    from mlip_fed.data.manifest import read_manifest

    records: list[StudyRecord] = []
    skips = SkipReport()
    for manifest in manifests:
        found, report = read_manifest(manifest)
        records.extend(found)
        skips.merge(report)
    return _split(records, skips, name)


def _split(records: list[StudyRecord], skips: SkipReport, name: str) -> SiteData:
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split != "train"]
    if not train:
        raise ValueError(f"{name}: no training records loaded\n{skips.summary()}")
    return SiteData(train=train, test=test, skips=skips, name=name)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- datasets and loaders
def train_dataset(records: Sequence[StudyRecord], cfg: ExperimentConfig) -> ImageReportDataset:
    """The training dataset: MONAI augmentation per study, or with ``data.augment_on_device`` only the cheap
    deterministic head, the random part left to the trainer on the batch (``dataset.device_augment``)."""
    itc = cfg.model.objectives.global_itc
    two_views = itc.enabled and itc.divergence  # only the divergence encoder reads a second view
    if cfg.data.augment_on_device:
        from mlip_fed.data.device_augment import DeviceAugment

        # One image per study: the trainer draws the second view from it on the device.
        augment = DeviceAugment(second_view=two_views)
        return ImageReportDataset(records, build_device_head(cfg.data.image_size), device_augment=augment)
    first, second = build_view_pair(cfg.data.image_size, seed=cfg.seed)
    if not two_views:
        return ImageReportDataset(records, first)
    return ImageReportDataset(records, first, second)


def eval_dataset(records: Sequence[StudyRecord], cfg: ExperimentConfig, with_masks: bool = False) -> Any:
    dataset = ImageReportDataset(records, build_transforms(cfg.data.image_size, train=False, seed=cfg.seed))
    if with_masks:
        from mlip_fed.data.dataset import with_masks as add_masks

        return add_masks(dataset, cfg.data.image_size)
    return dataset


def loader_options(cfg: ExperimentConfig, num_workers: int | None = None) -> dict[str, Any]:
    """``DataLoader`` keyword arguments of the data path (``data.*``), shared by the training, DP and bank-statistics
    loaders: workers (each seeded by ``seed_worker``, and per epoch by the dataset itself), persistence and prefetch
    when there are workers, page-locked memory when the batches go to a GPU."""
    workers = cfg.data.num_workers if num_workers is None else num_workers
    pin = cfg.data.pin_memory
    if pin is None:
        pin = cfg.train.device != "cpu" and torch.cuda.is_available()
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": pin}
    if workers > 0:
        from mlip_fed.data.dataset import seed_worker

        options.update(
            persistent_workers=cfg.data.persistent_workers,
            prefetch_factor=cfg.data.prefetch_factor,
            worker_init_fn=seed_worker,
        )
    return options


def train_loader(dataset: ImageReportDataset, collator: Any, cfg: ExperimentConfig) -> DataLoader:
    """The shuffled training loader; the trainer reseeds ``loader.sampler.generator`` every epoch.

    With workers the sampler gets a generator of its own: a DataLoader iterator draws its workers' base seed from
    the loader's generator when it is created, which persistent workers do once and fresh ones every epoch, so a
    shared generator would shuffle an epoch differently in a resumed run. (Workers seed their augmentation from the
    epoch seed instead, ``ImageReportDataset.reseed``.) Without workers the loader is as it always was."""
    generator = torch.Generator().manual_seed(cfg.train.seed)
    options = loader_options(cfg)
    if options["num_workers"] > 0:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.train.seed))
        options.update(sampler=sampler)
    else:
        options.update(shuffle=True)
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        drop_last=len(dataset) > cfg.train.batch_size,
        collate_fn=collator,
        generator=generator,
        **options,
    )


def steps_per_epoch(num_records: int, cfg: ExperimentConfig) -> int:
    batches = num_records // cfg.train.batch_size if num_records > cfg.train.batch_size else 1
    return max(1, -(-batches // cfg.train.grad_accum_steps))


# ---------------------------------------------------------------------------- model and run plumbing
def configure_threads(cfg: ExperimentConfig) -> None:
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)


def build_tokenizer(model: ModelConfig) -> Any:
    """The text tower's tokenizer: the pretrained checkpoint's own, else the packaged WordPiece vocabulary."""
    from mlip_fed.data.tokenizer import load_tokenizer

    if model.text.checkpoint_dir:
        return load_tokenizer(model.text.checkpoint_dir, field="model.text.checkpoint_dir")
    return load_tokenizer(model.text.vocab_path, field="model.text.vocab_path")


def model_from_config(model: ModelConfig) -> Any:
    """``MLIPModel`` with its tokenizer built here and injected; seeded, so equal configs give equal weights."""
    from mlip_fed.model.mlip import MLIPModel

    return MLIPModel(model, build_tokenizer(model))


def build_model(cfg: ExperimentConfig) -> Any:
    """The MLIP model; identical initial weights wherever it is built with the same config (seeded)."""
    return model_from_config(cfg.model)


def build_collator(model: Any, cfg: ExperimentConfig) -> Any:
    from mlip_fed.data.collate import MLIPCollator

    objectives = cfg.model.objectives
    return MLIPCollator(
        model.tokenizer,
        model.kb,
        max_length=cfg.model.text.max_length,
        swap_prob=objectives.text_swap.prob if objectives.text_swap.enabled else 0.0,
        seed=cfg.seed,
        max_entities=objectives.local_alignment.max_entities,
        max_edits=objectives.text_swap.max_edits,
    )


def train_for_steps(cfg: ExperimentConfig, records: Sequence[StudyRecord]) -> tuple[Any, dict[str, Any]]:
    """A fresh model trained for exactly ``cfg.train.max_steps`` optimiser steps on ``records``, in memory.

    For references and comparisons that must spend the same number of steps whatever the dataset size
    (the supervised ceiling, the ablation rows); a run to keep uses ``mlip-pretrain``. Returns the model and
    what the run cost: seconds, steps, and the first and last epoch's mean loss parts.
    """
    import time

    from mlip_fed.train.trainer import LocalTrainer

    if cfg.train.max_steps is None:
        raise ValueError("train_for_steps needs train.max_steps")
    configure_threads(cfg)
    model = build_model(cfg)
    loader = train_loader(train_dataset(records, cfg), build_collator(model, cfg), cfg)
    trainer = LocalTrainer(model, cfg.train, total_steps=int(cfg.train.max_steps))
    start = time.perf_counter()
    epochs = []
    while not trainer.reached_max_steps():
        epochs.append(trainer.fit(loader, epochs=1).mean_parts)
    return model, {
        "train_seconds": time.perf_counter() - start,
        "steps": trainer.state.global_step,
        "first_epoch": epochs[0] if epochs else {},
        "last_epoch": epochs[-1] if epochs else {},
    }


def check_resumable(config_file: Path, cfg: ExperimentConfig) -> None:
    """Refuse to resume a checkpoint trained with another model or data: the result would be neither run."""
    if not config_file.is_file():
        return
    saved = json.loads(config_file.read_text())
    now = cfg.model_dump(mode="json")
    for section in ("model", "data"):
        if _with_new_defaults(section, saved.get(section)) != now[section]:
            raise ValueError(
                f"{config_file.parent}/checkpoint.pt was trained with a different `{section}` config; "
                f"use another output_dir or train.resume=false"
            )


def _with_new_defaults(section: str, saved: Any) -> Any:
    """A saved config section re-validated by today's schema: a field added since, at its default, is no change."""
    from pydantic import ValidationError

    schema = {"model": ModelConfig, "data": DataConfig}[section]
    try:
        return schema.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def evaluate_model(model: Any, data: SiteData, cfg: ExperimentConfig) -> Any:
    """Frozen-encoder evaluation on the test split (segmentation needs mask_path on every record)."""
    from mlip_fed.eval.report import evaluate_all

    eval_cfg = cfg.eval
    has_masks = eval_cfg.segmentation.enabled
    if has_masks:
        missing = [r.study_id for r in (*data.train, *data.test) if r.mask_path is None]
        if missing:
            raise ValueError(
                f"eval.segmentation.enabled=true but {len(missing)} studies have no mask_path (e.g. {missing[:3]}); "
                "set eval.segmentation.enabled=false"
            )
    eval_cfg = eval_cfg.model_copy(update={"max_length": cfg.model.text.max_length})
    train_ds = eval_dataset(data.train, cfg, with_masks=has_masks)
    test_ds = eval_dataset(data.test, cfg, with_masks=has_masks)
    return evaluate_all(model, model.tokenizer, train_ds, test_ds, eval_cfg, progress=True)  # bar on a terminal


def write_evaluation(result: Any, out_dir: Path, title: str) -> None:
    from mlip_fed.eval.report import write_json, write_markdown

    write_json(result, out_dir / "eval.json")
    write_markdown(result, out_dir / "eval.md", title=title)


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors do not fit the configured model; the message is one line naming the first ones."""


def state_dict_mismatch(expected: dict[str, Any], found: dict[str, Any], show: int = 3) -> str:
    """One-line summary of how ``found`` (a checkpoint) differs from ``expected`` (the model); "" if it fits.

    Checked before ``load_state_dict`` because torch reports shape mismatches as one multi-line
    RuntimeError listing every tensor, which buries which checkpoint and which config disagree.
    """
    shapes = [
        f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    parts = []
    for what, items in (
        ("tensors differ in shape (checkpoint vs model)", shapes),
        ("model tensors missing from the checkpoint", missing),
        ("checkpoint tensors the model lacks", unexpected),
    ):
        if items:
            more = f", ... {len(items) - show} more" if len(items) > show else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:show])}{more}")
    return "; ".join(parts)


def load_model_weights(model: Any, checkpoint: Path) -> None:
    """Load encoder weights from a trainer checkpoint (``model``) or a federation one (``weights``)."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {checkpoint}: {err}") from err
    state = saved.get("model") or saved.get("weights") if isinstance(saved, dict) else None
    if state is None:
        raise ValueError(f"checkpoint {checkpoint} holds neither 'model' nor 'weights'")
    state = {k: torch.as_tensor(v) for k, v in state.items()}
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise CheckpointMismatch(f"checkpoint {checkpoint} does not match the configured model: {problems}")
    model.load_state_dict(state)
