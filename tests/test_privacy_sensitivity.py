"""The numerical sensitivity checks of issue 6: bucketed clipping bounds one patient's influence by 2C,
naive per-record clipping of in-batch InfoNCE does not bound it by C."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlip_fed.model.objectives.global_itc import soft_target_itc_loss
from mlip_fed.model.outputs import LossOutput
from mlip_fed.privacy.buckets import bucket_ids
from mlip_fed.privacy.engine import BucketedClippingGradient, PoissonLoader, empty_batch


class TwoTower(nn.Module):
    """Small CLIP: linear towers, L2-normalised embeddings, group-masked symmetric InfoNCE when given groups."""

    def __init__(self, dim: int = 6, out: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Linear(dim, out)
        self.text = nn.Linear(dim, out)

    def forward(self, batch: dict) -> LossOutput:
        v = F.normalize(self.image(batch["image"]), dim=1)
        t = F.normalize(self.text(batch["text"]), dim=1)
        loss = soft_target_itc_loss(v, t, 0.1, group_ids=batch.get("group_ids"))
        return LossOutput(total=loss, parts={"itc": loss})


def coupled_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Full-batch InfoNCE: what stock per-sample clipping (make_private) is applied to."""
    out = model({k: v for k, v in batch.items() if k != "group_ids"})
    return out.total, out.parts


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors]).double()


def clustered_batch(n: int, seed: int, dim: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(dim, generator=g)
    image = centre + 0.3 * torch.randn(n, dim, generator=g)
    text = centre + 0.3 * torch.randn(n, dim, generator=g)
    patients = [f"p{i // 2}" for i in range(n)]  # two records per patient
    return {"image": image, "text": text, "patient_id": patients, "group_ids": bucket_ids(patients, 4)}


def add_patient(batch: dict, image: torch.Tensor, text: torch.Tensor, pid: str) -> dict:
    patients = batch["patient_id"] + [pid] * image.shape[0]
    return {
        "image": torch.cat([batch["image"], image]),
        "text": torch.cat([batch["text"], text]),
        "patient_id": patients,
        "group_ids": bucket_ids(patients, 4),
    }


@pytest.mark.parametrize("seed", range(6))
def test_bucketed_clipping_moves_by_at_most_2C(seed: int) -> None:
    torch.set_num_threads(1)
    model = TwoTower(seed=seed).double()
    c = 0.05  # small enough that buckets are clipped (the interesting case)
    engine = BucketedClippingGradient(model, noise_multiplier=1.0, clipping_norm=c, num_buckets=4)
    try:
        base = {
            k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in clustered_batch(24, seed).items()
        }
        g = torch.Generator().manual_seed(100 + seed)
        hub_img = base["image"].mean(0, keepdim=True).repeat(2, 1) + 0.01 * torch.randn(2, 6, generator=g).double()
        hub_txt = base["text"].mean(0, keepdim=True).repeat(2, 1)
        bigger = add_patient(base, hub_img, hub_txt, "hub-patient")
        without, _ = engine.clipped_sum(base)
        with_, _ = engine.clipped_sum(bigger)
        delta = float((flat(with_) - flat(without)).norm())
        assert 0 < delta <= 2 * c * (1 + 1e-9)
        assert engine.last_stats is not None and engine.last_stats.clipped_fraction > 0
    finally:
        engine.close()


def test_naive_per_record_clipping_of_infonce_exceeds_C() -> None:
    """Adding one record to a coupled InfoNCE batch moves the per-record-clipped sum by more than C.

    Construction (docs/privacy.md, sample-level DP): near-identical reports make every record's path gradient ~0; one extra pair
    with a different report enters every softmax and turns all of them in the same direction. Bucketed clipping
    of the same data stays within its 2C bound.
    """
    torch.set_num_threads(1)
    ratios = []
    for seed in range(4):
        model = TwoTower(seed=seed).double()
        g = torch.Generator().manual_seed(seed)
        image = torch.randn(32, 6, generator=g).double()
        text = (torch.randn(6, generator=g) + 0.01 * torch.randn(32, 6, generator=g)).double()
        patients = [f"p{i}" for i in range(32)]
        batch = {"image": image, "text": text, "patient_id": patients}
        extra = {
            "image": torch.cat([image, torch.randn(1, 6, generator=g).double()]),
            "text": torch.cat([text, torch.randn(1, 6, generator=g).double()]),
            "patient_id": [*patients, "hub"],
        }
        # C = mean per-record norm of the coupled path gradients with the extra record present
        probe = BucketedClippingGradient(
            model, noise_multiplier=0.0, clipping_norm=1e9, num_buckets=1, mode="decomposable", loss_fn=coupled_loss
        )
        probe.clipped_sum(extra)
        c = probe.last_stats.mean_bucket_norm  # type: ignore[union-attr]
        probe.close()
        naive = BucketedClippingGradient(
            model, noise_multiplier=0.0, clipping_norm=c, num_buckets=1, mode="decomposable", loss_fn=coupled_loss
        )
        a, _ = naive.clipped_sum(batch)
        b, _ = naive.clipped_sum(extra)
        naive.close()
        bucketed = BucketedClippingGradient(model, noise_multiplier=0.0, clipping_norm=c, num_buckets=4)
        a2, _ = bucketed.clipped_sum({**batch, "group_ids": bucket_ids(batch["patient_id"], 4)})
        b2, _ = bucketed.clipped_sum({**extra, "group_ids": bucket_ids(extra["patient_id"], 4)})
        bucketed.close()
        ratios.append(float((flat(a) - flat(b)).norm()) / c)
        assert float((flat(a2) - flat(b2)).norm()) <= 2 * c * (1 + 1e-9)
    assert min(ratios) > 1.0, f"expected the naive mechanism to exceed C on every seed, got {ratios}"
    assert max(ratios) > 2.0, f"expected at least one seed to exceed even the bucketed 2C bound, got {ratios}"


def test_noise_step_on_empty_batch_and_scale() -> None:
    torch.set_num_threads(1)
    model = TwoTower(dim=6, out=4)
    engine = BucketedClippingGradient(model, noise_multiplier=2.0, clipping_norm=0.5, num_buckets=4, seed=1)
    try:
        parts = engine(model, empty_batch(), 1.0)
        assert parts == {"total": 0.0} and engine.steps == 1
        grads = flat([p.grad for p in model.parameters()])
        assert torch.isfinite(grads).all() and grads.abs().sum() > 0
        # std = sigma * C / M = 2 * 0.5 / 4
        samples = []
        for _ in range(200):
            model.zero_grad(set_to_none=True)  # as LocalTrainer does before every step
            engine(model, empty_batch(), 1.0)
            samples.append(flat([p.grad for p in model.parameters()]))
        std = float(torch.stack(samples).std())
        assert std == pytest.approx(0.25, rel=0.05)
    finally:
        engine.close()


def test_poisson_loader_samples_whole_patients_reproducibly() -> None:
    class Items:
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int) -> dict:
            return {"i": i, "patient_id": f"p{i // 4}"}

    def collate(items: list[dict]) -> dict:
        return {
            "image": torch.zeros(len(items), 1),
            "patient_id": [it["patient_id"] for it in items],
            "i": [it["i"] for it in items],
        }

    patients = [f"p{i // 4}" for i in range(40)]
    loader = PoissonLoader(Items(), collate, patients, 0.2, num_buckets=3, seed=5)
    assert len(loader) == 5 and loader.num_units == 10
    first = [b["i"] if b["image"].numel() else [] for b in loader]
    again = [b["i"] if b["image"].numel() else [] for b in loader]
    assert first == again
    for idx in first:  # every sampled patient comes with all four records
        assert len(idx) % 4 == 0 and all(set(range(i - i % 4, i - i % 4 + 4)) <= set(idx) for i in idx)
    loader.set_epoch(1)
    assert [b["i"] if b["image"].numel() else [] for b in loader] != first
    rate = sum(len(loader.sample_indices(0, s)) for s in range(2000)) / (2000 * 40)
    assert rate == pytest.approx(0.2, abs=0.01)
    assert not math.isnan(rate)


# ------------------------------------------------------------------ issue 18: clipping and noise in fp32 under bf16
class _Mlp(nn.Module):
    """Wide enough that bf16 rounding of a bucket's sum and of its clip factor shows (~0.3 % on CPU bf16)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 256)
        self.b = nn.Linear(256, 32)

    def forward(self, batch: dict) -> LossOutput:
        out = self.b(torch.relu(self.a(batch["image"])))
        loss = ((out.float() - batch["target"]) ** 2).sum(dim=1).mean()
        return LossOutput(total=loss, parts={"mse": loss})


@pytest.mark.parametrize("precision", ["autocast_bf16", "bf16_parameters"])
def test_every_clipped_unit_stays_within_C_under_bf16(precision: str) -> None:
    """A clipped unit's norm must be <= C exactly (checked in fp64): bf16 bucket sums and clip factors let it exceed C,
    i.e. the sensitivity the accountant assumes. One bucket per batch, so the clipped sum is that unit's vector."""
    torch.set_num_threads(1)
    model = _Mlp()
    if precision == "bf16_parameters":
        model = model.bfloat16()
    c = 0.37
    engine = BucketedClippingGradient(model, noise_multiplier=1.0, clipping_norm=c, num_buckets=1, seed=0)
    try:
        for seed in range(12):
            g = torch.Generator().manual_seed(seed)
            image = torch.randn(8, 64, generator=g)
            batch = {
                "image": image.bfloat16() if precision == "bf16_parameters" else image,
                "target": 3 * torch.randn(8, 32, generator=g),
                "group_ids": torch.zeros(8, dtype=torch.long),
            }
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast_bf16"):
                summed, _ = engine.clipped_sum(batch)
            assert engine.last_stats is not None and engine.last_stats.clipped_fraction == 1.0
            norm = float(flat(summed).norm())
            assert c * 0.999 < norm <= c, f"seed {seed}: clipped unit norm {norm / c:.6f} C"
            assert all(s.dtype == torch.float32 for s in summed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast_bf16"):
            engine(model, batch, 1.0)  # a noise step: the released gradient has the parameter's dtype
        assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters())
    finally:
        engine.close()


def test_extra_units_are_clipped_within_C_in_fp32() -> None:
    """The audit's extra units go through the same clip factor: a huge unit is clipped to <= C, never above."""
    from mlip_fed.privacy.engine import UnitGradient

    model = TwoTower()
    engine = BucketedClippingGradient(model, noise_multiplier=0.0, clipping_norm=0.05, num_buckets=1, seed=0)
    try:
        for scale in (1e-3, 1.0, 1e3, 1e6):
            summed = [torch.zeros_like(p) for p in engine.params]
            value = scale * torch.randn(24, generator=torch.Generator().manual_seed(0))
            engine.add_extra_units(summed, [UnitGradient(0, torch.arange(24), value)])
            assert float(flat(summed).norm()) <= 0.05
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_is_drawn_on_the_gpu() -> None:
    from mlip_fed.privacy.randomness import GaussianNoise

    for secure in (False, True):
        noise = GaussianNoise(secure_mode=secure).sample((1000, 100), 2.0, device="cuda")
        assert noise.device.type == "cuda" and noise.dtype == torch.float32
        assert float(noise.std()) == pytest.approx(2.0, rel=0.02)
    a = GaussianNoise(7, secure_mode=True).sample((50,), 1.0, device="cuda")
    b = GaussianNoise(7, secure_mode=True).sample((50,), 1.0, device="cuda")
    assert torch.equal(a, b)  # the debug seed stays reproducible on the device
    model = TwoTower().cuda()
    engine = BucketedClippingGradient(model, noise_multiplier=1.0, clipping_norm=0.5, num_buckets=4)
    try:
        engine(model, empty_batch(), 1.0)
        assert all(p.grad.device.type == "cuda" for p in model.parameters())
        assert engine.noise._device_generators  # drawn by a generator on the GPU, not the CPU one
    finally:
        engine.close()
