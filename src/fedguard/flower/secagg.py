"""Secure aggregation on the Flower engine: Flower's own SecAgg+, ``SecAggPlusWorkflow`` on the server and
``secaggplus_mod`` on the ClientApp, run once per round from fedguard's loop (``privacy.secure_aggregation``).

How one round runs (``secure_exchange``, the Flower engine's ``exchange`` under secure aggregation):

* ``SecAggPlusWorkflow`` is a legacy-strategy workflow: its setup stage asks ``context.strategy.configure_fit``
  for the round's (ClientProxy, FitIns) pairs, and its unmask stage hands the unmasked aggregate to
  ``context.strategy.aggregate_fit``. fedguard's loop samples and aggregates itself, so the strategy is a
  one-round ``RoundStrategy``: ``configure_fit`` returns the round's ``Instructions`` as FitIns (they travel
  with the 'collect masked vectors' message), ``aggregate_fit`` keeps what it is given and changes nothing. The
  workflow runs on a fresh ``LegacyContext`` per round (its state: the round number and empty parameters).
* A node's train handler runs the client (which clips, and under distributed DP noises, its update) and hands
  ``secaggplus_mod`` one float64 vector, the embedded engine's layout: local - global over the tensors that
  travel, then the client's [norm <= clip] bit. The mod quantises and masks it and clears the reply's arrays;
  the server receives masked integers only, and ``aggregate_fit`` receives the aggregate only (the workflow
  writes the same aggregate into every result's parameters).
* Weights: the mod uploads [q·Q, quantise(q·x)] with q = num_examples / max_weight, and the workflow divides
  by the sum of the q·Q. Every client reports num_examples 1 and the workflow gets max_weight 1, so q = 1 and
  the workflow returns (Σ x_u) / n over the n clients whose masked vectors arrived; times n is the sum. The
  dequantisation offset -(n-1)·clipping_range is the workflow's own, over the same n.

Reproducibility: Flower's stochastic rounding draws from NumPy's global RandomState; the node's mod
(``client_mod``) loads it, right before the mod quantises, from the seed the embedded engine uses for the same
client and round, and gives the node's state back afterwards, so both engines round alike.

Dropouts: a node that fails after key sharing (while training or masking) is recovered by the workflow from its
neighbours' shares; ``privacy.secagg_dropout`` makes that fraction of the round's clients (the embedded engine's
seeded draw) do so. A node that fails in the setup or share-keys stage halts Flower's workflow (nobody holds
shares of its secrets, and its unmask stage requires them for every sampled node): nothing of that round is
summed, as when too few survive.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.strategy import Strategy

from fedguard.engine import Replies
from fedguard.federated.transport import WireSpec
from fedguard.flower import records
from fedguard.messages import UpdateSum
from fedguard.privacy.secagg import client_vector, round_settings, sum_from_vector
from fedguard.seeding import derive_seed, numpy_rng

log = logging.getLogger("fedguard")

PROTOCOL = "secagg+"
FITRES_METRICS = "fitres.metrics"  # the record compat.fitres_to_recorddict puts FitRes.metrics in


class SimulatedDropout(RuntimeError):
    """Raised by a node that ``privacy.secagg_dropout`` chose to drop after key sharing."""


# -- the vector a client contributes (the embedded engine's layout: fedguard.privacy.secagg.secure_round_sum) ---
def quantize_seed(seed: int, server_round: int, client_id: str) -> int:
    """The seed of a client's stochastic rounding in a round: the embedded engine's (SecAggClient)."""
    return derive_seed(derive_seed(seed, "secagg", server_round), "secagg-quantize", str(client_id))


# -- node side -----------------------------------------------------------------------------------------------
def client_mod(settings, client_id_of):
    """The train handler's mod: under ``privacy.secure_aggregation`` every train message goes through Flower's
    ``secaggplus_mod`` (a node configured for it never answers a train message with its plain update); otherwise
    the message goes straight to the handler. ``settings(context)`` gives the node's config,
    ``client_id_of(context, cfg)`` its client id."""

    def secure_aggregation(msg, context, call_next):
        cfg = settings(context)
        if cfg.privacy.secure_aggregation == "none":
            return call_next(msg, context)
        from flwr.client.mod import secaggplus_mod

        def train_then_seed(m, c):
            out = call_next(m, c)  # training; the mod quantises the vector next, drawing from NumPy's global RNG
            seed = quantize_seed(cfg.seed, records.fitins_round(m.content), str(client_id_of(c, cfg)))
            np.random.set_state(np.random.MT19937(seed).state)
            return out

        saved = np.random.get_state()
        try:
            return secaggplus_mod(msg, context, train_then_seed)
        finally:
            np.random.set_state(saved)

    return secure_aggregation


def masked_reply_content(update, sent_global, drop: bool):
    """What the train handler gives ``secaggplus_mod`` for ``update``: its vector over ``sent_global`` (the
    global tensors that travel) and its training metrics; the [norm <= clip] bit travels inside the vector,
    never beside it. ``SimulatedDropout`` when the server's simulation chose this client to drop."""
    if drop:
        raise SimulatedDropout(f"client {update.client_id} drops out after key sharing (privacy.secagg_dropout)")
    metrics = {k: v for k, v in update.metrics.items() if k != "dp_unclipped"}
    return records.vector_fitres_content(client_vector(update, sent_global), metrics)


# -- server side ---------------------------------------------------------------------------------------------
class RoundStrategy(Strategy):
    """The strategy ``SecAggPlusWorkflow`` drives for one round: ``configure_fit`` returns the round's FitIns,
    ``aggregate_fit`` keeps what the workflow hands it (the aggregate only) and updates nothing."""

    def __init__(self, fitins: list[tuple[int, Any]]) -> None:
        self.fitins = fitins  # (node id, FitIns) per sampled client with a node
        self.pairs: list = []  # (ClientProxy, FitIns), made with the round's context
        self.results: list | None = None  # (ClientProxy, FitRes) per client whose masked vector is in the sum
        self.failures: list = []

    def context(self, grid, server_round: int):
        """A fresh ``LegacyContext`` for one run of the workflow: this strategy, the round's nodes registered
        with a client manager, and the state the workflow reads (the round; parameters, empty and unused)."""
        from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
        from flwr.server.client_manager import SimpleClientManager
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey

        manager = SimpleClientManager()
        self.pairs = [(GridClientProxy(node, grid, 0), fitins) for node, fitins in self.fitins]
        for proxy, _ in self.pairs:
            manager.register(proxy)
        state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                            MAIN_PARAMS_RECORD: ArrayRecord()})
        return LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                             strategy=self, client_manager=manager)

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return list(self.pairs)

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class MeteredGrid:
    """The Grid as the workflow sees it: the same messages, and on the way each client's bytes (whole messages),
    the protocol's own bytes (the SecAgg+ config records down; replies, masked vectors included, up), which nodes
    failed which stage, the clients' training metrics (plain numbers beside their masked vectors) and the
    round's progress line."""

    def __init__(self, grid, clients: dict[int, str], server_round: int, progress) -> None:
        self.grid, self.clients, self.server_round, self.progress = grid, clients, server_round, progress
        self.transport = {cid: {"down": 0, "up": 0} for cid in clients.values()}
        self.protocol_down = self.protocol_up = 0
        self.stages: list[str] = []  # in the order the workflow ran them
        self.errors: dict[str, dict[int, str]] = {}  # stage -> node -> why it gave no usable reply
        self.setup: dict[str, Any] = {}  # what the setup stage told every node (shares, threshold, ranges)
        self.metrics: dict[int, dict[str, float]] = {}  # node -> metrics beside its masked vector

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        if not messages:
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        self.stages.append(stage)
        if stage == Stage.SETUP:
            self.setup = dict(messages[0].content.config_records[RECORD_KEY_CONFIGS])
        for m in messages:
            cid = self.clients.get(m.metadata.dst_node_id)
            if cid is not None:
                self.transport[cid]["down"] += records.message_nbytes(m.content)
            self.protocol_down += records.record_nbytes(m.content.config_records[RECORD_KEY_CONFIGS])
        self.progress.status(f"round {self.server_round} · SecAgg+ {stage} · waiting for {len(messages)} nodes")
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        errors = self.errors.setdefault(stage, {})
        answered = set()
        for reply in replies:
            node = records.addressee(reply, asked)
            answered.add(node)
            if reply.has_error():
                errors[node] = records.error_reason(reply)
                continue
            n = records.message_nbytes(reply.content)
            self.protocol_up += n
            if node in self.clients:
                self.transport[self.clients[node]]["up"] += n
            if stage == Stage.COLLECT_MASKED_VECTORS and FITRES_METRICS in reply.content.config_records:
                self.metrics[node] = _numbers(reply.content.config_records[FITRES_METRICS])
        for node in set(asked.values()) - answered:
            errors[node] = "no_reply: the node did not answer within federation.round_timeout"
        return replies

    def first_error(self, node: int) -> str | None:
        for stage in self.stages:
            if node in self.errors.get(stage, {}):
                return f"{stage}: {self.errors[stage][node]}"
        return None


def _numbers(record) -> dict[str, float]:
    """A node's metrics: finite numbers only, and never the [norm <= clip] bit (it belongs inside the sum)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(float(v)) and k != "dp_unclipped":
            out[str(k)] = float(v)
    return out


def _halt_reason(metered: MeteredGrid, num_clients: int) -> str:
    """Why the workflow stopped before unmasking (it logs, and returns, nothing more than that it did)."""
    first = next((stage for stage in metered.stages if metered.errors.get(stage)), None)
    failed = f"{len(metered.errors[first])} of {num_clients} nodes failed its '{first}' stage" if first else \
        "no node failed"
    return (f"Flower's SecAgg+ workflow stopped in its '{metered.stages[-1] if metered.stages else 'setup'}' stage "
            f"({failed}; a secret needs {metered.setup.get(Key.THRESHOLD, '?')} of "
            f"{metered.setup.get(Key.SHARE_NUMBER, '?')} shares)")


def _nothing(sent_global, report: dict[str, Any]) -> UpdateSum:
    """A round that sums nothing (the global adapter moves only by what DP adds)."""
    return UpdateSum({k: torch.zeros_like(t, dtype=torch.float64) for k, t in sent_global.items()}, [], report=report)


def _nodes_of(instructions, roster: dict[str, int], replies) -> dict[int, str]:
    """Node id -> client id for the round's sampled clients, in sampling order; a client no node has enrolled
    as fails with ``no_node``."""
    clients: dict[int, str] = {}
    for cid in instructions:
        node = roster.get(cid)
        if node is None:
            replies.failed[cid] = "no_node: no node has enrolled as this client"
        else:
            clients[node] = cid
    return clients


def _cannot_sum(n: int, settings) -> str | None:
    """Why ``n`` clients cannot be summed under ``settings`` (None: they can)."""
    if n < 2:
        return f"{n} client(s) with a node, fewer than the 2 secure aggregation needs"
    if n * settings.quantization_range >= settings.modulus_range:
        return (f"{n} clients x quantization_range {settings.quantization_range} does not fit in "
                f"modulus_range {settings.modulus_range}")
    return None


def _read_sum(strategy, clients: dict[int, str], sent_global, report: dict[str, Any]):
    """(the round's ``UpdateSum``, None), or (None, why) when the workflow's aggregate is unusable. The workflow
    wrote the aggregate, (Σ x_u) / n over the n results, into every result's parameters."""
    survivors = [proxy.node_id for proxy, _ in strategy.results]
    arrays = parameters_to_ndarrays(strategy.results[0][1].parameters)
    try:
        if len(arrays) != 1:
            raise ValueError(f"the aggregate has {len(arrays)} arrays, not 1")
        total, unclipped = sum_from_vector(np.asarray(arrays[0], dtype=np.float64) * len(survivors), sent_global)
        return UpdateSum(total, [clients[n] for n in clients if n in survivors], unclipped, report), None
    except ValueError as exc:
        return None, f"the SecAgg+ aggregate is unusable: {exc}"


def secure_exchange(grid, cfg, roster: dict[str, int], server_round: int, instructions, progress):
    """One round under secure aggregation: Flower's ``SecAggPlusWorkflow`` among the sampled clients' nodes;
    ``Replies`` with no messages, the sum in ``summed`` (see the module's docstring)."""
    from flwr.server.workflow import SecAggPlusWorkflow

    p = cfg.privacy
    replies = Replies([], {})
    if not instructions:
        return replies
    clients = _nodes_of(instructions, roster, replies)
    first = next(iter(instructions.values()))
    sent_global = WireSpec.from_config(cfg).sent_view(first.global_adapter)
    settings = round_settings(first.config, p.secagg_quantization_range, p.secagg_share_fraction,
                              p.secagg_reconstruction_fraction)
    report: dict[str, Any] = {"secure_aggregation": PROTOCOL, "dropped": [], "bytes_up": 0, "bytes_down": 0,
                              "clipping_range": settings.clipping_range,
                              "quantization_range": settings.quantization_range}
    why = _cannot_sum(len(clients), settings)
    if why is not None:  # nothing is sent: no client trains for a sum that cannot be made
        log.warning("round %d: secure aggregation skipped (%s); nothing is summed", server_round, why)
        replies.failed.update({cid: f"secure_aggregation: {why}" for cid in clients.values()})
        replies.summed = _nothing(sent_global, {**report, "skipped": why})
        return replies

    # privacy.secagg_dropout: the embedded engine's seeded draw; those nodes fail after key sharing
    ids = sorted(clients.values())
    gone = {str(c) for c in numpy_rng(cfg.seed, "secagg-dropout", server_round).permutation(ids)[
        : int(p.secagg_dropout * len(ids))]}
    strategy = RoundStrategy([(node, records.instructions_fitins(instructions[cid], cid in gone))
                              for node, cid in clients.items()])
    workflow = SecAggPlusWorkflow(float(p.secagg_share_fraction), float(p.secagg_reconstruction_fraction),
                                  max_weight=1.0, clipping_range=float(settings.clipping_range),
                                  quantization_range=settings.quantization_range,
                                  modulus_range=settings.modulus_range, timeout=cfg.federation.round_timeout)
    metered = MeteredGrid(grid, clients, server_round, progress)
    try:
        workflow(metered, strategy.context(grid, server_round))
    except Exception as exc:  # noqa: BLE001 - e.g. a node's masked vector of the wrong shape: the round goes on
        why = f"Flower's SecAgg+ workflow raised {type(exc).__name__}: {str(exc)[:300]}"
        log.debug("the SecAgg+ workflow raised", exc_info=True)
    replies.transport = metered.transport
    report.update(bytes_up=metered.protocol_up, bytes_down=metered.protocol_down)

    summed = None
    if why is None and strategy.results:
        summed, why = _read_sum(strategy, clients, sent_global, report)
    if summed is None:
        why = why or _halt_reason(metered, len(clients))
        log.warning("round %d: secure aggregation failed (%s); nothing is summed", server_round, why)
        for node, cid in clients.items():
            mine = metered.first_error(node)
            replies.failed[cid] = f"secure_aggregation: {why}" + (f"; this node failed {mine}" if mine else "")
        replies.summed = _nothing(sent_global, {**report, "halted": why})
        replies.metrics = {cid: metered.metrics[n] for n, cid in clients.items() if n in metered.metrics}
        return replies

    lost = metered.errors.get(Stage.COLLECT_MASKED_VECTORS, {})
    report["dropped"] = [cid for n, cid in clients.items() if n in lost]
    for node in lost:
        cid = clients[node]
        how = "simulated" if cid in gone else lost[node]
        replies.failed[cid] = f"dropped out after key sharing ({how}); its masks were removed from the sum"
    replies.metrics = {cid: metered.metrics.get(n, {}) for n, cid in clients.items() if cid in summed.clients}
    replies.summed = summed
    return replies
