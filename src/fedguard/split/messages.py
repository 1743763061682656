"""What crosses between a split-learning client and the server: message kinds, tensors, meta, the handshake.

The transport contract
----------------------
A client talks to the server only through an object with

    call(kind: str, client_id: str, tensors: dict[str, Tensor], meta: dict) -> (dict[str, Tensor], dict)

and the server answers every call with ``SplitServer.handle(kind, client_id, tensors, meta)``, which returns
the reply's ``(tensors, meta)`` or raises ``ProtocolError`` (a ``ValueError``) for a request it refuses. A
transport turns that exception into an error reply, and the client side of the transport raises
``ProtocolError`` again with the server's message (``InProcessTransport`` here, the gRPC transport in
``grpc_transport``). ``meta`` is a JSON object; tensors go as tensors (safetensors in process).

Message kinds (client -> server request; server -> client reply)
-----------------------------------------------------------------
``B`` rows, ``T`` positions (the client's right-padded batch width), ``H`` hidden size; ``W`` is the wire
dtype agreed in the handshake (``split.wire_dtype``, float32 by default). No message carries token ids,
labels, logits, a mask, position ids or K/V; the only integer tensor is ``counts``.

===========  ===================================================  ==========================================
kind         request tensors / meta                               reply tensors / meta
===========  ===================================================  ==========================================
hello        - / ``spec`` (``split_spec``), ``weight`` (the       - / ``spec`` (the server's), ``mode``,
             client's number of training examples, optional)     ``protocol_version``
forward      ``hidden [B,T,H]`` W (h̃_A: noise on in training),   ``hidden [B,T,H]`` W (h_B) / ``step``
             ``counts [B]`` int64 (real tokens per row, right
             padding) / ``step`` (int >= 1), ``train`` (bool;
             false: an evaluation forward, no graph is kept)
backward     ``grad [B,T,H]`` W (∂loss/∂h_B) / ``step``           ``grad [B,T,H]`` W (∂loss/∂h̃_A) / ``step``
prefill      ``hidden [B,T,H]`` W, ``counts [B]`` int64 / -       ``hidden [B,T,H]`` W / -
decode       ``hidden [B,1,H]`` W / -                             ``hidden [B,1,H]`` W / -
end          - / -                                                - / - (the server dropped the client's cache)
===========  ===================================================  ==========================================

Masks and positions are rebuilt by each side from ``counts`` (``fedguard.model.blocks``); a decode step
needs neither (every decode position is a real token; each side's ``PartCache`` remembers the prompt's
padding). "aggregate" is a reserved kind the in-process recipe does not use: aggregation of the clients' own
parts is simulated by the recipe (``fedguard.split.train``), hierarchical averaging happens inside the server.

The handshake
-------------
``split_spec`` describes one side: protocol version, the base model's fingerprint (architecture, tokenizer
and weight digests; the name is for people and is not compared), the number of decoder layers, hidden size,
``k_a``, ``k_c``, the wire dtype, the padding side and the LoRA settings. The server refuses a ``hello``
whose spec differs from its own and names every differing field (``k_a differs: client 2, server 1``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from fedguard.config import differing_fields

__all__ = ["KINDS", "PROTOCOL_VERSION", "WIRE_DTYPES", "ProtocolError", "Transport", "decode_message",
           "encode_message", "spec_differences", "split_spec", "tensor_nbytes"]

PROTOCOL_VERSION = 1
KINDS = ("hello", "forward", "backward", "prefill", "decode", "end", "aggregate")
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_META_KEY = "fedguard.split"


class ProtocolError(ValueError):
    """A request the server refuses (wrong kind, names, shape, dtype, values, size, order, handshake); the
    transport sends it back as an error reply and the server goes on serving."""


class Transport(Protocol):
    def call(self, kind: str, client_id: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def split_spec(fingerprint: Mapping[str, Any], num_layers: int, hidden_size: int, k_a: int, k_c: int,
               wire_dtype: str, lora) -> dict[str, Any]:
    """One side's handshake description (JSON). ``lora`` is a ``LoraSettings``; ``wire_dtype`` a key of
    ``WIRE_DTYPES``."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    return {
        "protocol_version": PROTOCOL_VERSION,
        "model": {k: v for k, v in fingerprint.items() if k != "name"},
        "num_layers": int(num_layers),
        "hidden_size": int(hidden_size),
        "k_a": int(k_a),
        "k_c": int(k_c),
        "wire_dtype": dtype_name(WIRE_DTYPES[wire_dtype]),
        "padding": "right",
        "lora": {"r": int(lora.r), "alpha": float(lora.alpha), "dropout": float(lora.dropout),
                 "target_modules": sorted(lora.target_modules), "init_seed": int(lora.init_seed),
                 "variant": lora.variant},
    }


def spec_differences(client: Any, server: Mapping[str, Any]) -> list[str]:
    """``'<field> differs: client X, server Y'`` for every field of two specs that differs (empty: equal)."""
    if not isinstance(client, Mapping):
        return [f"spec must be a JSON object, got {type(client).__name__}"]
    out = []
    for name in differing_fields(dict(client), dict(server)):
        a, b = _get(client, name), _get(server, name)
        out.append(f"{name} differs: client {json.dumps(a)}, server {json.dumps(b)}")
    return out


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, Mapping) else None
    return obj


def tensor_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def encode_message(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> bytes:
    """One message as bytes: a safetensors blob of the tensors, the JSON meta in its header metadata."""
    from safetensors.torch import save

    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ProtocolError(f"tensor {name!r} is a {type(t).__name__}, not a tensor")
    try:
        header = json.dumps(dict(meta), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"meta is not JSON-serialisable: {exc}") from None
    return save({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, metadata={_META_KEY: header})


def decode_message(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of ``encode_message``; ``ProtocolError`` for bytes that are not such a message."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        header = _safetensors_metadata(data).get(_META_KEY)
        meta = json.loads(header) if header is not None else None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a malformed message
        raise ProtocolError(f"malformed message: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("malformed message: no JSON object in its header")
    return tensors, meta


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, JSON header)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("safetensors header runs past the end")
    return json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__") or {}
