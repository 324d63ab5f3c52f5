"""Bucketed-clipping DP-SGD gradient for MLIP, on Opacus' per-sample gradient machinery.

Why not ``make_private``: Opacus clips each record's *path gradient*, but with in-batch negatives
every record's gradient depends on the others, so one patient can move the clipped sum by
(2B-1)C and the reported epsilon is invalid (docs/privacy.md; ``tests/test_privacy_sensitivity.py`` shows it). Here the model runs with
``batch["group_ids"]`` = patient-hash bucket, so each bucket's loss depends only on its members.
Opacus hooks give per-row gradients ``p.grad_sample``; summing the rows of a bucket gives exactly
that bucket's gradient (row r of a layer belongs to sample r mod B: the ITM fusion sees 3B rows).
Each bucket's flat gradient (all trainable parameters) is clipped to C, the clipped buckets are
summed, N(0, sigma^2 C^2) is added and the result is divided by the number of buckets M (a public
constant, so the normalisation depends on no record). Adding or removing one patient changes one
bucket's clipped vector: sensitivity 2C, accounted as a Poisson-subsampled Gaussian with noise
multiplier sigma/2 at the patient (or record) sampling rate q.

Parameters: every trainable parameter gets a per-sample gradient from Opacus (registered samplers
for Linear/Conv/LayerNorm/GroupNorm/Embedding, functorch fallback for modules that own raw
parameters such as the ViT position embeddings), so nothing is frozen by the engine; the EMA
divergence encoder and frozen knowledge prototypes have no gradients. An unsupported parameter is
an error, never silently skipped.

Audit extension point: ``extra_unit_gradients`` lets the one-run audit (``mlip_fed.privacy.gradient_canaries``)
add white-box canary units: each is a privacy unit of its own whose gradient is given directly, clipped to C like a
bucket and summed *before* the noise, so the audit exercises this engine's noise and normalisation unchanged.
Training code never passes it.

Randomness (``mlip_fed.privacy.randomness``): the noise and the Poisson sample are secret by default -- seeded
from OS entropy in this process, never from values the server knows (the run config's seed, the run id, the round),
which would let it regenerate the noise and subtract it. ``secure_mode`` (default on) reseeds the noise generator
from OS entropy for every tensor and applies Opacus' floating-point mitigation. An explicit ``seed`` makes a run
reproducible (tests, the canary-audit harness, ``privacy.insecure_reproducible_noise``) and is never private.

Privacy unit in decomposable mode: ``unit="patient"`` groups a batch's records by ``patient_id`` and clips each
patient's summed gradient (the loss is a sum of per-record terms, so the patient's gradient is the sum of its
records'), so adding or removing a patient moves the clipped sum by at most C, as accounted. Clipping each record
instead (``unit="record"``) bounds a patient with k records only by kC.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from opacus import GradSampleModule
from torch import nn

from mlip_fed.model.objectives.public_negatives import PublicNegativesLoss
from mlip_fed.privacy.buckets import bucket_ids
from mlip_fed.privacy.opacus_logging import drop_opacus_root_handler
from mlip_fed.privacy.randomness import GaussianNoise, public_seed, secret_seed

drop_opacus_root_handler()  # importing opacus added a root log handler: Flower's DEBUG lines on the console

#: torch's message when a module's full backward hook fires and none of its inputs requires a gradient (a regex).
FULL_BACKWARD_HOOK_WARNING = r"Full backward hook is firing when gradients are computed with respect to module outputs"

Mode = Literal["bucketed", "decomposable"]
SENSITIVITY_FACTOR: dict[str, float] = {"bucketed": 2.0, "decomposable": 1.0}
"""Add/remove sensitivity in units of C; the accountant sees noise multiplier sigma / factor."""


def effective_noise_multiplier(mode: str, noise_multiplier: float) -> float:
    if mode not in SENSITIVITY_FACTOR:
        raise ValueError(f"unknown DP mechanism {mode!r}; expected one of {sorted(SENSITIVITY_FACTOR)}")
    return noise_multiplier / SENSITIVITY_FACTOR[mode]


def empty_batch() -> dict[str, Any]:
    """What a Poisson step that sampled nobody yields: the trainer still calls the gradient fn (noise step)."""
    return {"image": torch.zeros(0), "patient_id": [], "group_ids": torch.zeros(0, dtype=torch.long)}


class PoissonLoader:
    """Poisson sampling of privacy units (patients or records) at rate q, ``int(1/q)`` steps per epoch.

    Each step includes every unit independently with probability q and yields all records of the included
    units (an empty step yields ``empty_batch()``; it must still take a noise step). Draws are seeded by
    (seed, epoch, step), so a resumed epoch replays the same batches. ``batch["group_ids"]`` holds each
    record's patient bucket. ``seed=None`` (default) draws a secret seed from OS entropy: who was sampled must stay
    unknown to the server (amplification by sampling assumes it). A given seed is reproducible and public.
    """

    def __init__(
        self,
        dataset: Any,
        collate_fn: Callable[[list[Any]], dict[str, Any]],
        patient_ids: Sequence[str],
        sample_rate: float,
        *,
        num_buckets: int,
        unit: Literal["patient", "record"] = "patient",
        steps_per_epoch: int | None = None,
        seed: int | None = None,
        loader_options: dict[str, Any] | None = None,
    ) -> None:
        """``loader_options``: ``DataLoader`` keyword arguments (``pipeline.loader_options``); with ``num_workers``
        > 0 the records are read, augmented and collated in worker processes. Only record indices reach a worker:
        the sampling (and its secret seed) stays in this process."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"PoissonLoader: sample_rate must be in (0, 1], got {sample_rate}")
        if len(patient_ids) != len(dataset):
            raise ValueError(f"PoissonLoader: {len(patient_ids)} patient ids for a dataset of {len(dataset)} records")
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.sample_rate = sample_rate
        self.num_buckets = num_buckets
        self.unit = unit
        self.seed = secret_seed() if seed is None else seed
        self.epoch = 0
        self.steps_per_epoch = steps_per_epoch or max(1, int(1 / sample_rate))
        keys = [str(p) for p in patient_ids] if unit == "patient" else [str(i) for i in range(len(patient_ids))]
        units: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            units.setdefault(key, []).append(index)
        self._unit_records = list(units.values())
        self._patient_ids = [str(p) for p in patient_ids]
        self.loader_options = dict(loader_options or {})

    @property
    def num_units(self) -> int:
        return len(self._unit_records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def sample_indices(self, epoch: int, step: int) -> list[int]:
        generator = torch.Generator().manual_seed(public_seed("poisson", self.seed, epoch, step))
        chosen = (torch.rand(self.num_units, generator=generator) < self.sample_rate).nonzero(as_tuple=True)[0]
        return [i for u in chosen.tolist() for i in self._unit_records[u]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._collated():
            if batch is None:  # nobody sampled, or every sampled image undecodable: the step still happens
                yield empty_batch()
                continue
            batch["group_ids"] = bucket_ids(batch["patient_id"], self.num_buckets)
            yield batch

    def _collated(self) -> Iterator[dict[str, Any] | None]:
        """The epoch's collated batches (None for an empty one), in this process or in loader workers."""
        steps = [self.sample_indices(self.epoch, step) for step in range(self.steps_per_epoch)]
        collate = _CollateOrNone(self.collate_fn)
        if self.loader_options.get("num_workers", 0) > 0:
            from torch.utils.data import DataLoader

            yield from DataLoader(self.dataset, batch_sampler=steps, collate_fn=collate, **self.loader_options)
            return
        for indices in steps:
            yield collate([self.dataset[i] for i in indices])


class _CollateOrNone:
    """Drops undecodable items (None) and collates the rest; None when nothing is left (picklable for workers)."""

    def __init__(self, collate_fn: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[Any]) -> dict[str, Any] | None:
        items = [it for it in items if it is not None]
        return self.collate_fn(items) if items else None


@dataclass
class StepStats:
    batch_size: int
    num_buckets_nonempty: int
    clipped_fraction: float
    mean_bucket_norm: float
    extra_units: int = 0


@dataclass(frozen=True)
class UnitGradient:
    """One extra privacy unit's gradient, sparse on one parameter: ``value`` at flat positions ``index`` of
    ``BucketedClippingGradient.params[param]``. The engine clips it to C as a whole (like a bucket)."""

    param: int
    index: torch.Tensor
    value: torch.Tensor


ExtraUnitGradients = Callable[[int], Sequence[UnitGradient]]
"""noise-step number -> the extra units sampled into that step (see ``BucketedClippingGradient``)."""


#: Relative head-room of the clip factor: fp32 rounding of the factor and of each clipped element (2 x 2^-24 at most)
#: can then never lift a clipped unit's norm above C, whatever its unclipped norm (the absolute 1e-6 alone cannot
#: cover a large norm).
CLIP_MARGIN = 2.0**-20


def clip_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-unit gradients, clip factors, clipped sums and noise: float32, or float64 for float64 models.
    Never bf16/fp16, whatever autocast or the parameters use."""
    return torch.promote_types(dtype, torch.float32)


def clip_factors(norms: torch.Tensor, clipping_norm: float) -> torch.Tensor:
    """min(1, C / norm) per unit, in float64, shrunk by ``CLIP_MARGIN`` so the clipped fp32 vector's norm is <= C."""
    norms = norms.to(torch.float64)
    return (clipping_norm / (norms * (1 + CLIP_MARGIN) + 1e-6)).clamp(max=1.0)


class BucketedClippingGradient:
    """``GradientFn`` (see ``mlip_fed.train.trainer``) doing bucketed (or per-record) clipping plus Gaussian noise.

    ``mode="bucketed"``: groups = ``batch["group_ids"]`` (patient buckets; recomputed from ``patient_id`` if absent);
    the model's loss must be group-masked (MLIPModel does it when it sees ``group_ids``). Sensitivity 2C.
    ``mode="decomposable"``: every record is its own group and the loss is ``loss_fn`` (default:
    ``PublicNegativesLoss``), whose record-k term depends on record k and public data only. ``unit`` says what is
    clipped: ``"patient"`` sums each patient's records' gradients (``batch["patient_id"]``) and clips the sum,
    ``"record"`` clips every record. Sensitivity C per unit.

    ``seed=None``: secret noise (OS entropy); ``secure_mode``: reseeded per tensor plus the floating-point
    mitigation (see ``mlip_fed.privacy.randomness``). A given ``seed`` is reproducible and never private.

    Call ``close()`` to remove the Opacus hooks. ``steps`` counts noise steps (empty batches included): that is
    what the ledger must be charged with.

    ``extra_unit_gradients`` (audits only): called with the noise-step number before the noise is drawn; each
    returned ``UnitGradient`` is one more privacy unit, clipped to C and added to the clipped sum of that step.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        num_buckets: int,
        mode: Mode = "bucketed",
        seed: int | None = None,
        secure_mode: bool = True,
        unit: Literal["patient", "record"] = "record",
        loss_fn: Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None,
        extra_unit_gradients: ExtraUnitGradients | None = None,
    ) -> None:
        if noise_multiplier < 0 or clipping_norm <= 0 or num_buckets < 1:
            raise ValueError(
                f"BucketedClippingGradient: need noise_multiplier >= 0 (got {noise_multiplier}), clipping_norm > 0 "
                f"(got {clipping_norm}), num_buckets >= 1 (got {num_buckets})"
            )
        if mode not in SENSITIVITY_FACTOR:
            raise ValueError(f"BucketedClippingGradient: unknown mode {mode!r}")
        if unit not in ("patient", "record"):
            raise ValueError(f"BucketedClippingGradient: unknown privacy unit {unit!r}")
        if mode == "decomposable" and loss_fn is None:
            loss_fn = PublicNegativesLoss(model)
        self.model = model
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.num_buckets = num_buckets
        self.mode = mode
        self.unit = unit
        self.loss_fn = loss_fn
        self.extra_unit_gradients = extra_unit_gradients
        self.noise = GaussianNoise(None if seed is None else public_seed("noise", seed), secure_mode=secure_mode)
        self.generator = self.noise.generator
        self.steps = 0
        self.last_stats: StepStats | None = None
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters, in the order ``UnitGradient.param`` indexes them."""
        return list(self._params)

    @property
    def effective_noise_multiplier(self) -> float:
        return effective_noise_multiplier(self.mode, self.noise_multiplier)

    def close(self) -> None:
        self._gsm._close()

    # ------------------------------------------------------------------ gradient
    def __call__(self, model: nn.Module, batch: dict[str, Any], loss_scale: float) -> dict[str, float]:
        if model is not self.model:
            raise ValueError(
                "BucketedClippingGradient was built for another model object (its hooks are not on this one)"
            )
        previous = [p.grad for p in self._params]  # earlier micro-batches' private gradients (already noised)
        for p in self._params:
            p.grad = None
        summed, parts = self.clipped_sum(batch)
        if self.extra_unit_gradients is not None:
            self.add_extra_units(summed, self.extra_unit_gradients(self.steps))
        scale = loss_scale / self.num_buckets
        std = self.noise_multiplier * self.clipping_norm
        for p, s, prev in zip(self._params, summed, previous, strict=True):
            # Noise drawn on the parameter's device, added in fp32 (or wider) to the fp32 clipped sum; only the
            # released private gradient is rounded to the parameter's dtype (post-processing).
            noise = self.noise.sample(p.shape, std, device=s.device)
            private = ((s + noise) * scale).to(p.dtype)
            p.grad = private if prev is None else prev + private
        self.steps += 1
        return parts

    def add_extra_units(self, summed: list[torch.Tensor], units: Sequence[UnitGradient]) -> None:
        """Clip each extra unit to C and add it to ``summed`` in place (the noiseless clipped sum of a step)."""
        for unit in units:
            if not 0 <= unit.param < len(self._params):
                raise ValueError(
                    f"extra unit gradient: parameter index {unit.param} outside 0..{len(self._params) - 1}"
                )
            target = summed[unit.param].view(-1)
            value = unit.value.to(target.device, target.dtype).reshape(-1)
            index = unit.index.to(target.device).reshape(-1)
            if index.shape != value.shape or (index.numel() and int(index.max()) >= target.numel()):
                raise ValueError(
                    f"extra unit gradient on {self._names.get(id(self._params[unit.param]), '?')!r}: "
                    f"{index.numel()} indices for {value.numel()} values, parameter size {target.numel()}"
                )
            factor = clip_factors(value.double().norm().reshape(1).cpu(), self.clipping_norm)
            target.index_add_(0, index, value * factor.to(target.device, target.dtype))
        if self.last_stats is not None:
            self.last_stats.extra_units = len(units)

    def clipped_sum(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Noiseless Σ_buckets clip(G_bucket, C) per trainable parameter, and the loss parts (floats).

        Exposed for the sensitivity tests; the training step adds noise on top.
        """
        image = batch.get("image")
        n = int(image.shape[0]) if isinstance(image, torch.Tensor) else 0
        if n == 0:
            self.last_stats = StepStats(0, 0, 0.0, 0.0)
            return [torch.zeros_like(p, dtype=clip_dtype(p.dtype)) for p in self._params], {"total": 0.0}
        groups = self._groups(batch, n)
        uniq, row_group = torch.unique(groups, return_inverse=True)
        num_groups = int(uniq.numel())
        if self.mode == "decomposable":
            assert self.loss_fn is not None
            total, parts_t = self.loss_fn(self.model, batch)
        else:
            output = self.model({**batch, "group_ids": groups})
            total, parts_t = output.total, output.parts
        # total is a mean over the n samples of per-sample terms; n*total is a sum of per-group terms.
        with warnings.catch_warnings():
            # The first layers (patch conv on the image, token embedding on the ids) see inputs that need no gradient,
            # so torch warns that their full backward hook gets no grad_input, on every step of every site. Opacus's
            # hook (capture_backprops_hook) reads only grad_output: nothing is missing, so this one message is muted.
            warnings.filterwarnings("ignore", message=FULL_BACKWARD_HOOK_WARNING, category=UserWarning)
            (total * n).backward()
        per_bucket = self._bucket_gradients(row_group.cpu(), n, num_groups)  # fp32 (or wider) per bucket
        sq = torch.zeros(num_groups, dtype=torch.float64)
        for g in per_bucket:
            if g is not None:
                sq += g.detach().flatten(1).double().pow(2).sum(dim=1).cpu()
        norms = sq.sqrt()
        factor = clip_factors(norms, self.clipping_norm)
        summed = []
        for p, g in zip(self._params, per_bucket, strict=True):
            if g is None:
                summed.append(torch.zeros_like(p, dtype=clip_dtype(p.dtype)))
            else:
                f = factor.to(g.device, g.dtype).view(-1, *([1] * (g.dim() - 1)))
                summed.append((g * f).sum(dim=0))
            p.grad = None
        self.last_stats = StepStats(
            n, num_groups, float((norms > self.clipping_norm).float().mean()), float(norms.mean())
        )
        parts = {name: float(value.detach()) for name, value in parts_t.items()}
        parts["total"] = float(total.detach())
        return summed, parts

    def _groups(self, batch: dict[str, Any], n: int) -> torch.Tensor:
        if self.mode == "decomposable":
            if self.unit == "record":
                return torch.arange(n)
            if "patient_id" not in batch:
                raise KeyError("per-patient clipping (unit='patient') needs batch['patient_id']")
            index: dict[str, int] = {}
            return torch.tensor([index.setdefault(str(p), len(index)) for p in batch["patient_id"]], dtype=torch.long)
        groups = batch.get("group_ids")
        if groups is None:
            if "patient_id" not in batch:
                raise KeyError("bucketed clipping needs batch['group_ids'] or batch['patient_id'] (use PoissonLoader)")
            groups = bucket_ids(batch["patient_id"], self.num_buckets)
        groups = torch.as_tensor(groups, dtype=torch.long)
        if groups.shape != (n,):
            raise ValueError(f"batch['group_ids'] has shape {tuple(groups.shape)}, expected [{n}]")
        return groups

    def _bucket_gradients(self, row_group: torch.Tensor, n: int, num_groups: int) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for p in self._params:
            gs = getattr(p, "grad_sample", None)
            name = self._names.get(id(p), "?")
            if gs is None:
                if p.grad is not None and bool(p.grad.abs().sum() > 0):
                    raise RuntimeError(f"DP: parameter {name!r} has a gradient but Opacus computed no grad_sample")
                out.append(None)
                continue
            if isinstance(gs, list):
                raise RuntimeError(f"DP: parameter {name!r} accumulated several grad_samples (stale hooks?)")
            rows = gs.shape[0]
            if rows % n:
                raise RuntimeError(f"DP: parameter {name!r} has {rows} per-sample rows, not a multiple of batch {n}")
            index = row_group.repeat(rows // n).to(gs.device)
            # Summed in fp32 even when autocast or bf16 parameters made the per-sample rows bf16 (bf16 sums and clip
            # factors let a clipped bucket's norm exceed C by ~0.3 %, more than the accountant allows).
            bucket = torch.zeros((num_groups, *gs.shape[1:]), dtype=clip_dtype(gs.dtype), device=gs.device)
            bucket.index_add_(0, index, gs.to(bucket.dtype))
            out.append(bucket)
            p.grad_sample = None
        return out
