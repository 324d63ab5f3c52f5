"""What a site puts under SecAgg+ masking, and how the server reads the unmasked aggregate back (no Flower here).

Why this packing. Flower's ``SecAggPlusWorkflow`` (legacy API, flwr 1.42) hands the strategy one thing: the weighted
mean ``sum_i r_i * x_i / sum_i r_i`` of the sites' float vectors, where ``r_i`` is the FitRes ``num_examples`` over
``max_weight`` and each ``r_i * x_i`` is clipped to ``[-clipping_range, clipping_range]`` and stochastically quantized
(``secaggplus_mod._collect_masked_vectors`` / ``secaggplus_workflow.unmask_stage``). FitRes ``num_examples`` and
metrics travel in the clear, so a site's example count must not be the SecAgg weight. Every site therefore reports
``num_examples = 1`` with ``max_weight = 1`` (r_i = 1 exactly; the plain value says nothing) and puts its real
count inside the masked vector, scaled by a public bound ``S`` (``federation.secagg_max_examples``):

    header  = [a, a*h*loss/LOSS_SCALE, a*h]     a = n_i / S,  h = 1 if the site reports a train loss
    weights = a * w_i (all tensors flattened, concatenated)
    bank    = [sum_image_i, sum_text_i, count_i] / S (flattened, concatenated)

The server gets the plain mean over the m sites whose vectors were summed and recovers exactly what plain
aggregation computes: ``sum(n_i w_i) / sum(n_i) = mean(a w) / mean(a)``, bank totals ``m * S * mean(bank)`` and
``N = m * S * mean(a)``. It learns the total example count and the example-weighted mean loss, never one site's.
Every packed value lies in ``[-1, 1] * max|w|`` because ``n_i <= S``, sums of unit vectors are bounded by their
counts and counts by ``n_i``; a value outside the clipping range is refused here rather than silently clipped.

Precision: stochastic quantization with step ``2 * CLIPPING_RANGE / QUANTIZATION_RANGE`` (~1e-6) per value and
site; the averaged weights carry an error of about ``step * S / n`` and bank totals about ``m * S * step``.
All arrays are 1-d: 0-d arrays come back corrupted from SecAgg+ (a scalar 2.66 came back as 16.6 after one round in Flower 1.42).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mlip_fed.federation.aggregate import BANK_STAT_KEYS
from mlip_fed.federation.payload import SiteUpdate

#: SecAgg+ quantization: values are clipped to +-CLIPPING_RANGE and mapped onto QUANTIZATION_RANGE integers. The sum of
#: m sites' integers must stay below MODULUS_RANGE: 2**32 / 2**24 allows up to 255 sites per round.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**24
MODULUS_RANGE = 2**32
MAX_SITES = MODULUS_RANGE // QUANTIZATION_RANGE - 1
#: A train loss up to CLIPPING_RANGE * LOSS_SCALE fits the clipping range.
LOSS_SCALE = 64.0
#: Order of the packed arrays (one 1-d array each).
PACKED_PARTS = ("header", "weights", "bank")
HEADER_SIZE = 3
#: One quantization step of the SecAgg+ encoding.
QUANTIZATION_STEP = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE


@dataclass
class SecureAggregate:
    """What the server may know after a secure round: sums over the sites, never one site's values."""

    num_sites: int
    total_examples: float
    weights: dict[str, Tensor]  # example-weighted mean, as plain ``weighted_average``
    bank_stats: dict[str, Tensor]  # BANK_STAT_KEYS summed over sites, as plain ``merge_site_banks`` pools them
    train_loss: float | None  # example-weighted mean over the sites that report one (DP sites do not)


def packed_sizes(weight_template: Mapping[str, Tensor], bank_template: Mapping[str, Tensor]) -> list[int]:
    """Length of each packed array for a model; both ends derive it from the same state-dict templates."""
    return [
        HEADER_SIZE,
        sum(t.numel() for t in weight_template.values()),
        sum(bank_template[k].numel() for k in BANK_STAT_KEYS),
    ]


def pack_update(update: SiteUpdate, weight_keys: Sequence[str], scale: float) -> list[Tensor]:
    """Site side: the three float64 1-d arrays SecAgg+ masks; refuses anything SecAgg+ would silently clip."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"secure packing: federation.secagg_max_examples={scale} must be a positive number")
    n = float(update.num_examples)
    if not 0 < n <= scale:
        raise ValueError(
            f"secure packing: site {update.site_id} has num_examples={update.num_examples}, outside (0, "
            f"federation.secagg_max_examples={scale:g}]; raise secagg_max_examples to at least the largest site"
        )
    missing = [k for k in weight_keys if k not in update.weights]
    extra = sorted(set(update.weights) - set(weight_keys))
    if missing or extra:
        raise ValueError(
            f"secure packing: site {update.site_id} weights differ from the request's (missing "
            f"{missing[:5]}, extra {extra[:5]})"
        )
    a = n / scale
    loss = update.metrics.get("train_loss")
    has_loss = loss is not None and math.isfinite(float(loss))
    header = torch.tensor(
        [a, a * float(loss) / LOSS_SCALE if has_loss else 0.0, a if has_loss else 0.0], dtype=torch.float64
    )
    weights = []
    for key in weight_keys:
        tensor = update.weights[key]
        if not torch.is_floating_point(tensor):
            raise ValueError(
                f"secure packing: weight {key!r} has dtype {tensor.dtype}; SecAgg+ can only average floating tensors"
            )
        weights.append(tensor.detach().reshape(-1).to(torch.float64) * a)
    missing_bank = [k for k in BANK_STAT_KEYS if k not in update.bank_stats]
    if missing_bank:
        raise ValueError(f"secure packing: site {update.site_id} bank statistics lack {missing_bank}")
    bank = [update.bank_stats[k].detach().reshape(-1).to(torch.float64) / scale for k in BANK_STAT_KEYS]
    packed = [header, torch.cat(weights) if weights else torch.zeros(0, dtype=torch.float64), torch.cat(bank)]
    for name, array in zip(PACKED_PARTS, packed, strict=True):
        check_in_range(array, f"site {update.site_id} {name}")
    return packed


def check_in_range(array: Tensor, what: str) -> None:
    """A packed value must be finite and inside the clipping range, or SecAgg+ would change it without a word."""
    if array.numel() == 0:
        return
    if not torch.isfinite(array).all():
        raise ValueError(f"secure packing: {what} holds non-finite values")
    peak = float(array.abs().max())
    if peak > CLIPPING_RANGE:
        raise ValueError(
            f"secure packing: {what} reaches |{peak:.4g}| > clipping range {CLIPPING_RANGE}; SecAgg+ would clip it "
            "(a weight this large, or num_examples above federation.secagg_max_examples)"
        )


def unpack_aggregate(
    mean_arrays: Sequence[Tensor],
    num_sites: int,
    scale: float,
    weight_template: Mapping[str, Tensor],
    bank_template: Mapping[str, Tensor],
) -> SecureAggregate:
    """Server side: the unmasked mean over ``num_sites`` packed vectors -> weights, bank totals, example count."""
    if num_sites < 1:
        raise ValueError(f"secure aggregate: num_sites={num_sites}; at least one site must have contributed")
    expected = packed_sizes(weight_template, bank_template)
    if len(mean_arrays) != len(expected):
        raise ValueError(f"secure aggregate: {len(mean_arrays)} arrays, expected {len(expected)} {PACKED_PARTS}")
    arrays = [torch.as_tensor(a).to(torch.float64).reshape(-1) for a in mean_arrays]
    for name, array, size in zip(PACKED_PARTS, arrays, expected, strict=True):
        if array.numel() != size:
            raise ValueError(f"secure aggregate: {name} has {array.numel()} values, the model needs {size}")
        if not torch.isfinite(array).all():
            raise ValueError(f"secure aggregate: {name} holds non-finite values")
    header, flat_weights, flat_bank = arrays
    mean_a = float(header[0])
    if mean_a <= 0:
        raise ValueError(f"secure aggregate: mean example share {mean_a:.3g} <= 0; the sites sent no examples")
    weights: dict[str, Tensor] = {}
    offset = 0
    for key, ref in weight_template.items():
        size = ref.numel()
        weights[key] = (flat_weights[offset : offset + size] / mean_a).reshape(ref.shape).to(ref.dtype)
        offset += size
    bank: dict[str, Tensor] = {}
    offset = 0
    totals = flat_bank * (num_sites * scale)
    for key in BANK_STAT_KEYS:
        ref = bank_template[key]
        size = ref.numel()
        bank[key] = totals[offset : offset + size].reshape(ref.shape).to(torch.float32)
        offset += size
    # Pooled counts are integers for non-DP sites; rounding removes the quantization error (for DP sites' noisy counts
    # it is post-processing) so ``bank_min_count`` decides exactly as in the plain path.
    bank["count"] = bank["count"].round()
    loss_weight = float(header[2])
    train_loss = float(header[1]) / loss_weight * LOSS_SCALE if loss_weight > 0.5 * QUANTIZATION_STEP else None
    return SecureAggregate(
        num_sites=num_sites,
        total_examples=mean_a * num_sites * scale,
        weights=weights,
        bank_stats=bank,
        train_loss=train_loss,
    )


def flatten_request(
    weights: Mapping[str, Tensor], bank: Mapping[str, Tensor]
) -> tuple[list[Tensor], list[str], list[str]]:
    """Server -> site under SecAgg+: legacy ``FitIns`` carries a list of arrays, so names travel beside them.

    Every array is sent at least 1-d (the 0-d SecAgg+ bug) and restored to its shape by ``unflatten_request``.
    """
    names = list(weights) + list(bank)
    arrays = [
        t.detach().cpu().reshape(-1) if t.dim() == 0 else t.detach().cpu() for t in [*weights.values(), *bank.values()]
    ]
    shapes = [",".join(str(d) for d in t.shape) for t in [*weights.values(), *bank.values()]]
    return arrays, names, shapes


def unflatten_request(
    arrays: Sequence[Tensor], names: Sequence[str], shapes: Sequence[str], num_weights: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Inverse of ``flatten_request``: (weights, bank) with their original shapes."""
    if not len(arrays) == len(names) == len(shapes) or not 0 <= num_weights <= len(names):
        raise ValueError(
            f"secure request: {len(arrays)} arrays, {len(names)} names, {len(shapes)} shapes, {num_weights} weights"
        )
    out: list[tuple[str, Tensor]] = []
    for name, array, shape_text in zip(names, arrays, shapes, strict=True):
        shape = tuple(int(d) for d in shape_text.split(",")) if shape_text else ()
        tensor = torch.as_tensor(array)
        if tensor.numel() != math.prod(shape):
            raise ValueError(f"secure request: {name!r} has {tensor.numel()} values for shape {shape}")
        out.append((name, tensor.reshape(shape)))
    return dict(out[:num_weights]), dict(out[num_weights:])
