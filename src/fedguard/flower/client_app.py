"""Flower ClientApp: the same ``Client`` role the embedded engine runs, behind Flower's Message API.

A node is one client: its id is the ``partition-id`` of its node config (Flower's simulation sets it; a
deployed SuperNode is started with ``--node-config "partition-id=3"``, or ``data-path=...`` for a file of its
own). The base model is loaded once per process and shared by every client the process runs; each
client's data is built once (only its own); its ``ClientState`` lives in the node's ``Context.state``.

Under ``privacy.secure_aggregation`` the train handler sits behind Flower's ``secaggplus_mod``
(``fedguard.flower.secagg.client_mod``): it gets the instructions as FitIns and returns its update as one
vector, which the mod masks; the plain update never leaves the node.

The config reaches the app either through the factory (``client_app(cfg)``, the simulation) or through the
run config (``config`` = the YAML text, what ``fedguard deploy`` submits).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from fedguard.config import ExperimentConfig, build_config
from fedguard.data.federation import ClientData, DataTokenizer, build_one_client_data, sample_examples
from fedguard.data.readers import load_source
from fedguard.factories import attacker_probe, build_client, load_resident
from fedguard.flower import records, secagg
from fedguard.privacy.canaries import audited_client
from fedguard.seeding import numpy_rng
from fedguard.simulation.population import build_population

log = logging.getLogger("fedguard")


@dataclass
class _Process:
    """What one process keeps across the messages it handles, per config."""

    resident: Any
    client: Any
    attacker_probe: Any
    data: dict[int, Any] = field(default_factory=dict)
    roles: dict[int, Any] = field(default_factory=dict)


_PROCESSES: dict[str, _Process] = {}


def config_from_context(context) -> ExperimentConfig:
    import yaml

    text = context.run_config.get("config")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the run config has no 'config' (the experiment's YAML text)")
    return build_config(yaml.safe_load(text) or {})


def client_id_of(context, cfg: ExperimentConfig) -> int:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("this node has no 'partition-id' in its node config")
    cid = int(node["partition-id"])
    if not 0 <= cid < cfg.federation.num_clients:
        raise ValueError(f"partition-id {cid} is not one of the federation's {cfg.federation.num_clients} clients")
    return cid


def _process(cfg: ExperimentConfig) -> _Process:
    key = hashlib.sha256(cfg.to_yaml().encode()).hexdigest()
    if key not in _PROCESSES:
        resident = load_resident(cfg)
        _PROCESSES[key] = _Process(resident, build_client(cfg, resident), attacker_probe(cfg, resident))
    return _PROCESSES[key]


def _role(proc: _Process, cfg: ExperimentConfig, cid: int, context):
    """This client's data and role: honest, or (simulation only, from ``attack.*``) an attacker's."""
    if cid not in proc.roles:
        tokenizer = proc.resident.loaded.tokenizer
        data = {cid: _node_data(cfg, tokenizer, cid, context)}
        population = build_population(cfg, tokenizer, data, proc.attacker_probe)
        proc.data[cid] = data[cid]
        proc.roles[cid] = population.role(proc.client, cid)
    return proc.data[cid], proc.roles[cid]


def _node_data(cfg: ExperimentConfig, tokenizer, cid: int, context):
    """The node's own file (``data-path`` in its node config) or its partition of the configured data."""
    path = context.node_config.get("data-path")
    if not path:
        return build_one_client_data(cfg, tokenizer, cid, audited_client(cfg))

    n = cfg.data.examples_per_client
    rows = load_source(str(path), None, n, cfg.seed)  # the site's own file: every row is its training data
    examples = DataTokenizer(tokenizer, cfg)(sample_examples(rows, n, numpy_rng(cfg.seed, "node-data", cid), str(path)))
    if not examples:
        raise ValueError(f"{path}: no usable training examples (data.max_length={cfg.data.max_length})")
    return ClientData(cid, examples, {"own file": len(examples)})


def client_app(cfg: ExperimentConfig | None = None):
    """A ``ClientApp`` for ``cfg`` (None: read it from the run config)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def settings(context) -> ExperimentConfig:
        return cfg if cfg is not None else config_from_context(context)

    @app.query(records.QUERY_IDENTITY)
    def identify(msg: Message, context) -> Message:
        """The server's roster asks each node which client it is."""
        c = settings(context)
        return Message(RecordDict({records.META: ConfigRecord({"client_id": client_id_of(context, c)})}),
                       reply_to=msg)

    @app.train(mods=[secagg.client_mod(settings, client_id_of)])
    def train(msg: Message, context) -> Message:
        c = settings(context)
        cid = client_id_of(context, c)
        secure = c.privacy.secure_aggregation != "none"  # then only secaggplus_mod calls this, in its masking stage
        if secure:
            ins, drop = records.instructions_from_fitins(msg.content)
        else:
            ins, drop = records.instructions_from_content(msg.content), False
        if int(ins.client_id) != cid:
            raise ValueError(f"instructions for client {ins.client_id} reached client {cid}")
        proc = _process(c)
        data, role = _role(proc, c, cid, context)
        state = records.load_client_state(context)
        update = role.run(ins, data, state)  # EncodeError ends in an error reply the server logs
        records.save_client_state(context, state)
        if secure:  # the mod masks the vector and clears it from the reply
            return Message(secagg.masked_reply_content(update, proc.client.wire.sent_view(ins.global_adapter), drop),
                           reply_to=msg)
        return Message(records.update_content(update), reply_to=msg)

    return app


app = client_app()  # for `flwr run` / SuperNodes: the config comes with the run
