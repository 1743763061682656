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
    max_abs: float = math.inf  # no entry of a LoRA weight or snapshot is larger than this in magnitude
    # the whole adapter's tensor names and shapes: what defense attachments ("step/<t>/<key>") refer to
    adapter_shapes: dict[str, tuple[int, ...]] | None = None

    @classmethod
    def from_adapter(cls, adapter: AdapterState, max_bytes: int, max_abs: float = math.inf,
                     whole: AdapterState | None = None) -> UpdateSpec:
        dtypes = {t.dtype for t in adapter.values()}
        if len(dtypes) != 1:
            raise ValueError(f"global adapter mixes dtypes {dtypes}")
        shapes = {k: tuple(t.shape) for k, t in (whole if whole is not None else adapter).items()}
        return cls({k: tuple(t.shape) for k, t in adapter.items()}, dtypes.pop(), int(max_bytes), float(max_abs),
                   shapes)


MAX_METRICS = 64  # training metrics a client may report (fedguard's client sends 7)
MAX_NAME_CHARS = 200  # a metric or attachment name; longer ones are not names
ATTACHMENT_KINDS = ("step", "shadow")


# Aggregation weights are float64 products of example counts: a count beyond 2**53 is not a count.
MAX_NUM_EXAMPLES = 2**53


def check_keys_are_names(tensors: dict) -> None:
    """Tensor names must be strings before anything sorts or parses them."""
    bad = [k for k in tensors if not isinstance(k, str)]
    if bad:
        raise UpdateRejected("wrong_keys", f"{len(bad)} tensor keys are not strings (e.g. {_short(bad[0])})")


def validate_update(update: ClientUpdate, spec: UpdateSpec) -> None:
    """Raise ``UpdateRejected`` unless the update matches ``spec`` exactly and is finite.

    ``spec`` describes the tensors a client sends: the whole global adapter, or under FFA-LoRA its
    lora_B tensors only (an A tensor is then an unexpected key). A compressed payload must have
    been decoded into ``tensors`` first (``fedguard.federated.transport.decode_update``).
    """
    if not isinstance(update.client_id, str) or not update.client_id:
        raise UpdateRejected("bad_client_id", f"client id must be a non-empty string, got {_short(update.client_id)}")
    if getattr(update, "payload", None) is not None:
        raise UpdateRejected("wrong_encoding", "carries an undecoded payload")
    if not isinstance(update.tensors, dict):
        raise UpdateRejected("bad_payload", f"tensors must be a dict, got {type(update.tensors).__name__}")
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int) \
            or not 0 < update.num_examples <= MAX_NUM_EXAMPLES:
        raise UpdateRejected("bad_num_examples", f"num_examples must be an integer in 1..{MAX_NUM_EXAMPLES}, "
                                                 f"got {_short(update.num_examples)}")
    if not isinstance(update.metrics, dict):
        raise UpdateRejected("bad_metrics", f"metrics must be a dict, got {type(update.metrics).__name__}")
    check_keys_are_names(update.tensors)
    keys = set(update.tensors)
    missing, extra = sorted(set(spec.shapes) - keys), sorted(keys - set(spec.shapes))
    if missing or extra:
        raise UpdateRejected("wrong_keys", f"{len(missing)} missing (e.g. {[_short(k) for k in missing[:2]]}), "
                                           f"{len(extra)} unexpected (e.g. {[_short(k) for k in extra[:2]]})")
    _check_metrics(update.metrics)
    size = 0
    for k, t in update.tensors.items():
        _check_dense(t, k, spec)
        if tuple(t.shape) != spec.shapes[k]:
            raise UpdateRejected("wrong_shape", f"{k} has shape {tuple(t.shape)}, expected {spec.shapes[k]}")
        size += t.numel() * t.element_size()
    if not isinstance(update.attachments, dict):
        raise UpdateRejected("bad_payload", "attachments must be a dict of tensors")
    for k, t in update.attachments.items():
        _check_dense(t, _attachment_key(k, spec, t), spec)
        size += t.numel() * t.element_size()
    if size > spec.max_bytes:
        raise UpdateRejected("oversize", f"{size} bytes exceeds the limit of {spec.max_bytes}")
    for k, t in [*update.tensors.items(), *update.attachments.items()]:
        if not bool(torch.isfinite(t).all()):
            raise UpdateRejected("non_finite", f"{k} contains NaN or Inf")
        if t.numel() and float(t.abs().max()) > spec.max_abs:
            raise UpdateRejected("out_of_range", f"{k} has entries beyond ±{spec.max_abs:g} (server.max_abs_value)")


def _check_dense(t, name: str, spec: UpdateSpec) -> None:
    """A plain CPU tensor of the adapter's dtype (not sparse, not on another device, not a tensor subclass)."""
    if not isinstance(t, torch.Tensor) or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        raise UpdateRejected("bad_payload", f"{name} is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided or t.is_sparse:
        raise UpdateRejected("bad_payload", f"{name} is not a dense tensor (layout {t.layout})")
    if t.device.type != "cpu":
        raise UpdateRejected("bad_payload", f"{name} is on device {t.device.type}, not a tensor that arrived")
    if t.dtype != spec.dtype:
        raise UpdateRejected("wrong_dtype", f"{name} has dtype {t.dtype}, expected {spec.dtype}")


def _attachment_key(name, spec: UpdateSpec, t) -> str:
    """An attachment is ``<step|shadow>/<step number>/<adapter tensor>`` and has that tensor's shape."""
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise UpdateRejected("bad_payload", f"attachment name {_short(name)} is not a name")
    kind, _, rest = name.partition("/")
    step, _, key = rest.partition("/")
    shapes = spec.adapter_shapes or spec.shapes
    if kind not in ATTACHMENT_KINDS or not step.isdigit() or key not in shapes:
        raise UpdateRejected("bad_payload", f"attachment {_short(name)} is not <step|shadow>/<t>/<adapter tensor>")
    if isinstance(t, torch.Tensor) and tuple(t.shape) != shapes[key]:
        raise UpdateRejected("wrong_shape", f"attachment {name} has shape {tuple(t.shape)}, expected {shapes[key]}")
    return name


def _check_metrics(metrics: dict) -> None:
    if len(metrics) > MAX_METRICS:
        raise UpdateRejected("bad_metrics", f"{len(metrics)} metrics, more than {MAX_METRICS}")
    for name, value in metrics.items():
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise UpdateRejected("bad_metrics", f"metric name {_short(name)} is not a name")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise UpdateRejected("bad_metrics", f"metric {name!r} is not a finite number: {_short(value)}")


def _short(value, n: int = 60) -> str:
    """``repr`` of a value a client sent, cut short: a rejection reason never echoes a payload."""
    text = repr(value) if not isinstance(value, (bytes, str)) or len(value) <= 4 * n else repr(value[: 4 * n])
    return text if len(text) <= n else text[: n - 3] + "..."
