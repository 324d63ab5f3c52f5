"""The local trainer: one loop used by ``mlip-pretrain`` and by every Flower site.

It owns the optimiser, the schedule, mixed precision, accumulation, logging and checkpoints. What
"compute the gradient of a batch" means is pluggable (``GradientFn``) so the DP engine can swap in
bucketed clipping without a second training loop (docs/architecture.md, invariant 1).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
import weakref
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from mlip_fed.config import TrainConfig
from mlip_fed.io import append_jsonl, atomic_torch_save
from mlip_fed.train.schedule import build_warmup_cosine

CHECKPOINT_VERSION = 1

logger = logging.getLogger("mlip_fed.train")


class TrainingDiverged(RuntimeError):
    """A loss became NaN, infinite or exploded; the message names the objective and the step."""


#: A loss part as a gradient function reports it: a Python float, or a detached 0-d tensor still on the device (read
#: by the trainer only at its next sync point, so a step needs no device-to-host copy).
LossValue = float | torch.Tensor


class GradientFn(Protocol):
    """Fills ``p.grad`` for one micro-batch and returns the loss parts it saw (floats or detached 0-d tensors)."""

    def __call__(self, model: nn.Module, batch: dict[str, Any], loss_scale: float) -> dict[str, LossValue]: ...


def standard_gradient(model: nn.Module, batch: dict[str, Any], loss_scale: float) -> dict[str, LossValue]:
    """Non-private gradient: backpropagate the weighted total of all enabled objectives.

    The parts stay detached device tensors: converting them with ``float()`` here would wait for the GPU once per
    part and step (the trainer reads them in one transfer at its log points)."""
    output = model(batch)
    (output.total * loss_scale).backward()
    parts: dict[str, LossValue] = {name: value.detach() for name, value in output.parts.items()}
    parts["total"] = output.total.detach()
    return parts


@dataclass
class _PendingStep:
    """One optimiser step whose loss parts have not been read back from the device yet."""

    step: int
    epoch: int
    micro_parts: list[dict[str, LossValue]]
    extra: dict[str, LossValue]


@dataclass
class TrainState:
    """Counters that make a resumed run continue exactly where it stopped."""

    epoch: int = 0
    batches_done_in_epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0


@dataclass
class TrainSummary:
    steps: int
    samples: int
    seconds: float
    mean_parts: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if hidden_gpus():
            _note_hidden_gpus()
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        hint = (
            f" (CUDA_VISIBLE_DEVICES is empty but the host has {hidden_gpus()} NVIDIA GPU(s): in mlip-simulate give "
            "each site GPUs with --gpus-per-site)"
            if hidden_gpus()
            else ""
        )
        raise RuntimeError(f"train.device='cuda' but no CUDA device is visible{hint}; set train.device=auto or cpu")
    return torch.device(name)


def hidden_gpus() -> int:
    """NVIDIA GPUs the host has but this process was told not to use (``CUDA_VISIBLE_DEVICES`` set and empty, as Ray
    sets it for a Flower ClientApp given 0 GPUs). 0 when nothing is hidden or the driver lists no GPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) not in ("", "-1"):
        return 0
    try:
        return len(list(Path("/proc/driver/nvidia/gpus").iterdir()))
    except OSError:
        return 0


@functools.cache
def _note_hidden_gpus() -> None:
    logger.warning(
        "train.device=auto trains on the CPU: CUDA_VISIBLE_DEVICES is empty although this host has %d NVIDIA GPU(s) "
        "(a Flower simulation gives each ClientApp no GPU unless mlip-simulate --gpus-per-site > 0)",
        hidden_gpus(),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(base_seed: int, epoch: int) -> int:
    """Per-epoch seed, so a resumed epoch replays the same data order and augmentations."""
    return (base_seed * 1_000_003 + epoch * 7919) % 2**31


class LocalTrainer:
    """Trains an MLIP model on one site's (or the central) data loader."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        total_steps: int,
        output_dir: Path | None = None,
        gradient_fn: GradientFn = standard_gradient,
        device: torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        #: channels-last: convolution weights (and, in ``_in_memory_format``, 4-d image batches) in NHWC, which cuDNN's
        #: tensor-core kernels want; a no-op for the transformer towers' linear weights.
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(device=self.device, memory_format=self.memory_format)
        if cfg.attention == "sdpa":
            use_sdpa = getattr(getattr(self.model, "text_encoder", None), "use_sdpa", None)
            if not (callable(use_sdpa) and use_sdpa()):
                logger.warning("train.attention='sdpa': this text tower keeps eager attention (not a BERT layout)")
        if cfg.compile:
            compile_towers(self.model)
        self.total_steps = max(1, total_steps)
        self.output_dir = output_dir
        self.gradient_fn = gradient_fn
        self.state = TrainState()
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None
        )
        self.scheduler = build_warmup_cosine(self.optimizer, self.total_steps, cfg.warmup_fraction, cfg.lr, cfg.min_lr)
        self.autocast_dtype = self._autocast_dtype()
        self._tb_writer = self._open_tensorboard() if cfg.tensorboard else None
        self._resume_rng: dict[str, Any] | None = None
        #: The random augmentation this epoch's loader left to the device (``data.augment_on_device``: the loader's
        #: dataset carries it) and the device generator it draws from, reseeded per micro-batch (``_augment``).
        self._device_augment: Callable[..., dict[str, Any]] | None = None
        self._augment_generator: torch.Generator | None = None
        #: Steps taken but not yet read back (see ``sync``), and the running sums of what was read since ``fit`` began.
        self._pending: list[_PendingStep] = []
        self._totals: dict[str, float] = {}
        self._counted = 0
        self._last_parts: dict[str, float] = {}

    # ------------------------------------------------------------------ training
    def fit(
        self, loader: Iterable[dict[str, Any]], epochs: int, on_step: Callable[[dict[str, Any]], None] | None = None
    ) -> TrainSummary:
        """Run ``epochs`` more epochs (a partly done epoch counts as the first), or until ``max_steps``."""
        target_epoch = self.state.epoch + epochs
        start_time = time.perf_counter()
        start_samples = self.state.samples_seen
        start_step = self.state.global_step
        self.sync()  # steps of an earlier call are not this call's
        self._totals, self._counted = {}, 0
        self.model.train()
        while self.state.epoch < target_epoch and not self.reached_max_steps():
            self._run_epoch(loader, on_step)
        self.sync()
        seconds = time.perf_counter() - start_time
        totals, counts = self._totals, self._counted
        mean_parts = {k: v / counts for k, v in totals.items()} if counts else {}
        return TrainSummary(
            steps=self.state.global_step - start_step,
            samples=self.state.samples_seen - start_samples,
            seconds=seconds,
            mean_parts=mean_parts,
        )

    def _run_epoch(self, loader: Iterable[dict[str, Any]], on_step: Callable[[dict[str, Any]], None] | None) -> None:
        epoch = self.state.epoch
        self._set_epoch(loader, epoch)
        augment = getattr(getattr(loader, "dataset", None), "device_augment", None)
        self._device_augment = getattr(augment, "augment_batch", None)
        skip = self.state.batches_done_in_epoch
        accum = self.cfg.grad_accum_steps
        batch_iter = iter(loader)
        for _ in range(skip):  # replay the data pipeline so augmentation RNG lines up exactly
            next(batch_iter)
        if self._resume_rng is not None:
            # Mid-epoch: continue the saved stream. At an epoch boundary (every federated round ends on one) the
            # uninterrupted run reseeds for the new epoch, so the epoch seed just set must stand.
            if skip:
                _set_rng_state(self._resume_rng)
            self._resume_rng = None
        progress = self._progress(loader, skip)
        micro: list[dict[str, Any]] = []
        exhausted = True
        for batch in batch_iter:
            if batch is None:  # every item of this batch failed to decode; counted by the dataset
                self.state.batches_done_in_epoch += 1
                continue
            micro.append(batch)
            if len(micro) < accum:
                continue
            self._step_and_report(micro, progress, on_step)
            micro = []
            if self.reached_max_steps():
                exhausted = False
                break
        if micro:  # a final partial accumulation still trains
            self._step_and_report(micro, progress, on_step)
        if progress is not None:
            progress.close()
        if exhausted:
            self.state.epoch += 1
            self.state.batches_done_in_epoch = 0

    def _step_and_report(
        self, micro: list[dict[str, Any]], progress: Any, on_step: Callable[[dict[str, Any]], None] | None
    ) -> None:
        synced = self._optimizer_step(micro)
        self.state.batches_done_in_epoch += len(micro)
        if progress is not None:
            progress.update(len(micro))
            if synced is not None:  # the loss shown is the last one read back (at a log point), never a new sync
                progress.set_postfix(loss=f"{synced['total']:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        if on_step is not None:
            on_step({"step": self.state.global_step, "epoch": self.state.epoch})

    def _optimizer_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float] | None:
        """One optimiser step. Its loss parts are queued, not read: the host never waits for the device here except
        at log points (``train.log_every``), where every queued step is read back in one transfer, checked for
        divergence and logged. Returns the step's parts when it was such a point, else None."""
        self.optimizer.zero_grad(set_to_none=True)
        micro_parts: list[dict[str, LossValue]] = []
        extra: dict[str, LossValue] = {}
        samples = 0
        step_start = time.perf_counter()
        for index, batch in enumerate(micro_batches):
            batch = _to_device(batch, self.device)
            if self._device_augment is not None:
                batch = self._device_augment(batch, self._augment_generator_for(index))
            batch = _in_memory_format(batch, self.memory_format)
            with self._autocast():
                micro_parts.append(self.gradient_fn(self.model, batch, 1.0 / len(micro_batches)))
            samples += _batch_size(batch)
        if self.cfg.max_grad_norm is not None and self.gradient_fn is standard_gradient:
            extra["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        update = getattr(self.model, "update_divergence_encoder", None)
        if callable(update):
            update()
        self._pending.append(_PendingStep(self.state.global_step + 1, self.state.epoch, micro_parts, extra))
        self.state.global_step += 1
        self.state.samples_seen += samples
        if self.state.global_step % self.cfg.log_every == 0 or self.state.global_step == 1:
            summed = self.sync()
            self._log(summed, samples / max(1e-9, time.perf_counter() - step_start))
            return summed
        return None

    def _augment_generator_for(self, micro_batch: int) -> torch.Generator:
        """The device generator, seeded for this micro-batch of this step from the trainer's seed: like dropout (the
        global generators, ``_set_epoch``) it follows ``train.seed``, which under DP is the site's secret seed, and
        being a function of the step it needs no checkpointed state to resume exactly. Seeding a CUDA generator
        sets host-side state only: no synchronisation."""
        from mlip_fed.data.device_augment import batch_seed

        if self._augment_generator is None:
            self._augment_generator = torch.Generator(device=self.device)
        return self._augment_generator.manual_seed(batch_seed(self.cfg.seed, self.state.global_step, micro_batch))

    def sync(self) -> dict[str, float]:
        """Read every queued step's loss parts back (one device-to-host transfer), check each for divergence in step
        order, and add them to ``fit``'s means; returns the last step's parts (those of the last read step if none
        was queued). Called at log points, at the end of ``fit`` and before a checkpoint is written, so a diverged
        run stops within ``train.log_every`` steps and never saves weights from an unchecked step."""
        pending, self._pending = self._pending, []
        if not pending:
            return self._last_parts
        values = [v for p in pending for parts in (*p.micro_parts, p.extra) for v in parts.values()]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        read = iter(torch.stack([t.reshape(()).float() for t in tensors]).tolist() if tensors else [])
        floats = [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]
        at = 0
        for p in pending:
            summed: dict[str, float] = {}
            for parts in p.micro_parts:
                local = dict(zip(parts, floats[at : at + len(parts)], strict=True))
                at += len(parts)
                self._check_finite(local, p.step, p.epoch)
                for key, value in local.items():
                    summed[key] = summed.get(key, 0.0) + value / len(p.micro_parts)
            summed.update(zip(p.extra, floats[at : at + len(p.extra)], strict=True))
            at += len(p.extra)
            for key, value in summed.items():
                self._totals[key] = self._totals.get(key, 0.0) + value
            self._counted += 1
            self._last_parts = summed
        return self._last_parts

    def _check_finite(self, parts: dict[str, float], step: int, epoch: int) -> None:
        for name, value in parts.items():
            if name == "total":
                continue
            if not math.isfinite(value) or abs(value) > self.cfg.loss_explode_threshold:
                raise TrainingDiverged(
                    f"objective {name!r} produced loss {value} at step {step} "
                    f"(epoch {epoch}); threshold train.loss_explode_threshold="
                    f"{self.cfg.loss_explode_threshold}"
                )

    def reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps

    def _set_epoch(self, loader: Iterable[dict[str, Any]], epoch: int) -> None:
        seed_everything(epoch_seed(self.cfg.seed, epoch))
        for obj in (
            loader,
            getattr(loader, "dataset", None),
            getattr(loader, "collate_fn", None),
            getattr(loader, "sampler", None),
        ):
            set_epoch = getattr(obj, "set_epoch", None)
            reseed = getattr(obj, "reseed", None)
            if callable(set_epoch):
                set_epoch(epoch)
            elif callable(reseed):  # datasets with seeded augmentation (ImageReportDataset)
                reseed(epoch_seed(self.cfg.seed, epoch))
        generator = getattr(getattr(loader, "sampler", None), "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(epoch_seed(self.cfg.seed, epoch))

    # ------------------------------------------------------------------ logging
    def _log(self, parts: dict[str, float], images_per_second: float) -> None:
        record = {
            "step": self.state.global_step,
            "epoch": self.state.epoch,
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": images_per_second,
            **parts,
        }
        if self.output_dir is not None:
            append_jsonl(self.output_dir / "metrics.jsonl", record)
        if self._tb_writer is not None:
            for key, value in record.items():
                if key != "step":
                    self._tb_writer.add_scalar(f"train/{key}", value, self.state.global_step)
            self._tb_writer.flush()  # SummaryWriter buffers ~2 min; a short or killed run would leave nothing

    def log_evaluation(self, metrics: dict[str, float]) -> None:
        """Evaluation figures into TensorBoard (``eval/<metric>``) at the current step, beside the training curves."""
        if self._tb_writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self._tb_writer.add_scalar(f"eval/{key}", value, self.state.global_step)
        self._tb_writer.flush()

    def _progress(self, loader: Iterable[Any], skip: int) -> Any:
        if not self.cfg.progress_bar:
            return None
        from tqdm.auto import tqdm

        total = _safe_len(loader, None)
        return tqdm(total=total, initial=skip, desc=f"epoch {self.state.epoch}", leave=False, dynamic_ncols=True)

    def _open_tensorboard(self) -> Any:
        """Event files under ``<output_dir>/tensorboard`` (``train/<loss part>``, ``train/lr``, ...).

        Nothing closes a trainer explicitly (a site builds one per round), so the writer is closed by a
        finalizer when the trainer is collected or the interpreter exits; ``_log`` flushes every record.
        """
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise RuntimeError(
                f"train.tensorboard=true needs the 'tensorboard' package ({err}); "
                "reinstall the project's dependencies or set train.tensorboard=false"
            ) from err
        log_dir = (self.output_dir or Path("runs")) / "tensorboard"
        writer = SummaryWriter(log_dir=str(log_dir))
        weakref.finalize(self, writer.close)
        return writer

    # ------------------------------------------------------------------ precision
    def _autocast_dtype(self) -> torch.dtype | None:
        """bf16 autocast: on a GPU for ``amp=auto`` or ``bf16``; on a CPU only when ``amp=bf16`` asks for it.

        CPU autocast supports bf16 (it is how the bf16 code paths, DP clipping included, are tested without a GPU),
        so an explicit request is honoured rather than refused; without native bf16 instructions it is slower than
        fp32, which is said once."""
        if self.cfg.amp == "off" or (self.cfg.amp == "auto" and self.device.type != "cuda"):
            return None
        if self.device.type == "cpu":
            _note_cpu_bf16()
        return torch.bfloat16

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": vars(self.state).copy(),
            "total_steps": self.total_steps,
            "rng": _get_rng_state(),
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {checkpoint.get('version')} != {CHECKPOINT_VERSION}")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.state = TrainState(**checkpoint["state"])
        rng = _restorable_rng_state(checkpoint["rng"])
        self._resume_rng = rng
        _set_rng_state(rng)

    def save_checkpoint(self, path: Path) -> Path:
        self.sync()  # raises TrainingDiverged rather than save weights a diverged step produced
        return atomic_torch_save(path, self.state_dict())

    def load_checkpoint(self, path: Path) -> None:
        """Resume from ``path``. Loaded onto the CPU: the RNG states must stay CPU ByteTensors (``map_location`` =
        the GPU would move the saved CUDA RNG state there and ``torch.cuda.set_rng_state`` refuses it), and the model
        and optimiser ``load_state_dict`` copy their tensors onto the trainer's device themselves."""
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a torn or foreign file: say which one
            raise ValueError(f"cannot read checkpoint {path}: {err}") from err
        self.load_state_dict(checkpoint)


def _get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu_byte_tensor(state: Any) -> torch.Tensor:
    """An RNG state as the CPU ``torch.uint8`` tensor that ``torch.(cuda.)set_rng_state`` requires."""
    return torch.as_tensor(state).detach().to(device="cpu", dtype=torch.uint8)


def _restorable_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's RNG states made restorable on this machine: CPU ByteTensors, and only as many CUDA states as
    there are visible GPUs (a checkpoint from a machine with more, fewer or no GPUs resumes; what is not restored is
    logged, since that part of the random stream then differs from an uninterrupted run)."""
    out = {**state, "torch": _cpu_byte_tensor(state["torch"])}
    saved = [_cpu_byte_tensor(s) for s in state.get("cuda") or []]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved and len(saved) != visible:
        logger.warning(
            "checkpoint holds CUDA RNG states for %d GPU(s), this process sees %d: restoring %d, the rest "
            "start from their current state (the resumed run's random stream differs from an uninterrupted one)",
            len(saved),
            visible,
            min(len(saved), visible),
        )
    out["cuda"] = saved[:visible]
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore states prepared by ``_restorable_rng_state``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(_cpu_byte_tensor(state["torch"]))
    for index, cuda_state in enumerate(state.get("cuda") or []):
        torch.cuda.set_rng_state(_cpu_byte_tensor(cuda_state), device=index)


@functools.cache
def _note_cpu_bf16() -> None:
    """Once per process: bf16 autocast on a CPU without bf16 instructions is emulated, hence slow."""
    if not _cpu_has_native_bf16():
        logger.warning(
            "train.amp='bf16' on a CPU without native bf16 instructions (avx512_bf16/amx_bf16): autocast works but "
            "is usually slower than fp32; set train.amp=auto (fp32 on CPU) for speed"
        )


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo; False if unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _to_device(
    batch: dict[str, Any], device: torch.device, memory_format: torch.memory_format = torch.contiguous_format
) -> dict[str, Any]:
    """The batch's tensors on ``device`` (asynchronously from pinned memory); 4-d image batches in ``memory_format``."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.dim() == 4 and memory_format is not torch.contiguous_format:
                value = value.contiguous(memory_format=memory_format)
        out[key] = value
    return out


def _in_memory_format(batch: dict[str, Any], memory_format: torch.memory_format) -> dict[str, Any]:
    """The batch with its 4-d image tensors in ``memory_format`` (after the device augmentation, whose resampling
    returns contiguous tensors)."""
    if memory_format is torch.contiguous_format:
        return batch
    return {
        key: value.contiguous(memory_format=memory_format)
        if isinstance(value, torch.Tensor) and value.dim() == 4
        else value
        for key, value in batch.items()
    }


#: Submodules ``train.compile`` compiles in place (``nn.Module.compile``: state-dict keys stay as they are, so
#: checkpoints and federated weights are unchanged). The objectives' glue stays eager: its shapes vary per batch.
COMPILED_SUBMODULES = ("image_encoder", "divergence_image_encoder", "fusion", "text_encoder.bert")


def compile_towers(model: nn.Module) -> list[str]:
    """``torch.compile`` the towers and the fusion head of ``model`` in place; returns the names compiled."""
    done = []
    for name in COMPILED_SUBMODULES:
        module: Any = model
        for part in name.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Module):
            module.compile()
            done.append(name)
    return done


def _batch_size(batch: dict[str, Any]) -> int:
    image = batch.get("image")
    return int(image.shape[0]) if isinstance(image, torch.Tensor) else 0


def _safe_len(obj: Any, default: Any) -> Any:
    try:
        return len(obj)
    except TypeError:
        return default
