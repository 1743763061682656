"""Update compression: stated error bounds, byte counts, error feedback, hostile payloads."""

import math
import re
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.federated import compression as cz
from fedguard.federated.compression import CompressionSpec, ErrorFeedback, Payload, PayloadError

A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
A1 = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
B1 = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


def delta(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    d = {A0: torch.randn(8, 96, generator=g), B0: torch.randn(96, 8, generator=g) * 1e-3,
         A1: torch.randn(8, 250, generator=g), B1: torch.randn(40, 8, generator=g) * 0.05}
    d[A1][3, 7] = 25.0  # an outlier
    return {k: v.to(dtype) for k, v in d.items()}


def shapes(d):
    return {k: tuple(v.shape) for k, v in d.items()}


def roundtrip(spec, d):
    codec = cz.build_codec(spec)
    payload = codec.encode(d)
    blob = cz.payload_to_bytes(payload)  # what goes over the wire
    out = codec.decode(cz.payload_from_bytes(blob), shapes(d))
    assert set(out) == set(d)
    for k in d:
        assert out[k].shape == d[k].shape and out[k].dtype == d[k].dtype
    return payload, out


# --- round trips within the stated bounds --------------------------------------------------------

@pytest.mark.parametrize("kind, eps", [("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
def test_half_precision_relative_error(kind, eps):
    d = delta()
    payload, out = roundtrip(kind, d)
    for k in d:
        x = d[k].double()
        normal = x.abs() >= 2.0 ** -14
        err = (out[k].double() - x).abs()
        assert bool((err[normal] <= eps * x[normal].abs()).all())
        assert bool((err[~normal] <= 2.0 ** -25).all()) or kind == "bf16"
    assert cz.state_nbytes(payload.tensors) * 2 == cz.state_nbytes(d)  # exactly half of fp32


def test_fp16_refuses_overflow():
    with pytest.raises(ValueError, match="overflows float16"):
        cz.build_codec("fp16").encode({A0: torch.full((2, 2), 7e4)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_int8_per_tensor_bound(dtype):
    d = delta(1, dtype)
    payload, out = roundtrip("int8", d)
    for k in d:
        scale = float(payload.tensors[f"{k}::scale"])
        assert scale == pytest.approx(float(d[k].abs().max()) / 127, rel=1e-7)
        err = (out[k].double() - d[k].double()).abs()
        ulp = torch.finfo(dtype).eps / 2 * d[k].double().abs()
        assert bool((err <= scale / 2 + ulp).all())
        assert payload.tensors[f"{k}::q"].dtype == torch.int8
    n = sum(v.numel() for v in d.values())
    assert cz.state_nbytes(payload.tensors) == n + 4 * len(d)
    assert cz.state_nbytes(payload.tensors) < 0.26 * cz.state_nbytes(d) * (4 / d[A0].element_size())


@pytest.mark.parametrize("block", [64, 256])
def test_int8_blockwise_bound_per_block(block):
    d = delta(2)
    payload, out = roundtrip(CompressionSpec("int8_block", block_size=block), d)
    for k in d:
        flat, got = d[k].reshape(-1).double(), out[k].reshape(-1).double()
        scales = payload.tensors[f"{k}::scale"].double()
        assert scales.numel() == math.ceil(flat.numel() / block)
        per_entry = scales.repeat_interleave(block)[: flat.numel()]
        blocks_absmax = torch.stack([flat[i:i + block].abs().max() for i in range(0, flat.numel(), block)])
        assert torch.allclose(scales, blocks_absmax / 127, rtol=1e-7)
        assert bool(((got - flat).abs() <= per_entry / 2 + 2.0 ** -24 * flat.abs()).all())
    n = sum(v.numel() for v in d.values())
    assert cz.state_nbytes(payload.tensors) == n + 4 * sum(math.ceil(v.numel() / block) for v in d.values())
    # the outlier only coarsens its own block: elsewhere blockwise is far finer than per-tensor
    _, per_tensor = roundtrip("int8", d)
    other = torch.ones(d[A1].numel(), dtype=torch.bool)
    start = (3 * 250 + 7) // block * block
    other[start:start + block] = False
    err_block = (out[A1] - d[A1]).reshape(-1)[other].abs().mean()
    err_tensor = (per_tensor[A1] - d[A1]).reshape(-1)[other].abs().mean()
    assert err_block < 0.2 * err_tensor


def test_topk_keeps_largest_exactly():
    d = delta(3)
    frac = 0.1
    payload, out = roundtrip(CompressionSpec("topk", topk_fraction=frac), d)
    total_k = 0
    for k in d:
        n = d[k].numel()
        kk = math.ceil(frac * n)
        total_k += kk
        kept = out[k] != 0
        assert int(kept.sum()) == kk
        assert torch.equal(out[k][kept], d[k][kept])  # exact on kept entries
        assert float(d[k][kept].abs().min()) >= float(d[k][~kept].abs().max())
        assert payload.tensors[f"{k}::indices"].dtype == torch.int32
    assert cz.state_nbytes(payload.tensors) == total_k * (4 + 4)
    assert cz.state_nbytes(payload.tensors) == pytest.approx(frac * 2 * cz.state_nbytes(d), rel=0.05)
    # a tiny fraction still sends at least one entry per tensor; fraction 1 is lossless
    assert cz.build_codec(CompressionSpec("topk", topk_fraction=1e-9)).encode(d).tensors[f"{A0}::values"].numel() == 1
    _, full = roundtrip(CompressionSpec("topk", topk_fraction=1.0), d)
    assert all(torch.equal(full[k], d[k]) for k in d)


def test_payload_metadata_is_json_and_meters_it():
    payload = cz.build_codec(CompressionSpec("int8_block", block_size=64)).encode(delta())
    assert payload.meta["codec"] == "int8_block" and payload.meta["params"] == {"block_size": 64}
    assert payload.meta["tensors"][A0] == {"shape": [8, 96], "dtype": "float32", "block_size": 64}
    blob = cz.payload_to_bytes(payload)  # the metadata travels in the safetensors header, apart from the data
    (header,) = struct.unpack("<Q", blob[:8])
    assert len(blob) == 8 + header + cz.state_nbytes(payload.tensors)
    assert cz.payload_from_bytes(blob).meta == payload.meta


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 700), block=st.sampled_from([1, 7, 64, 256]), seed=st.integers(0, 10_000),
       log_scale=st.floats(-20, 10))
def test_property_int8_block_bound(n, block, seed, log_scale):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2.0 ** log_scale
    codec = cz.build_codec(CompressionSpec("int8_block", block_size=block))
    payload = codec.encode({A0: x})
    got = codec.decode(payload, {A0: (n,)})[A0]
    per_entry = payload.tensors[f"{A0}::scale"].double().repeat_interleave(block)[:n]
    assert bool(((got - x).abs() <= per_entry / 2 * (1 + 1e-12)).all())


# --- error feedback -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [CompressionSpec("topk", topk_fraction=0.05), CompressionSpec("int8")])
def test_error_feedback_invariant(spec):
    codec = cz.build_codec(spec)
    ef = ErrorFeedback(dtype=torch.float64)
    true_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in delta().items()}
    dec_sum = {k: torch.zeros_like(v) for k, v in true_sum.items()}
    for t in range(8):
        d = delta(100 + t, torch.float64)
        payload = ef.step(codec, d)
        got = codec.decode(payload, shapes(d))
        for k in d:
            true_sum[k] += d[k]
            dec_sum[k] += got[k]
    for k in true_sum:
        assert torch.allclose(dec_sum[k] + ef.residual[k], true_sum[k], rtol=0, atol=1e-12)
    assert any(bool(r.any()) for r in ef.residual.values())


def test_error_feedback_delivers_a_persistent_direction():
    """Top-k without memory never sends the small persistent coordinates; with memory it does."""
    codec = cz.build_codec(CompressionSpec("topk", topk_fraction=0.1))
    g = torch.Generator().manual_seed(0)
    drift = torch.linspace(0.01, 0.02, 200)  # small, consistent everywhere
    ef, plain_sum, ef_sum, true_sum = ErrorFeedback(), torch.zeros(200), torch.zeros(200), torch.zeros(200)
    head = torch.arange(200) < 20
    for _ in range(100):
        noise = torch.randn(200, generator=g)
        d = {A0: drift + head * noise.sign() * (0.05 + 0.1 * noise.abs())}
        true_sum += d[A0]
        plain_sum += codec.decode(codec.encode(d), {A0: (200,)})[A0]
        ef_sum += codec.decode(ef.step(codec, d), {A0: (200,)})[A0]
    assert torch.allclose(ef_sum + ef.residual[A0], true_sum, atol=1e-4)
    tail = slice(20, 200)
    assert float(plain_sum[tail].abs().max()) == 0.0
    assert float((ef_sum - true_sum)[tail].norm()) < 0.1 * float(true_sum[tail].norm())  # 0.068 here, plain: 1.0


def test_error_feedback_checkpoint_round_trip():
    codec = cz.build_codec(CompressionSpec("topk", topk_fraction=0.1))
    a = ErrorFeedback()
    a.step(codec, delta(1))
    b = ErrorFeedback()
    b.load_state_dict(a.state_dict())
    pa, pb = a.step(codec, delta(2)), b.step(codec, delta(2))
    assert all(torch.equal(pa.tensors[k], pb.tensors[k]) for k in pa.tensors)
    assert all(torch.equal(a.residual[k], b.residual[k]) for k in a.residual)
    with pytest.raises(ValueError, match="keys changed"):
        a.step(codec, {A0: torch.zeros(8, 96)})
    with pytest.raises(ValueError, match="finite"):
        ErrorFeedback().load_state_dict({A0: torch.tensor([float("nan")])})


def test_delta_helpers_round_trip():
    ref, local = delta(5), delta(6)
    d = cz.delta_from(local, ref)
    back = cz.apply_delta(ref, d)
    assert all(torch.allclose(back[k], local[k], atol=1e-6) for k in local)
    with pytest.raises(ValueError, match="keys differ"):
        cz.delta_from({A0: local[A0]}, ref)


# --- hostile payloads ---------------------------------------------------------------------------

def _mutated(kind, mutate, **spec):
    codec = cz.build_codec(CompressionSpec(kind, **spec))
    d = {A0: torch.randn(8, 96, generator=torch.Generator().manual_seed(9)), B0: torch.randn(96, 8) * 1e-3}
    payload = codec.encode(d)
    mutate(payload)
    return codec, payload, shapes(d)


def _set(name, value):
    return lambda p: p.tensors.__setitem__(name, value)


def _meta(key, field, value):
    return lambda p: p.meta["tensors"][key].__setitem__(field, value)


MALFORMED = [
    ("fp16", lambda p: p.meta.__setitem__("codec", "int8"), "encoded with codec 'int8'"),
    ("fp16", lambda p: p.meta.__setitem__("format", 99), "format"),
    ("fp16", lambda p: p.meta.__setitem__("tensors", []), "'tensors' table"),
    ("fp16", lambda p: p.tensors.pop(f"{A0}::data"), A0),
    ("fp16", _set("extra::data", torch.zeros(3, dtype=torch.float16)), "no key's metadata claims"),
    ("fp16", _meta(A0, "shape", [8, 97]), A0),
    ("fp16", _meta(A0, "shape", [8, -96]), A0),
    ("fp16", _meta(A0, "shape", "8x96"), A0),
    ("fp16", _meta(A0, "dtype", "int64"), A0),
    ("fp16", lambda p: p.meta["tensors"].pop(B0), "missing"),
    ("fp16", _set(f"{A0}::data", torch.full((768,), float("nan"), dtype=torch.float16)), A0),
    ("fp16", _set(f"{A0}::data", torch.zeros(768, dtype=torch.float64)), A0),
    ("fp16", _set(f"{A0}::data", torch.full((768,), float("inf"), dtype=torch.float16)), A0),
    ("fp16", _set(f"{A0}::data", torch.zeros(700, dtype=torch.float16)), A0),
    ("int8", _set(f"{A0}::q", torch.zeros(768, dtype=torch.int16)), f"{A0}::q"),
    ("int8", _set(f"{A0}::q", torch.zeros(767, dtype=torch.int8)), f"{A0}::q"),
    ("int8", _set(f"{A0}::scale", torch.tensor([float("nan")])), f"{A0}::scale"),
    ("int8", _set(f"{A0}::scale", torch.tensor([-1.0])), f"{A0}::scale"),
    ("int8", _set(f"{A0}::scale", torch.tensor([1.0, 2.0])), f"{A0}::scale"),
    ("int8_block", _set(f"{B0}::scale", torch.ones(3)), f"{B0}::scale"),
    ("int8_block", _meta(B0, "block_size", 128), B0),
    ("topk", _set(f"{A0}::indices", torch.full((77,), 768, dtype=torch.int32)), f"{A0}::indices"),
    ("topk", _set(f"{A0}::indices", torch.full((77,), -1, dtype=torch.int32)), f"{A0}::indices"),
    ("topk", _set(f"{A0}::indices", torch.zeros(77, dtype=torch.int32)), "duplicate"),
    ("topk", _set(f"{A0}::indices", torch.arange(77, dtype=torch.int16)), f"{A0}::indices"),
    ("topk", _set(f"{A0}::indices", torch.arange(76, dtype=torch.int32)), f"{A0}::indices"),
    ("topk", _set(f"{A0}::values", torch.full((77,), float("inf"))), f"{A0}::values"),
    ("topk", _set(f"{A0}::values", torch.zeros(7, 11)), f"{A0}::values"),
    ("topk", _meta(A0, "shape", [2, 2]), A0),
]


@pytest.mark.parametrize("kind, mutate, match", MALFORMED)
def test_malformed_payload_rejected(kind, mutate, match):
    codec, payload, expected = _mutated(kind, mutate, topk_fraction=0.1, block_size=64)
    with pytest.raises(PayloadError, match=re.escape(match)):
        codec.decode(payload, expected)


def test_decode_without_expected_shapes_still_validates():
    codec, payload, _ = _mutated("topk", _meta(A0, "shape", [2, 2]), topk_fraction=0.1)
    with pytest.raises(PayloadError, match=re.escape(A0)):
        codec.decode(payload)
    codec, payload, _ = _mutated("topk", lambda p: None, topk_fraction=0.1)
    assert set(codec.decode(payload)) == {A0, B0}


def test_bad_blobs_and_specs():
    with pytest.raises(PayloadError):
        cz.payload_from_bytes(b"\x00" * 20)
    from safetensors.torch import save

    with pytest.raises(PayloadError, match="metadata"):
        cz.payload_from_bytes(save({"x": torch.zeros(2)}))
    with pytest.raises(PayloadError):
        cz.build_codec("int8").decode(Payload({}, "nope"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown compression kind"):
        cz.build_codec("zip")
    with pytest.raises(ValueError, match="no codec"):
        cz.build_codec("none")
    with pytest.raises(ValueError, match="topk_fraction"):
        cz.build_codec(CompressionSpec("topk", topk_fraction=0.0))
    with pytest.raises(ValueError, match="block_size"):
        cz.build_codec(CompressionSpec("int8_block", block_size=0))
    with pytest.raises(ValueError, match="NaN"):
        cz.build_codec("int8").encode({A0: torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="float tensor"):
        cz.build_codec("int8").encode({A0: torch.tensor([1, 2])})
