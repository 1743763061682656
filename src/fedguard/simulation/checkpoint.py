"""Round checkpoints: everything a resumed run needs to continue bit-for-bit.

checkpoints/round_NNNN/
  adapter_model.safetensors, adapter_config.json   the global adapter, PEFT format
  server_state.safetensors                          aggregator / defense tensors
  client_optimizer.safetensors                      per-client AdamW state (when kept across rounds)
  client_feedback.safetensors                       per-client error-feedback memory (compressed uplink)
  client_dpsgd.safetensors                          per-client DP-SGD history, for its own accountant
  state.json                                        round, server meta, format version

Each checkpoint folder is written in a staging folder and moved into place whole, so a run killed at
any instant leaves only complete checkpoints behind.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fedguard.federated.client import ClientState
from fedguard.io import atomic_write_json, load_tensors, publish_dir, save_tensors
from fedguard.messages import AdapterState, ServerState
from fedguard.model.lora import AdapterSlot, write_peft_adapter

FORMAT_VERSION = 1
_ROUND_DIR = re.compile(r"^round_(\d{4,})$")


@dataclass
class Checkpoint:
    round: int
    global_adapter: AdapterState
    server_state: ServerState
    client_states: dict[str, ClientState]
    path: Path


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, server_round: int, slot: AdapterSlot, global_adapter: AdapterState,
                    server_state: ServerState, client_states: dict[str, ClientState], base_model: str,
                    keep_last: int | None = None) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round_{server_round:04d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        write_peft_adapter(slot, global_adapter, staging, base_model)
        save_tensors(staging / "server_state.safetensors", server_state.tensors)
        # one file per kind of client state (the layout of older checkpoints)
        save_tensors(staging / "client_optimizer.safetensors",
                     _flatten({c: s.optimizer for c, s in sorted(client_states.items())}))
        save_tensors(staging / "client_feedback.safetensors",
                     _flatten({c: s.residual for c, s in sorted(client_states.items())}))
        save_tensors(staging / "client_dpsgd.safetensors",
                     {c: s.dpsgd for c, s in sorted(client_states.items()) if s.dpsgd is not None})
        atomic_write_json(staging / "state.json", {
            "format_version": FORMAT_VERSION, "round": server_round, "server_meta": server_state.meta,
        })
        publish_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _ROUND_DIR.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> Checkpoint:
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}")
    feedback_file = path / "client_feedback.safetensors"  # absent in checkpoints of older runs
    moments = _unflatten(load_tensors(path / "client_optimizer.safetensors"))
    feedback = _unflatten(load_tensors(feedback_file)) if feedback_file.is_file() else {}
    dpsgd_file = path / "client_dpsgd.safetensors"
    dpsgd = load_tensors(dpsgd_file) if dpsgd_file.is_file() else {}
    return Checkpoint(
        round=int(meta["round"]),
        global_adapter=load_tensors(path / "adapter_model.safetensors"),
        server_state=ServerState(round=int(meta["round"]), tensors=load_tensors(path / "server_state.safetensors"),
                                 meta=meta.get("server_meta", {})),
        client_states={c: ClientState.from_state_dict(ClientState(moments.get(c, {}), feedback.get(c, {}),
                                                                  dpsgd.get(c)).state_dict())
                       for c in sorted({*moments, *feedback, *dpsgd})},
        path=path,
    )


def _flatten(per_client: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{cid}/{k}": v for cid, st in per_client.items() for k, v in st.items() if st}


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        cid, inner = key.split("/", 1)
        out.setdefault(cid, {})[inner] = t
    return out
