"""The data path with loader workers: the same batches whatever the workers' lifetime, exact mid-epoch resume,
per-epoch settings reaching persistent workers, and the DP / bank-statistics loaders with workers."""

from __future__ import annotations

import pickle

import pytest
import torch

from mlip_fed import pipeline
from mlip_fed.config_compose import compose_experiment
from mlip_fed.data.shared_value import SharedInt
from mlip_fed.privacy.engine import PoissonLoader
from mlip_fed.train.trainer import epoch_seed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = compose_experiment(
        ["experiment=smoke", f"data.root={root}", "train.batch_size=4", "train.num_threads=1", "data.num_workers=2"]
    )
    data = pipeline.load_records(cfg.data)
    model = pipeline.build_model(cfg)
    return cfg, data.train[:16], pipeline.build_collator(model, cfg)


def _epoch(loader, cfg, epoch: int, skip: int = 0) -> list[dict]:
    """One epoch as the trainer drives it: reseed dataset and collator, reseed the sampler, skip ``skip`` batches."""
    seed = epoch_seed(cfg.train.seed, epoch)
    loader.dataset.reseed(seed)
    loader.collate_fn.set_epoch(epoch)
    loader.sampler.generator.manual_seed(seed)
    batches = list(loader)
    return batches[skip:]


def _same(a: list[dict], b: list[dict]) -> bool:
    keys = ("image", "image_view2", "input_ids", "swap_input_ids")
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in keys)


def test_persistent_workers_give_the_batches_fresh_workers_give(setup) -> None:
    cfg, records, collator = setup
    persistent = pipeline.train_loader(pipeline.train_dataset(records, cfg), collator, cfg)
    assert persistent.num_workers == 2 and persistent.persistent_workers
    fresh_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"persistent_workers": False})})
    fresh = pipeline.train_loader(pipeline.train_dataset(records, cfg), collator, fresh_cfg)
    epochs_p = [_epoch(persistent, cfg, e) for e in range(2)]
    epochs_f = [_epoch(fresh, cfg, e) for e in range(2)]
    assert _same(epochs_p[0], epochs_f[0]) and _same(epochs_p[1], epochs_f[1])
    # The epochs differ (reseeded augmentation reached the persistent workers), and so do the two workers' streams.
    assert not torch.equal(epochs_p[0][0]["image"], epochs_p[1][0]["image"])
    assert not torch.equal(epochs_p[0][0]["image"][0], epochs_p[0][1]["image"][0])


def test_a_loader_started_mid_run_replays_the_epoch_exactly(setup) -> None:
    cfg, records, collator = setup
    straight = pipeline.train_loader(pipeline.train_dataset(records, cfg), collator, cfg)
    _epoch(straight, cfg, 0)
    second = _epoch(straight, cfg, 1)
    resumed = pipeline.train_loader(pipeline.train_dataset(records, cfg), collator, cfg)  # a new process's loader
    assert _same(_epoch(resumed, cfg, 1, skip=1), second[1:])


def test_in_process_and_worker_collation_agree_on_counterfactuals(setup) -> None:
    cfg, records, collator = setup
    no_workers = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": 0})})
    inline = pipeline.train_loader(pipeline.eval_dataset(records, cfg), collator, no_workers)
    workers = pipeline.train_loader(pipeline.eval_dataset(records, cfg), collator, cfg)
    seen = []
    for epoch in (0, 3):  # eval transforms: per study, only the collator's epoch (the counterfactual) can differ
        a, b = _per_study(_epoch(inline, cfg, epoch)), _per_study(_epoch(workers, cfg, epoch))
        assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)
        seen.append({k: v[1] for k, v in a.items()})
    assert seen[0] != seen[1]  # the epoch reached the persistent workers' collator: other counterfactuals


def _per_study(batches: list[dict]) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """study id -> (image, the counterfactual's token ids without padding)."""
    out = {}
    for batch in batches:
        for row, study in enumerate(batch["study_id"]):
            n = int(batch["swap_attention_mask"][row].sum())
            out[study] = (batch["image"][row], batch["swap_input_ids"][row, :n].tolist())
    return out


def test_poisson_loader_with_workers_samples_and_collates_the_same(setup) -> None:
    cfg, records, collator = setup
    dataset = pipeline.eval_dataset(records, cfg)
    ids = [r.patient_id for r in records]
    inline = PoissonLoader(dataset, collator, ids, 0.3, num_buckets=4, seed=7)
    workers = PoissonLoader(
        dataset, collator, ids, 0.3, num_buckets=4, seed=7, loader_options=pipeline.loader_options(cfg)
    )
    a, b = list(inline), list(workers)
    assert len(a) == len(b) == inline.steps_per_epoch
    for x, y in zip(a, b, strict=True):
        assert x["patient_id"] == y["patient_id"] and torch.equal(x["group_ids"], y["group_ids"])
        assert torch.equal(x["image"], y["image"])


def test_loader_options_keep_the_cpu_default_in_process() -> None:
    cfg = compose_experiment([])
    assert pipeline.loader_options(cfg) == {"num_workers": 0, "pin_memory": False}
    gpu = compose_experiment(["train=gpu"])
    options = pipeline.loader_options(gpu)
    assert options["num_workers"] >= 1 and options["persistent_workers"] and options["prefetch_factor"] >= 2
    assert options["pin_memory"] == torch.cuda.is_available()


def test_shared_int_copies_outside_a_worker_start() -> None:
    shared = SharedInt(5)
    copy = pickle.loads(pickle.dumps(shared))
    copy.value = 9
    assert shared.value == 5 and copy.value == 9
