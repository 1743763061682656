"""Server-side checks on every client update, before anything is aggregated.

A bad update is rejected with a reason; the round goes on with the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedguard.messages import AdapterState, ClientUpdate


class UpdateRejected(ValueError):
    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class UpdateSpec:
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    max_bytes: int

    @classmethod
    def from_adapter(cls, adapter: AdapterState, max_bytes: int) -> UpdateSpec:
        dtypes = {t.dtype for t in adapter.values()}
        if len(dtypes) != 1:
            raise ValueError(f"global adapter mixes dtypes {dtypes}")
        return cls({k: tuple(t.shape) for k, t in adapter.items()}, dtypes.pop(), int(max_bytes))


# Aggregation weights are float64 products of example counts: a count beyond 2**53 is not a count.
MAX_NUM_EXAMPLES = 2**53


def check_keys_are_names(tensors: dict) -> None:
    """Tensor names must be strings before anything sorts or parses them."""
    bad = [k for k in tensors if not isinstance(k, str)]
    if bad:
        raise UpdateRejected("wrong_keys", f"{len(bad)} tensor keys are not strings (e.g. {bad[0]!r})")


def validate_update(update: ClientUpdate, spec: UpdateSpec) -> None:
    """Raise ``UpdateRejected`` unless the update matches ``spec`` exactly and is finite.

    ``spec`` describes the tensors a client sends: the whole global adapter, or under FFA-LoRA its
    lora_B tensors only (an A tensor is then an unexpected key). A compressed payload must have
    been decoded into ``tensors`` first (``fedguard.federated.transport.decode_update``).
    """
    if not isinstance(update.client_id, str) or not update.client_id:
        raise UpdateRejected("bad_client_id", f"client id must be a non-empty string, got {update.client_id!r}")
    if getattr(update, "payload", None) is not None:
        raise UpdateRejected("wrong_encoding", "carries an undecoded payload")
    if not isinstance(update.tensors, dict):
        raise UpdateRejected("bad_payload", f"tensors must be a dict, got {type(update.tensors).__name__}")
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int) \
            or not 0 < update.num_examples <= MAX_NUM_EXAMPLES:
        raise UpdateRejected("bad_num_examples", f"num_examples must be an integer in 1..{MAX_NUM_EXAMPLES}, "
                                                 f"got {update.num_examples!r}")
    if not isinstance(update.metrics, dict):
        raise UpdateRejected("bad_metrics", f"metrics must be a dict, got {type(update.metrics).__name__}")
    check_keys_are_names(update.tensors)
    keys = set(update.tensors)
    missing, extra = sorted(set(spec.shapes) - keys), sorted(keys - set(spec.shapes))
    if missing or extra:
        raise UpdateRejected("wrong_keys", f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    size = 0
    for k, t in update.tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UpdateRejected("bad_payload", f"{k} is a {type(t).__name__}, not a tensor")
        if t.dtype != spec.dtype:
            raise UpdateRejected("wrong_dtype", f"{k} has dtype {t.dtype}, expected {spec.dtype}")
        if tuple(t.shape) != spec.shapes[k]:
            raise UpdateRejected("wrong_shape", f"{k} has shape {tuple(t.shape)}, expected {spec.shapes[k]}")
        if t.is_sparse or t.layout != torch.strided:
            raise UpdateRejected("bad_payload", f"{k} is not a dense tensor")
        size += t.numel() * t.element_size()
    if not isinstance(update.attachments, dict):
        raise UpdateRejected("bad_payload", "attachments must be a dict of tensors")
    for k, t in update.attachments.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor) or t.dtype != spec.dtype or t.is_sparse:
            raise UpdateRejected("bad_payload", f"attachment {k!r} is not a dense {spec.dtype} tensor")
        size += t.numel() * t.element_size()
    if size > spec.max_bytes:
        raise UpdateRejected("oversize", f"{size} bytes exceeds the limit of {spec.max_bytes}")
    for k, t in update.tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise UpdateRejected("non_finite", f"{k} contains NaN or Inf")
    for name, value in update.metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise UpdateRejected("bad_metrics", f"metric {name!r} is not a finite number: {value!r}")
