"""The local trainer: exact resume, divergence detection, schedule, accumulation."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mlip_fed.config import TrainConfig
from mlip_fed.train.schedule import warmup_cosine_factor
from mlip_fed.train.trainer import LocalTrainer, TrainingDiverged


@dataclass
class _Out:
    total: torch.Tensor
    parts: dict[str, torch.Tensor]


class _ToyModel(nn.Module):
    """Two "objectives", dropout (consumes RNG in forward) and an EMA buffer, like MLIP."""

    def __init__(self, explode_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 2))
        self.register_buffer("ema", torch.zeros(2))
        self.calls = 0
        self.explode_at = explode_at

    def forward(self, batch: dict[str, torch.Tensor]) -> _Out:
        self.calls += 1
        out = self.net(batch["image"])
        fit = ((out - batch["target"]) ** 2).mean()
        reg = out.pow(2).mean() * 0.1
        if self.explode_at is not None and self.calls >= self.explode_at:
            reg = reg * float("nan")
        return _Out(total=fit + reg, parts={"fit": fit, "reg": reg})

    def update_divergence_encoder(self) -> None:
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * self.net[0].weight.mean())


class _Noisy(Dataset):
    """Augmentation drawn from the global torch RNG, as MONAI/torch transforms may do."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        x = torch.randn(4, generator=g) + 0.1 * torch.randn(4)
        return {"image": x, "target": torch.stack([x.sum(), x[0] - x[1]])}


def _loader(seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(_Noisy(), batch_size=4, shuffle=True, generator=generator)


def _cfg(**kw: object) -> TrainConfig:
    base = {"lr": 1e-2, "progress_bar": False, "seed": 3, "warmup_fraction": 0.2, "log_every": 1}
    base.update(kw)
    return TrainConfig(**base)


def _trainer(tmp_path, cfg: TrainConfig | None = None, model: nn.Module | None = None) -> LocalTrainer:
    torch.manual_seed(0)
    return LocalTrainer(model or _ToyModel(), cfg or _cfg(), total_steps=15, output_dir=tmp_path)


def test_resume_mid_epoch_is_exact(tmp_path) -> None:
    straight = _trainer(tmp_path / "a")
    straight.fit(_loader(), epochs=3)

    first = _trainer(tmp_path / "b", _cfg(max_steps=7))  # stops inside epoch 2 (5 batches per epoch)
    first.fit(_loader(), epochs=3)
    assert first.state.global_step == 7 and first.state.batches_done_in_epoch == 2
    first.save_checkpoint(tmp_path / "ckpt.pt")

    resumed = _trainer(tmp_path / "c")
    torch.manual_seed(12345)  # a fresh process has some other RNG state
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    resumed.fit(_loader(), epochs=2)

    assert resumed.state.global_step == straight.state.global_step == 15
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_resume_at_an_epoch_boundary_is_exact(tmp_path) -> None:
    """A checkpoint written at the end of an epoch (how every federated round ends) resumes into the next epoch's own
    seed, as the uninterrupted run does: the RNG state saved at the end of the previous epoch must not replace it
    (before the fix it did, so a one-site federation of 3 rounds drew other dropout / ITM negatives / report edits than
    3 epochs of centralized training, docs/federation.md)."""
    straight = _trainer(tmp_path / "a")
    straight.fit(_loader(), epochs=3)

    first = _trainer(tmp_path / "b")
    first.fit(_loader(), epochs=1)
    assert first.state.epoch == 1 and first.state.batches_done_in_epoch == 0
    first.save_checkpoint(tmp_path / "ckpt.pt")

    resumed = _trainer(tmp_path / "c")
    torch.manual_seed(12345)
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    resumed.fit(_loader(), epochs=2)

    assert resumed.state.global_step == straight.state.global_step == 15
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_nan_loss_names_the_objective(tmp_path) -> None:
    trainer = _trainer(tmp_path, model=_ToyModel(explode_at=3))
    with pytest.raises(TrainingDiverged, match=r"objective 'reg'.*step 3"):
        trainer.fit(_loader(), epochs=1)


def test_metrics_written_as_json_lines(tmp_path) -> None:
    trainer = _trainer(tmp_path)
    summary = trainer.fit(_loader(), epochs=1)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and summary.steps == 5 and summary.samples == 20
    assert {"fit", "reg", "total", "lr", "step"} <= set(__import__("json").loads(lines[-1]))


def test_grad_accumulation_counts_optimizer_steps(tmp_path) -> None:
    trainer = _trainer(tmp_path, _cfg(grad_accum_steps=2))
    summary = trainer.fit(_loader(), epochs=1)  # 5 batches → 2 full accumulations + 1 partial
    assert summary.steps == 3 and summary.samples == 20


def test_corrupt_checkpoint_names_the_file(tmp_path) -> None:
    bad = tmp_path / "torn.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="torn.pt"):
        _trainer(tmp_path).load_checkpoint(bad)


def test_warmup_cosine_shape() -> None:
    assert warmup_cosine_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 100, 10, 0.01) == pytest.approx(0.01)
    assert all(
        warmup_cosine_factor(s, 100, 10, 0.0) >= warmup_cosine_factor(s + 1, 100, 10, 0.0) for s in range(10, 99)
    )
    assert not math.isnan(warmup_cosine_factor(5, 0, 0, 0.0))


# ------------------------------------------------------------------ issue 18: first contact with a GPU, on CPU
class _FakeCuda:
    """``torch.cuda`` as a process with ``count`` GPUs sees it, as far as resuming a checkpoint touches it.

    ``set_rng_state`` behaves like the real one on a GPU: it accepts only a CPU ``torch.uint8`` tensor and an existing
    device index (``torch.cuda.set_rng_state_all`` calls it through ``torch.cuda.random``, so that is patched too)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.count = count
        self.restored: dict[int, torch.Tensor] = {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda.random, "set_rng_state", self.set_rng_state)

    def set_rng_state(self, new_state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if not (new_state.device.type == "cpu" and new_state.dtype == torch.uint8):
            raise TypeError(f"RNG state should be a CPU ByteTensor, got {new_state.dtype} on {new_state.device}")
        if not 0 <= index < self.count:
            raise RuntimeError(f"invalid device ordinal {index} ({self.count} GPU(s))")
        self.restored[index] = new_state.clone()


def _checkpoint_with_cuda_rng(tmp_path, num_gpus: int):
    """A resumable checkpoint as a machine with ``num_gpus`` GPUs writes it (``rng['cuda']``: one state per GPU)."""
    trainer = _trainer(tmp_path / "src", _cfg(max_steps=2))
    trainer.fit(_loader(), epochs=1)
    state = trainer.state_dict()
    state["rng"]["cuda"] = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(num_gpus)]
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    return path


def test_resume_on_an_accelerator_restores_cuda_rng_from_cpu_byte_tensors(tmp_path, monkeypatch) -> None:
    """Round >= 2 of every site on a GPU: the checkpoint used to be loaded with map_location=<the GPU>, which moved the
    saved RNG states there; torch.cuda.set_rng_state refuses them. The meta device stands in for the GPU."""
    path = _checkpoint_with_cuda_rng(tmp_path, num_gpus=1)
    cuda = _FakeCuda(monkeypatch, count=1)
    torch.manual_seed(0)
    trainer = LocalTrainer(_ToyModel(), _cfg(), total_steps=15, output_dir=tmp_path, device=torch.device("meta"))
    with warnings.catch_warnings():  # loading real values into meta parameters is a no-op, and says so
        warnings.simplefilter("ignore", UserWarning)
        trainer.load_checkpoint(path)
    assert set(cuda.restored) == {0} and torch.equal(cuda.restored[0], torch.full((16,), 10, dtype=torch.uint8))
    assert trainer.state.global_step == 2
    assert all(p.device.type == "meta" for p in trainer.model.parameters())
    moments = [s for state in trainer.optimizer.state.values() for s in state.values() if isinstance(s, torch.Tensor)]
    assert moments and all(m.device.type == "meta" for m in moments if m.dim() > 0)


@pytest.mark.parametrize("visible", [0, 1, 3])
def test_resume_with_another_gpu_count_restores_what_exists_and_says_so(tmp_path, monkeypatch, caplog, visible) -> None:
    path = _checkpoint_with_cuda_rng(tmp_path, num_gpus=2)
    cuda = _FakeCuda(monkeypatch, count=visible)
    trainer = _trainer(tmp_path / "resumed", _cfg(device="cpu"))  # the fake GPUs hold no tensors
    with caplog.at_level("WARNING", logger="mlip_fed.train"):
        trainer.load_checkpoint(path)
    assert sorted(cuda.restored) == list(range(min(2, visible)))
    for index, state in cuda.restored.items():
        assert torch.equal(state, torch.full((16,), 10 + index, dtype=torch.uint8))
    assert any(f"CUDA RNG states for 2 GPU(s), this process sees {visible}" in r.getMessage() for r in caplog.records)
    cuda.restored.clear()
    summary = trainer.fit(_loader(), epochs=1)  # the resumed epoch re-applies the same (trimmed) states and trains
    assert summary.steps == 3 and sorted(cuda.restored) == list(range(min(2, visible)))


def test_bf16_autocast_on_cpu_trains_when_asked_for(tmp_path) -> None:
    """train.amp=bf16 on a CPU used to raise an uncaught RuntimeError; CPU autocast supports bf16, so it trains."""
    trainer = _trainer(tmp_path, _cfg(amp="bf16", device="cpu"))
    assert trainer.autocast_dtype == torch.bfloat16
    seen: list[torch.dtype] = []
    handle = trainer.model.net[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    summary = trainer.fit(_loader(), epochs=1)
    handle.remove()
    assert summary.steps == 5 and math.isfinite(summary.mean_parts["total"])
    assert set(seen) == {torch.bfloat16}  # the Linear really ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert _trainer(tmp_path / "auto", _cfg(amp="auto", device="cpu")).autocast_dtype is None
