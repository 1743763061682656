"""fedguard's messages as Flower records, and back.

Flower carries ``RecordDict``s of ``ArrayRecord`` (tensors), ``ConfigRecord`` (JSON-like values and bytes) and
``MetricRecord`` (numbers). Everything a node sends is untrusted: ``update_from_reply`` turns a reply into a
``ClientUpdate`` or raises ``ValueError`` naming what is wrong, and the client id always comes from the
server's roster (which node the reply came from), never from the content.
"""

from __future__ import annotations

import json
import math

import torch

from fedguard.federated.client import ClientState
from fedguard.messages import ClientUpdate, Instructions, RoundConfig

# RecordDict keys
CONFIG, GLOBAL, FLORA, ARRAYS, ATTACHMENTS, PAYLOAD, META, METRICS = (
    "config", "global", "flora", "arrays", "attachments", "payload", "meta", "metrics")
STATE_KEY = "fedguard.client-state"  # a node's ClientState in Context.state
QUERY_IDENTITY = "identity"  # the query a node answers with its partition id


def _array_record(tensors: dict[str, torch.Tensor]):
    from flwr.app import ArrayRecord

    return ArrayRecord({k: t.detach().cpu().contiguous() for k, t in tensors.items()})


def _tensors(record) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict()) if record is not None and len(record) else {}


def instructions_content(ins: Instructions):
    """Server -> node: the round config (as JSON, so None and lists survive) and the downlink tensors."""
    from flwr.app import ConfigRecord, RecordDict

    content = RecordDict({
        CONFIG: ConfigRecord({"client_id": ins.client_id, "round_config": json.dumps(ins.config.to_dict()),
                              "flora_round": int(ins.flora_round), "has_flora": ins.flora_delta is not None}),
        GLOBAL: _array_record(ins.global_adapter),
    })
    if ins.flora_delta is not None:
        content[FLORA] = _array_record(ins.flora_delta)
    return content


def instructions_from_content(content) -> Instructions:
    """What a node reads from the server's message (the server is trusted by the node it enrolled)."""
    c = content[CONFIG]
    flora = _tensors(content.get(FLORA)) if bool(c["has_flora"]) else None
    return Instructions(str(c["client_id"]), RoundConfig.from_dict(json.loads(str(c["round_config"]))),
                        _tensors(content[GLOBAL]), flora, int(c["flora_round"]))


def update_content(update: ClientUpdate):
    """Node -> server: the adapter (tensors or the encoded payload), the attachments a defense asked for,
    the example count and the training metrics."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    content = RecordDict({
        ARRAYS: _array_record(update.tensors),
        ATTACHMENTS: _array_record(update.attachments),
        META: ConfigRecord({"num_examples": int(update.num_examples)}),
        METRICS: MetricRecord({k: float(v) for k, v in update.metrics.items()}),
    })
    if update.payload is not None:  # an array, so Flower streams it in chunks like any tensor
        content[PAYLOAD] = _array_record({"bytes": torch.frombuffer(bytearray(update.payload), dtype=torch.uint8)})
    return content


def update_from_reply(content, client_id: str) -> ClientUpdate:
    """The ``ClientUpdate`` in a node's reply, for ``client_id`` (from the roster). ValueError when the
    content is not what a client sends; the server's own validation judges the tensors after this."""
    missing = [k for k in (ARRAYS, META) if k not in content]
    if missing:
        raise ValueError(f"reply lacks the '{missing[0]}' record")
    meta = content[META]
    n = meta.get("num_examples")
    if not isinstance(n, int) or isinstance(n, bool):
        raise ValueError("reply meta 'num_examples' is not an integer")
    payload = None
    if PAYLOAD in content:
        blob = _tensors(content[PAYLOAD])
        if set(blob) != {"bytes"} or blob["bytes"].dtype != torch.uint8 or blob["bytes"].dim() != 1:
            raise ValueError("reply 'payload' is not one 1-D uint8 array named 'bytes'")
        payload = blob["bytes"].numpy().tobytes()
    metrics: dict[str, float] = {}
    if METRICS in content:
        metrics = {str(k): float(v) for k, v in content[METRICS].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    return ClientUpdate(client_id=client_id, tensors=_tensors(content[ARRAYS]), num_examples=n, metrics=metrics,
                        attachments=_tensors(content.get(ATTACHMENTS)), payload=payload)


def save_client_state(context, state: ClientState) -> None:
    context.state[STATE_KEY] = _array_record(state.state_dict())


def load_client_state(context) -> ClientState:
    record = context.state.get(STATE_KEY) if STATE_KEY in context.state else None
    return ClientState.from_state_dict(_tensors(record))


def message_nbytes(content) -> int:
    """Bytes of the tensors and byte strings in a record dict (what dominates a message on the wire)."""
    total = 0
    for record in content.values():
        if hasattr(record, "count_bytes"):
            total += int(record.count_bytes())
    return total
