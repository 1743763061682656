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
from fedguard.federated.server import REASON_CHARS
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


# -- secure aggregation: Flower's SecAgg+ workflow carries legacy FitIns down and FitRes up --------------------
FITINS_CONFIG = "fitins.config"  # the record compat.fitins_to_recorddict puts FitIns.config in
KEYS = "fedguard.keys"  # FitIns config: the names of FitIns.parameters' arrays, in order (JSON)
DROP = "fedguard.secagg_drop"  # FitIns config: privacy.secagg_dropout chose this client to drop after key sharing


def instructions_fitins(ins: Instructions, drop: bool = False):
    """Server -> node under secure aggregation: the instructions as the FitIns the SecAgg+ workflow sends with
    its 'collect masked vectors' stage (the round config as JSON, the global tensors as NumPy arrays)."""
    from flwr.common import FitIns, ndarrays_to_parameters

    if ins.flora_delta is not None:
        raise ValueError("FLoRA's instructions cannot travel as FitIns (secure aggregation refuses FLoRA)")
    keys = sorted(ins.global_adapter)
    arrays = [ins.global_adapter[k].detach().cpu().contiguous().numpy() for k in keys]
    return FitIns(ndarrays_to_parameters(arrays), {"client_id": ins.client_id, KEYS: json.dumps(keys),
                                                   "round_config": json.dumps(ins.config.to_dict()), DROP: bool(drop)})


def instructions_from_fitins(content) -> tuple[Instructions, bool]:
    """What a node reads from the FitIns records of a SecAgg+ 'collect masked vectors' message, and whether it
    is to drop out (simulated)."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    c = fitins.config
    keys, arrays = json.loads(str(c[KEYS])), parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(arrays):
        raise ValueError(f"FitIns names {len(keys)} arrays and carries {len(arrays)}")
    adapter = {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays)}
    ins = Instructions(str(c["client_id"]), RoundConfig.from_dict(json.loads(str(c["round_config"]))), adapter)
    return ins, bool(c.get(DROP, False))


def fitins_round(content) -> int:
    """The round of a SecAgg+ 'collect masked vectors' message, from its FitIns config alone."""
    return int(json.loads(str(content[FITINS_CONFIG]["round_config"]))["server_round"])


def vector_fitres_content(vector, metrics: dict[str, float]):
    """Node -> its own secaggplus_mod: the vector to mask as the FitRes the mod reads (weight 1: num_examples 1
    with the workflow's max_weight 1); the mod clears the arrays before the reply leaves the node."""
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.asarray(vector, dtype=np.float64)]), 1,
                 {k: float(v) for k, v in metrics.items()})
    return compat.fitres_to_recorddict(res, keep_input=False)


def save_client_state(context, state: ClientState) -> None:
    context.state[STATE_KEY] = _array_record(state.state_dict())


def load_client_state(context) -> ClientState:
    record = context.state.get(STATE_KEY) if STATE_KEY in context.state else None
    return ClientState.from_state_dict(_tensors(record))


def message_nbytes(content) -> int:
    """Bytes of the tensors and byte strings in a record dict (what dominates a message on the wire)."""
    return sum(record_nbytes(record) for record in content.values() if hasattr(record, "count_bytes"))


def record_nbytes(record) -> int:
    """Flower's count of a record's bytes; flwr 1.41 cannot count a ConfigRecord holding an empty string or list
    (SecAgg+ sends both), which counts as its serialised size."""
    try:
        return int(record.count_bytes())
    except (ValueError, IndexError):
        return len(record.deflate())


# -- replies: whose, and why they failed ------------------------------------------------------------------
def addressee(reply, asked: dict[str, int]) -> int:
    """The node a reply answers for: the one its message was sent to. Flower's own error replies (a node that
    stopped answering, code 5) come from the SuperLink, not the node, so the message id decides."""
    return asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def error_reason(reply) -> str:
    """A node's error, cut to its last characters (a traceback's last line says what went wrong)."""
    err = reply.error
    text = " ".join(str(err.reason or "").split())
    return f"code {err.code}: {'...' if len(text) > REASON_CHARS else ''}{text[-REASON_CHARS:]}"
