"""The trainer's step reads nothing back from the device between log points, still stops a diverged run, and
SDPA attention in the text tower gives what eager attention gives."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from bench.gpu_step import make_batch
from bench.step_ops import count_host_reads, is_sync_op, ran_under
from mlip_fed import pipeline
from mlip_fed.config_compose import compose_experiment
from mlip_fed.train.trainer import LocalTrainer, TrainingDiverged
from tests.test_trainer import _cfg, _loader, _ToyModel


def test_divergence_between_log_points_is_found_and_never_checkpointed(tmp_path) -> None:
    trainer = LocalTrainer(_ToyModel(explode_at=3), _cfg(log_every=100), total_steps=15, output_dir=tmp_path)
    saved = []

    def save(info: dict) -> None:
        if info["step"] == 4:
            saved.append(trainer.save_checkpoint(tmp_path / "ckpt.pt"))

    with pytest.raises(TrainingDiverged, match=r"objective 'reg'.*step 3"):
        trainer.fit(_loader(), epochs=1, on_step=save)
    assert not saved and not (tmp_path / "ckpt.pt").exists()


def test_summary_means_are_those_of_every_step(tmp_path) -> None:
    torch.manual_seed(0)
    every = LocalTrainer(_ToyModel(), _cfg(log_every=1), total_steps=15, output_dir=tmp_path / "a")
    a = every.fit(_loader(), epochs=1)
    torch.manual_seed(0)
    rarely = LocalTrainer(_ToyModel(), _cfg(log_every=100), total_steps=15, output_dir=tmp_path / "b")
    b = rarely.fit(_loader(), epochs=1)
    assert a.mean_parts == b.mean_parts and a.steps == b.steps == 5


def _host_reads(trainer: LocalTrainer, batches: list) -> int:
    with count_host_reads() as reads, profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.fit(batches, epochs=1)
    syncs = [e for e in prof.events() if is_sync_op(e.name)]
    # CPU AdamW reads its step counts (the CUDA optimiser is fused); multinomial's check is async on CUDA.
    syncs = [e for e in syncs if not ran_under(e, ("Optimizer.step", "aten::_assert_async"))]
    return len(syncs) + sum(reads.values())


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_full_mlip_step_reads_back_only_at_the_end_of_fit(tmp_path, attention: str) -> None:
    torch.set_num_threads(1)
    cfg = compose_experiment(
        ["experiment=smoke", f"train.attention={attention}", "train.log_every=1000", "train.progress_bar=false"]
    )
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 4})})
    model = pipeline.build_model(cfg)
    trainer = LocalTrainer(model, cfg.train, total_steps=100, output_dir=tmp_path)
    batch = make_batch(model, cfg)
    trainer.fit([batch], epochs=1)  # step 1 is a log point
    assert _host_reads(trainer, [batch] * 3) == 1  # three steps, one read of their losses when fit returns


def test_sdpa_text_tower_matches_eager() -> None:
    torch.set_num_threads(1)
    cfg = compose_experiment(["experiment=smoke"])
    torch.manual_seed(0)
    model = pipeline.build_model(cfg).eval()
    batch = make_batch(model, cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 4})}))
    with torch.no_grad():
        eager = model.text_encoder(batch["input_ids"], batch["attention_mask"])
        loss_eager = model(batch).parts
        assert model.text_encoder.use_sdpa()
        sdpa = model.text_encoder(batch["input_ids"], batch["attention_mask"])
        loss_sdpa = model(batch).parts
    for name in ("tokens", "words", "word_weights"):
        torch.testing.assert_close(getattr(sdpa, name), getattr(eager, name), atol=1e-5, rtol=1e-5)
    assert torch.equal(sdpa.word_mask, eager.word_mask)
    for name in ("global_itc", "local_alignment", "category_contrast"):
        torch.testing.assert_close(loss_sdpa[name], loss_eager[name], atol=1e-5, rtol=1e-5)


def test_channels_last_step_equals_the_contiguous_step(tmp_path) -> None:
    torch.set_num_threads(1)
    cfg = compose_experiment(["experiment=smoke", "model=resnet_tiny", "train.progress_bar=false"])
    runs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = pipeline.build_model(cfg)
        train = cfg.train.model_copy(update={"channels_last": channels_last, "batch_size": 4})
        trainer = LocalTrainer(model, train, total_steps=10, output_dir=tmp_path / str(channels_last))
        batch = make_batch(model, cfg.model_copy(update={"train": train}))
        torch.manual_seed(1)
        runs.append(trainer.fit(DataLoader([batch], batch_size=None), epochs=1).mean_parts)
    for name, value in runs[0].items():
        assert runs[1][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
