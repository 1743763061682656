"""The transport boundary: a client's update as it travels, written by the client, read by the server.

Both sides know the run's ``WireSpec`` (from the ``communication`` and ``lora`` config sections):

* which adapter tensors a client sends: all of them, or the ``lora_B`` tensors only (FFA-LoRA, where
  every A stays frozen at θ₀'s value, shared through ``lora.init_seed``);
* how they are encoded: as plain tensors (``compression: none``), or as the delta against the
  round-start global adapter, compressed by a ``fedguard.federated.compression`` codec and written
  as one safetensors blob in ``ClientUpdate.payload``.

Client side, the last thing a client does (after training and after any simulated attacker has
shaped the update): ``encode_update``, with the client's own error-feedback memory (``ClientState``'s
residual, carried across the rounds it joins) where compression keeps one. Server side, the first thing the server does
with an update: ``decode_update``, which turns a payload back into tensors (global + decoded
delta) or rejects it (``UpdateRejected``, code ``bad_payload`` / ``wrong_encoding`` / ``oversize``)
without ever raising anything else. The message stays a plain ``ClientUpdate`` either way, so a
networked transport (Flower) can carry ``payload`` as bytes and call the same two functions.

Bytes are metered here too: ``uplink_nbytes`` (what the client sent for aggregation: the blob's
length, or the tensors' bytes; ``uplink_header_nbytes`` of it is header), ``attachment_nbytes``
(what a defense asked for, counted apart) and ``downlink_nbytes`` (what the server sends each
client: the global tensors the client needs, in their dtype).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from fedguard.federated.compression import (
    Codec,
    CompressionSpec,
    ErrorFeedback,
    PayloadError,
    apply_delta,
    build_codec,
    delta_from,
    payload_from_bytes,
    payload_to_bytes,
    state_nbytes,
)
from fedguard.model.keys import is_lora_b, module_of
from fedguard.messages import AdapterState, ClientUpdate
from fedguard.federated.validation import UpdateRejected
from fedguard.model.lora import truncate_rank

if TYPE_CHECKING:
    from fedguard.config import ExperimentConfig


@dataclass(frozen=True)
class WireSpec:
    """What every client sends this run and how; the server expects exactly that."""

    compression: CompressionSpec = field(default_factory=CompressionSpec)
    error_feedback: bool = True
    lora_b_only: bool = False  # FFA-LoRA: lora_B tensors only

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> WireSpec:
        c = cfg.communication
        return cls(CompressionSpec(c.compression, c.block_size, c.topk_fraction), c.error_feedback,
                   cfg.lora.variant == "ffa")

    @property
    def compressed(self) -> bool:
        return self.compression.kind != "none"

    def codec(self) -> Codec:
        return build_codec(self.compression)

    def sent_keys(self, keys: Iterable[str]) -> list[str]:
        """The keys that travel, sorted: all of them, or under FFA-LoRA the lora_B weights only
        (out / (in + out) of a module's bytes: half for a square one)."""
        keys = sorted(keys)
        if not self.lora_b_only:
            return keys
        for k in keys:
            module_of(k)  # ValueError for a key that is not a LoRA A/B weight
        return [k for k in keys if is_lora_b(k)]

    def sent_view(self, adapter: Mapping[str, torch.Tensor]) -> AdapterState:
        """The part of ``adapter`` that travels (both ways): all of it, or its lora_B tensors."""
        return {k: adapter[k] for k in self.sent_keys(adapter)}

    def full_view(self, sent: Mapping[str, torch.Tensor], global_adapter: Mapping[str, torch.Tensor]) -> AdapterState:
        """``sent`` completed with the global tensors that do not travel (FFA-LoRA: the frozen A)."""
        return {k: sent[k] if k in sent else global_adapter[k] for k in global_adapter}


# -- client side -------------------------------------------------------------------------------------------
def encode_update(update: ClientUpdate, global_adapter: Mapping[str, torch.Tensor], spec: WireSpec,
                  feedback: ErrorFeedback | None = None, rank: int | None = None) -> ClientUpdate:
    """The message a client sends for ``update`` (whose ``tensors`` are its full local adapter).

    Keeps the keys the method sends (and, for a FLoRA client of rank ``rank`` simulated on a
    larger resident adapter, only its own rank's rows of A and columns of B); with compression,
    encodes ``local − global`` (plus the client's error-feedback residual when ``feedback`` is
    given, which it then updates) and puts the safetensors blob in ``payload``. ValueError when
    the update cannot be encoded (a missing key, NaN/Inf, a value that overflows fp16).
    """
    sent = spec.sent_keys(global_adapter)
    missing = [k for k in sent if k not in update.tensors]
    if missing:
        raise ValueError(f"client {update.client_id}: update lacks {len(missing)} adapter tensors (e.g. {missing[0]})")
    tensors = {k: update.tensors[k] for k in sent}
    reference = {k: global_adapter[k] for k in sent}
    if rank is not None:
        tensors, reference = truncate_rank(tensors, rank), truncate_rank(reference, rank)
    if not spec.compressed:
        return replace(update, tensors=tensors, payload=None)
    codec = spec.codec()
    delta = delta_from(tensors, reference)
    payload = feedback.step(codec, delta) if feedback is not None else codec.encode(delta)
    return replace(update, tensors={}, payload=payload_to_bytes(payload))


# -- server side -------------------------------------------------------------------------------------------
def decode_update(update: ClientUpdate, global_adapter: Mapping[str, torch.Tensor], spec: WireSpec,
                  max_bytes: int) -> ClientUpdate:
    """The update with its adapter tensors in ``tensors`` (the sent keys only), or ``UpdateRejected``.

    A payload is decoded against the shapes of the global adapter's sent tensors and added to
    them; any problem with it (not safetensors, wrong codec, keys, shapes, indices, NaN/Inf) is a
    rejection with the decoder's reason. Tensor contents are checked afterwards by
    ``validate_update`` as for any update.
    """
    payload = getattr(update, "payload", None)
    if not spec.compressed:
        if payload is not None:
            raise UpdateRejected("wrong_encoding", "sent a compressed payload; this run expects plain tensors")
        return update
    if payload is None:
        raise UpdateRejected("wrong_encoding", f"sent plain tensors; this run expects a "
                                               f"'{spec.compression.kind}' payload")
    if not isinstance(payload, (bytes, bytearray)):
        raise UpdateRejected("bad_payload", f"payload must be bytes, got {type(payload).__name__}")
    tensors = getattr(update, "tensors", None)
    if tensors is not None and (not isinstance(tensors, dict) or tensors):
        raise UpdateRejected("bad_payload", "sent both a payload and plain tensors")
    if len(payload) > max_bytes:
        raise UpdateRejected("oversize", f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    reference = spec.sent_view(global_adapter)
    try:
        delta = spec.codec().decode(payload_from_bytes(bytes(payload)),
                                    {k: tuple(t.shape) for k, t in reference.items()})
    except PayloadError as exc:
        raise UpdateRejected("bad_payload", str(exc)) from None
    except Exception as exc:  # whatever a hostile blob provokes in the decoder, the round goes on
        raise UpdateRejected("bad_payload", f"{type(exc).__name__}: {exc}") from None
    return replace(update, tensors=apply_delta(reference, delta), payload=None)


# -- metering ----------------------------------------------------------------------------------------------
def uplink_nbytes(update: ClientUpdate) -> int:
    """Bytes a client sent for aggregation: the serialised payload, or its tensors' bytes."""
    if update.payload is not None:
        return len(update.payload)
    return state_nbytes(update.tensors)


def uplink_header_nbytes(update: ClientUpdate) -> int:
    """The part of ``uplink_nbytes`` that is safetensors header and codec metadata, not tensor data
    (0 for plain tensors). Names and shapes cost the same per tensor whatever its size, so on a tiny
    adapter they dominate a compressed payload; on a real model they are negligible."""
    blob = update.payload
    if blob is None:
        return 0
    if len(blob) < 8:
        return len(blob)
    return min(len(blob), 8 + struct.unpack("<Q", bytes(blob[:8]))[0])


def attachment_nbytes(update: ClientUpdate) -> int:
    """Bytes of what a defense asked the client to attach (snapshots), counted apart from the update."""
    return state_nbytes(update.attachments)


def downlink_nbytes(global_adapter: Mapping[str, torch.Tensor], spec: WireSpec) -> int:
    """Bytes the server sends a client each round: the global tensors it needs, in their dtype.

    Under FFA-LoRA that is lora_B only: the frozen A is θ₀'s, which every client draws from
    ``lora.init_seed`` itself.
    """
    return state_nbytes(spec.sent_view(global_adapter))
