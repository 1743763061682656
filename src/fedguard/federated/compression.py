"""Compression of client updates (a delta ``AdapterState``) with byte metering.

A ``Codec`` turns a delta into a ``Payload`` — plain tensors plus JSON-able metadata, writable as
one safetensors blob (``payload_to_bytes`` / ``payload_from_bytes``) — and back. Codecs (kind
``none`` has none: uncompressed updates travel as plain tensors):

=============  ===================================================  ==================================
kind           what is sent per tensor of n entries                 error bound (stated per codec)
=============  ===================================================  ==================================
``fp16``       float16 copy (2n bytes)                              rel ≤ 2⁻¹¹ for normal fp16 values
``bf16``       bfloat16 copy (2n bytes)                             rel ≤ 2⁻⁸ for normal values
``int8``       int8 codes + one fp32 scale (n + 4 bytes)            abs ≤ scale/2, scale = absmax/127
``int8_block`` int8 codes + one fp32 scale per block               abs ≤ scale_b/2 within block b
``topk``       k = ceil(f·n) values + int32/int64 indices           exact on kept entries, 0 elsewhere
=============  ===================================================  ==================================

Lossy codecs bias the aggregate unless the client keeps what was lost and adds it to its next
update: ``ErrorFeedback`` (Seide et al. 2014; Stich et al. 2018, "Sparsified SGD with memory";
Karimireddy et al. 2019, EF-SGD). With it, ``Σ_t decoded_t + residual_T == Σ_t delta_t`` for any
codec, so nothing is lost, only delayed.

``decode`` trusts nothing in the payload: metadata shapes against the expected shapes, dtypes,
element counts, index ranges and duplicates, NaN/Inf; every problem is a ``PayloadError``
(a ``ValueError``) naming the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedguard.messages import AdapterState

FORMAT_VERSION = 1
META_KEY = "fedguard.compression"
_FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _FLOAT_DTYPES.items()}


class PayloadError(ValueError):
    """A payload that cannot be decoded safely; the message names the tensor."""


@dataclass(frozen=True)
class CompressionSpec:
    """Which codec and its parameters (``kind``: ``none`` or one of ``CODECS``)."""

    kind: str = "none"
    block_size: int = 256  # int8_block: entries per scale
    topk_fraction: float = 0.01  # topk: fraction of each tensor's entries kept


@dataclass
class Payload:
    """What travels: plain dense tensors and JSON-able metadata (``meta["tensors"][key]`` per update key)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data (numel × element size): of an ``AdapterState``, or of a ``Payload``'s
    tensors (its safetensors blob adds a header). The transport's metering is built on it."""
    return sum(t.numel() * t.element_size() for t in state.values())


def payload_to_bytes(payload: Payload) -> bytes:
    """One safetensors blob; the metadata rides in its header under ``META_KEY``."""
    from safetensors.torch import save

    tensors = {k: t.contiguous() for k, t in payload.tensors.items()}
    return save(tensors, metadata={META_KEY: json.dumps(payload.meta)})


def payload_from_bytes(blob: bytes) -> Payload:
    """Inverse of ``payload_to_bytes``; PayloadError for a blob that is not one. ``Codec.decode`` validates the rest."""
    from safetensors.torch import load

    try:
        tensors = load(bytes(blob))
        (n,) = struct.unpack("<Q", blob[:8])
        raw = json.loads(blob[8 : 8 + n]).get("__metadata__", {}).get(META_KEY)
    except Exception as exc:
        raise PayloadError(f"not a safetensors payload: {exc}") from exc
    if raw is None:
        raise PayloadError(f"safetensors blob has no '{META_KEY}' metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PayloadError(f"'{META_KEY}' metadata is not JSON: {exc}") from exc
    return Payload(dict(tensors), meta)


# ---------------------------------------------------------------------------------------------
# Codecs


class Codec(ABC):
    """``encode(delta) -> Payload``; ``decode(payload, expected_shapes) -> delta``.

    ``expected_shapes`` (key -> shape, e.g. the global adapter's) should always be given on the
    server: it fixes the key set and bounds what decoding allocates. Decoded tensors come back in
    the dtype recorded at encoding (float32 for this project's adapters).
    """

    kind: ClassVar[str]

    def encode(self, delta: Mapping[str, torch.Tensor]) -> Payload:
        tensors: dict[str, torch.Tensor] = {}
        metas: dict[str, Any] = {}
        for key in sorted(delta):
            t = delta[key]
            if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPE_NAMES:
                raise ValueError(f"{key}: expected a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{key}: contains NaN or Inf; refusing to encode")
            parts, extra = self._encode(key, t.detach().cpu())
            for name, part in parts.items():
                tensors[f"{key}::{name}"] = part.contiguous()
            metas[key] = {"shape": list(t.shape), "dtype": _DTYPE_NAMES[t.dtype], **extra}
        return Payload(tensors, {"format": FORMAT_VERSION, "codec": self.kind, "params": self.params(), "tensors": metas})

    def decode(self, payload: Payload, expected_shapes: Mapping[str, tuple[int, ...]] | None = None) -> AdapterState:
        if not isinstance(payload, Payload) or not isinstance(payload.meta, dict) or not isinstance(payload.tensors, dict):
            raise PayloadError("not a Payload with a dict of tensors and a metadata dict")
        meta = payload.meta
        if meta.get("format") != FORMAT_VERSION:
            raise PayloadError(f"payload format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        if meta.get("codec") != self.kind:
            raise PayloadError(f"payload was encoded with codec {meta.get('codec')!r}, this decoder is {self.kind!r}")
        metas = meta.get("tensors")
        if not isinstance(metas, dict):
            raise PayloadError("payload metadata has no 'tensors' table")
        if expected_shapes is not None:
            missing = sorted(set(expected_shapes) - set(metas))
            extra = sorted(set(metas) - set(expected_shapes))
            if missing or extra:
                raise PayloadError(f"payload keys differ: missing {missing[:2]} ({len(missing)}), "
                                   f"unexpected {extra[:2]} ({len(extra)})")
        used: set[str] = set()
        out: AdapterState = {}
        for key in sorted(metas):
            m = metas[key]
            if not isinstance(m, dict):
                raise PayloadError(f"{key}: metadata is not a table")
            shape = m.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise PayloadError(f"{key}: bad shape {shape!r} in metadata")
            if expected_shapes is not None and tuple(shape) != tuple(expected_shapes[key]):
                raise PayloadError(f"{key}: shape {tuple(shape)} in payload, expected {tuple(expected_shapes[key])}")
            dtype = _FLOAT_DTYPES.get(m.get("dtype"))  # type: ignore[arg-type]
            if dtype is None:
                raise PayloadError(f"{key}: unsupported dtype {m.get('dtype')!r} in metadata")
            names = self._part_names()
            parts = {}
            for name in names:
                full = f"{key}::{name}"
                t = payload.tensors.get(full)
                if not isinstance(t, torch.Tensor):
                    raise PayloadError(f"{key}: payload lacks tensor {full!r}")
                if t.is_sparse or t.layout != torch.strided:
                    raise PayloadError(f"{full}: not a dense tensor")
                parts[name] = t
                used.add(full)
            out[key] = self._decode(key, parts, tuple(shape), m, dtype)
            if not bool(torch.isfinite(out[key]).all()):
                raise PayloadError(f"{key}: decodes to NaN or Inf")
        stray = sorted(set(payload.tensors) - used)
        if stray:
            raise PayloadError(f"payload has {len(stray)} tensors no key's metadata claims (e.g. {stray[0]!r})")
        return out

    def params(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def _part_names(self) -> tuple[str, ...]: ...

    @abstractmethod
    def _encode(self, key: str, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    @abstractmethod
    def _decode(self, key: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...], meta: dict[str, Any],
                dtype: torch.dtype) -> torch.Tensor: ...


def _expect(full: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], numel: int | None = None, ndim: int = 1) -> None:
    if t.dtype not in dtypes:
        raise PayloadError(f"{full}: dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}")
    if t.dim() != ndim:
        raise PayloadError(f"{full}: {t.dim()}-D, expected {ndim}-D")
    if numel is not None and t.numel() != numel:
        raise PayloadError(f"{full}: {t.numel()} entries, expected {numel}")


class CastCodec(Codec):
    """Cast to a 16-bit float and back (2 bytes per entry, half of fp32).

    Round-to-nearest: ``fp16`` has relative error ≤ 2⁻¹¹ for values in its normal range
    [2⁻¹⁴, 65504] (below that, absolute error ≤ 2⁻²⁵; encode refuses values that would overflow);
    ``bf16`` keeps fp32's range with relative error ≤ 2⁻⁸.
    """

    def __init__(self, kind: str):
        if kind not in ("fp16", "bf16"):
            raise ValueError(f"unknown cast codec {kind!r}")
        self.kind = kind  # type: ignore[misc]
        self.wire = torch.float16 if kind == "fp16" else torch.bfloat16

    def _part_names(self):
        return ("data",)

    def _encode(self, key, t):
        if self.wire == torch.float16 and t.numel() and float(t.abs().max()) > torch.finfo(torch.float16).max:
            raise ValueError(f"{key}: |value| {float(t.abs().max()):.3g} overflows float16")
        return {"data": t.reshape(-1).to(self.wire)}, {}

    def _decode(self, key, parts, shape, meta, dtype):
        d = parts["data"]
        _expect(f"{key}::data", d, (self.wire,), math.prod(shape))
        return d.to(dtype).reshape(shape)


def _int8_quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (float64, 2-D) -> int8 codes and one fp32 scale = absmax/127 per row.

    The scale is rounded to fp32 first and the codes are ``round(x / scale)`` against that stored
    scale, so the bound ``|x − q·scale| ≤ scale/2`` holds for the scale actually sent.
    """
    scale = (x.abs().amax(dim=1) / 127.0).to(torch.float32)
    s = scale.double()[:, None]
    q = torch.where(s > 0, torch.round(x / torch.where(s > 0, s, 1.0)), 0.0).clamp_(-127, 127)
    return q.to(torch.int8), scale


def _check_scales(full: str, scale: torch.Tensor) -> None:
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise PayloadError(f"{full}: scales must be finite and non-negative")


class Int8Codec(Codec):
    """``int8``: symmetric per-tensor quantisation, codes in [−127, 127] and one fp32 scale.

    ``scale = absmax / 127``, ``x̂ = q · scale``: ``max |x̂ − x| ≤ scale / 2`` (plus the rounding of
    x̂ to the output dtype, ≤ 2⁻²⁴|x̂| for fp32). n + 4 bytes: about a quarter of fp32.
    """

    kind = "int8"

    def _part_names(self):
        return ("q", "scale")

    def _encode(self, key, t):
        q, scale = _int8_quantise(t.reshape(1, -1).double())
        return {"q": q.reshape(-1), "scale": scale}, {}

    def _decode(self, key, parts, shape, meta, dtype):
        q, scale = parts["q"], parts["scale"]
        _expect(f"{key}::q", q, (torch.int8,), math.prod(shape))
        _expect(f"{key}::scale", scale, (torch.float32,), 1)
        _check_scales(f"{key}::scale", scale)
        return (q.double() * scale.double()).to(dtype).reshape(shape)


class BlockInt8Codec(Codec):
    """``int8_block``: symmetric int8 with one fp32 scale per block of ``block_size`` entries.

    The flattened tensor is cut into blocks (the last may be short); block b has
    ``scale_b = absmax_b / 127`` and ``max |x̂ − x| ≤ scale_b / 2`` inside it, so an outlier only
    coarsens its own block. n + 4·ceil(n / block_size) bytes.
    """

    kind = "int8_block"

    def __init__(self, block_size: int = 256):
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size

    def params(self):
        return {"block_size": self.block_size}

    def _part_names(self):
        return ("q", "scale")

    def _blocks(self, flat: torch.Tensor) -> torch.Tensor:
        n, b = flat.numel(), self.block_size
        nb = -(-n // b)
        padded = torch.zeros(nb * b, dtype=flat.dtype)
        padded[:n] = flat
        return padded.reshape(nb, b)

    def _encode(self, key, t):
        flat = t.reshape(-1).double()
        q, scale = _int8_quantise(self._blocks(flat))
        return {"q": q.reshape(-1)[: flat.numel()].clone(), "scale": scale}, {"block_size": self.block_size}

    def _decode(self, key, parts, shape, meta, dtype):
        b = meta.get("block_size")
        if b != self.block_size:
            raise PayloadError(f"{key}: block_size {b!r} in metadata, decoder uses {self.block_size}")
        n = math.prod(shape)
        q, scale = parts["q"], parts["scale"]
        _expect(f"{key}::q", q, (torch.int8,), n)
        _expect(f"{key}::scale", scale, (torch.float32,), -(-n // b))
        _check_scales(f"{key}::scale", scale)
        per_entry = scale.double().repeat_interleave(b)[:n]
        return (q.double() * per_entry).to(dtype).reshape(shape)


class TopKCodec(Codec):
    """``topk``: keep the k = ceil(fraction · n) entries of largest magnitude per tensor.

    Sends k values (in the tensor's dtype) and k indices into the flattened tensor (int32 when
    n < 2³¹, else int64): k · (4 + 4) bytes for fp32, about ``fraction`` · 2 of the dense size.
    Decoding is exact on the kept entries and zero elsewhere; pair it with ``ErrorFeedback`` so the
    dropped mass is sent later instead of lost.
    """

    kind = "topk"

    def __init__(self, fraction: float = 0.01):
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"topk_fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def params(self):
        return {"topk_fraction": self.fraction}

    def k_for(self, n: int) -> int:
        return max(1, min(n, math.ceil(self.fraction * n - 1e-9))) if n else 0

    def _part_names(self):
        return ("values", "indices")

    def _encode(self, key, t):
        flat = t.reshape(-1)
        k = self.k_for(flat.numel())
        idx = torch.topk(flat.abs(), k, sorted=False).indices if k else torch.zeros(0, dtype=torch.int64)
        idx, _ = torch.sort(idx)
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        return {"values": flat[idx].clone(), "indices": idx.to(index_dtype)}, {}

    def _decode(self, key, parts, shape, meta, dtype):
        n = math.prod(shape)
        values, idx = parts["values"], parts["indices"]
        _expect(f"{key}::values", values, (dtype,))
        _expect(f"{key}::indices", idx, (torch.int32, torch.int64), values.numel())
        if values.numel() > n:
            raise PayloadError(f"{key}: {values.numel()} values for a tensor of {n} entries")
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= n:
                raise PayloadError(f"{key}::indices: range [{lo}, {hi}] outside [0, {n})")
            if torch.unique(idx).numel() != idx.numel():
                raise PayloadError(f"{key}::indices: duplicate indices")
        if not bool(torch.isfinite(values).all()):
            raise PayloadError(f"{key}::values: NaN or Inf")
        out = torch.zeros(n, dtype=dtype)
        out[idx.long()] = values
        return out.reshape(shape)


CODECS = ("fp16", "bf16", "int8", "int8_block", "topk")


def build_codec(spec: CompressionSpec | str) -> Codec:
    """The codec for ``spec`` (or a bare kind name with default parameters)."""
    if isinstance(spec, str):
        spec = CompressionSpec(kind=spec)
    if spec.kind == "none":
        raise ValueError("compression 'none' has no codec: uncompressed updates travel as plain tensors")
    if spec.kind in ("fp16", "bf16"):
        return CastCodec(spec.kind)
    if spec.kind == "int8":
        return Int8Codec()
    if spec.kind == "int8_block":
        return BlockInt8Codec(spec.block_size)
    if spec.kind == "topk":
        return TopKCodec(spec.topk_fraction)
    raise ValueError(f"unknown compression kind {spec.kind!r} (known: {', '.join(CODECS)})")


# ---------------------------------------------------------------------------------------------
# Deltas and error feedback


def delta_from(local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> AdapterState:
    """``local − reference`` key by key (the update a client compresses); keys and shapes must match."""
    if set(local) != set(reference):
        raise ValueError(f"keys differ: {sorted(set(local) ^ set(reference))[:2]}")
    for k in local:
        if local[k].shape != reference[k].shape:
            raise ValueError(f"{k}: shape {tuple(local[k].shape)} vs {tuple(reference[k].shape)}")
    return {k: local[k] - reference[k] for k in sorted(local)}


def apply_delta(reference: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> AdapterState:
    """``reference + delta`` in the reference's dtype (what the server reconstructs from a decoded delta)."""
    if set(delta) != set(reference):
        raise ValueError(f"keys differ: {sorted(set(delta) ^ set(reference))[:2]}")
    return {k: (reference[k] + delta[k].to(reference[k].dtype)) for k in sorted(reference)}


class ErrorFeedback:
    """Per-client memory of what compression dropped, carried across the rounds the client joins.

    ``step(codec, delta)`` encodes ``corrected = delta + residual`` and keeps
    ``residual = corrected − decode(encode(corrected))``. By induction
    ``Σ_t decode_t + residual_T = Σ_t delta_t`` (exactly, up to float rounding of the additions),
    so a biased codec such as top-k still delivers every update eventually (Stich et al. 2018).
    The residual is kept in ``dtype`` (float32 by default; float64 makes the identity tighter)
    while the payload keeps the delta's dtype.
    Checkpoint it with ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.residual: AdapterState = {}

    def compensate(self, delta: Mapping[str, torch.Tensor]) -> AdapterState:
        """``delta + residual`` (zero residual on first use); keys and shapes must not change."""
        if self.residual:
            if set(self.residual) != set(delta):
                raise ValueError(f"error-feedback keys changed: {sorted(set(self.residual) ^ set(delta))[:2]}")
            for k, t in delta.items():
                if tuple(t.shape) != tuple(self.residual[k].shape):
                    raise ValueError(f"{k}: shape {tuple(t.shape)} vs residual {tuple(self.residual[k].shape)}")
        return {k: delta[k].to(self.dtype) + (self.residual[k] if self.residual else 0) for k in sorted(delta)}

    def step(self, codec: Codec, delta: Mapping[str, torch.Tensor]) -> Payload:
        """Compress ``delta`` with memory: returns the payload to send and updates the residual."""
        corrected = self.compensate(delta)
        # The wire keeps the delta's dtype; any rounding of that cast lands in the residual too.
        payload = codec.encode({k: corrected[k].to(delta[k].dtype) for k in corrected})
        decoded = codec.decode(payload, {k: tuple(t.shape) for k, t in corrected.items()})
        self.residual = {k: corrected[k] - decoded[k].to(self.dtype) for k in corrected}
        return payload

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: t.clone() for k, t in self.residual.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for k, t in state.items():
            if not isinstance(t, torch.Tensor) or not bool(torch.isfinite(t).all()):
                raise ValueError(f"error-feedback state {k!r} is not a finite tensor")
        self.residual = {k: t.to(self.dtype).clone() for k, t in state.items()}
