"""fp16/bf16 transport in ``mlip_wire/codec.py``: bytes halve, values round-trip within the format's precision,
float32 comes back, counts and integer tensors travel untouched, bad settings fail with a clear error."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from mlip_fed.config import FederationConfig
from mlip_fed.federation.payload import RoundRequest, SiteUpdate
from mlip_wire.codec import (
    TRANSPORT,
    decode_request,
    decode_update,
    encode_request,
    encode_update,
    transport_dtype_of,
)

K, D = 14, 32
#: Relative rounding error of one cast: half an ulp (10 mantissa bits for float16, 7 for bfloat16).
REL_ERR = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


pytestmark = pytest.mark.usefixtures("task_identity")


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.weight": torch.randn(256, 128, generator=g),
        "encoder.bias": torch.randn(128, generator=g) * 1e-3,
        "norm.num_batches_tracked": torch.tensor(12345, dtype=torch.long),
        "buffer.int16": torch.arange(-5, 5, dtype=torch.int16),
    }


def _update() -> SiteUpdate:
    g = torch.Generator().manual_seed(1)
    count = torch.arange(K, dtype=torch.float32) * 1000.0 + 3.0  # > 2048: float16 would round these
    return SiteUpdate(
        "site_0",
        7,
        _weights(),
        {"sum_image": torch.randn(K, D, generator=g), "sum_text": torch.randn(K, D, generator=g), "count": count},
        {"train_loss": 1.5},
    )


def _request() -> RoundRequest:
    g = torch.Generator().manual_seed(2)
    bank = {
        "prototypes_image": torch.randn(K, D, generator=g),
        "prototypes_text": torch.randn(K, D, generator=g),
        "initialized": torch.ones(K, dtype=torch.bool),
    }
    return RoundRequest(3, _weights(), bank, {"server-round": 3, "run-id": "r"})


def _wire_bytes(content: RecordDict) -> int:
    return recorddict_to_proto(content).ByteSize()


def _array_bytes(content: RecordDict, name: str) -> int:
    return sum(len(content.array_records[name][k].data) for k in content.array_records[name].keys())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_transport_halves_bytes(dtype: str) -> None:
    full, half = encode_update(_update()), encode_update(_update(), dtype)
    raw = sum(t.numel() * t.element_size() for t in _weights().values() if t.dtype == torch.float32)
    # every float32 weight tensor loses 2 of its 4 bytes; ints and per-array .npy headers are unchanged
    assert _array_bytes(full, "weights") - _array_bytes(half, "weights") == raw // 2
    assert _wire_bytes(half) < 0.52 * _wire_bytes(full)
    req_full, req_half = encode_request(_request()), encode_request(_request(), dtype)
    assert _wire_bytes(req_half) < 0.52 * _wire_bytes(req_full)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_restores_float32_within_precision(dtype: str) -> None:
    sent = _update()
    content = encode_update(sent, dtype)
    assert transport_dtype_of(content) == dtype
    got = decode_update(content)
    for key in ("encoder.weight", "encoder.bias"):
        assert got.weights[key].dtype == torch.float32
        err = (got.weights[key] - sent.weights[key]).abs()
        assert torch.all(err <= sent.weights[key].abs() * REL_ERR[dtype] + 1e-7), key
        assert err.max() > 0  # it really travelled in half precision
    for key in ("sum_image", "sum_text"):
        assert got.bank_stats[key].dtype == torch.float32
        assert torch.allclose(got.bank_stats[key], sent.bank_stats[key], rtol=REL_ERR[dtype], atol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_counts_flags_and_ints_untouched(dtype: str) -> None:
    sent = _update()
    got = decode_update(encode_update(sent, dtype))
    assert torch.equal(got.bank_stats["count"], sent.bank_stats["count"])
    assert got.bank_stats["count"].dtype == torch.float32
    for key in ("norm.num_batches_tracked", "buffer.int16"):
        assert got.weights[key].dtype == sent.weights[key].dtype
        assert torch.equal(got.weights[key], sent.weights[key])
    request = _request()
    back = decode_request(encode_request(request, dtype))
    assert back.bank["initialized"].dtype == torch.bool and bool(back.bank["initialized"].all())
    assert back.bank["prototypes_image"].dtype == torch.float32
    assert back.weights["buffer.int16"].dtype == torch.int16


def test_float32_transport_is_exact_and_tensors_writable() -> None:
    sent = _update()
    got = decode_update(encode_update(sent))
    for key, value in sent.weights.items():
        assert torch.equal(got.weights[key], value)
    got.weights["encoder.weight"].add_(1.0)  # decoded tensors own writable memory


def test_message_without_transport_record_decodes_as_float32() -> None:
    content = encode_update(_update())
    del content[TRANSPORT]
    assert transport_dtype_of(content) == "float32"
    assert torch.equal(decode_update(content).weights["encoder.weight"], _weights()["encoder.weight"])


def test_bad_transport_dtype_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"transport_dtype='float8'"):
        encode_update(_update(), "float8")
    content = encode_update(_update(), "float16")
    content[TRANSPORT] = ConfigRecord({"dtype": "int8"})
    with pytest.raises(ValueError, match="int8"):
        decode_update(content)
    content[TRANSPORT] = ConfigRecord({"dtype": "bfloat16", "weights-cast": ["encoder.weight"]})
    with pytest.raises(ValueError, match="arrived as float16, expected int16"):
        decode_update(content)
    content[TRANSPORT] = ConfigRecord({"dtype": "float16", "weights-cast": ["no.such.key"]})
    with pytest.raises(ValueError, match="no.such.key"):
        decode_update(content)


def test_config_field_validates() -> None:
    assert FederationConfig().transport_dtype == "float32"
    assert FederationConfig(transport_dtype="bfloat16").transport_dtype == "bfloat16"
    with pytest.raises(ValueError, match="transport_dtype"):
        FederationConfig(transport_dtype="float64")  # type: ignore[arg-type]
