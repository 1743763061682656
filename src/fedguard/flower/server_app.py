"""Flower ServerApp: the embedded engine's run loop with Flower's Grid as the way to reach clients.

``run_experiment`` is the same function the embedded engine runs (configure, exchange, aggregate, evaluate,
log, checkpoint); only the exchange differs: ``FlowerClients`` sends each sampled client's ``Instructions``
to its node and turns the replies back into ``ClientUpdate``s. No federated logic lives here.

Under ``privacy.secure_aggregation`` the exchange is Flower's SecAgg+ workflow (``fedguard.flower.secagg``):
the replies carry no update, only the round's sum.

The server keeps a roster (client id -> node id), built by asking every node which client it is; replies
from nodes not on the roster, or from nodes that were not sent anything this round, are dropped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedguard.config import ExperimentConfig
from fedguard.engine import Replies
from fedguard.flower import records, secagg
from fedguard.flower.client_app import config_from_context
from fedguard.simulation.population import build_population
from fedguard.simulation.runner import run_experiment

log = logging.getLogger("fedguard")

class FlowerClients:
    """An engine's client side (``fedguard.engine.ClientSide``) over a Flower ``Grid``; the embedded one is
    ``simulation.embedded.EmbeddedClients``."""

    def __init__(self, grid, cfg: ExperimentConfig, resident, attacker_probe):
        self.grid, self.cfg = grid, cfg
        # ground truth from the config's attack section: used for detection metrics only, never by the server
        self.population = build_population(cfg, resident.loaded.tokenizer, {}, attacker_probe)
        self.roster: dict[str, int] = {}  # client id -> node id

    # -- roster ----------------------------------------------------------------------------------------
    def enroll(self) -> None:
        """Wait for ``federation.min_nodes`` nodes, then ask each which client it is."""
        from flwr.app import ConfigRecord, Message, RecordDict

        f = self.cfg.federation
        wanted = f.min_nodes or f.num_clients
        deadline = time.monotonic() + f.node_wait
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < wanted and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) < wanted:
            raise RuntimeError(f"only {len(nodes)} of the {wanted} nodes (federation.min_nodes) joined within "
                               f"{f.node_wait:.0f} s (federation.node_wait)")
        queries = [Message(RecordDict({records.META: ConfigRecord({})}), dst_node_id=n,
                           message_type=f"query.{records.QUERY_IDENTITY}") for n in nodes]
        replies = list(self.grid.send_and_receive(queries, timeout=f.node_wait))
        asked = {q.metadata.message_id: q.metadata.dst_node_id for q in queries}
        for reply in replies:
            node = records.addressee(reply, asked)
            if reply.has_error():
                log.warning("node %s did not say which client it is: %s", node, records.error_reason(reply))
                continue
            try:
                cid = str(int(reply.content[records.META]["client_id"]))
            except Exception as exc:  # noqa: BLE001 - a node's answer is untrusted
                log.warning("node %s sent a malformed identity (%s)", node, exc)
                continue
            if not 0 <= int(cid) < f.num_clients:
                log.warning("node %s claims client %s, not one of the %d clients", node, cid, f.num_clients)
            elif cid in self.roster:
                log.warning("node %s claims client %s, already node %s's; ignored", node, cid, self.roster[cid])
            else:
                self.roster[cid] = node
        log.info("roster: %d of %d clients have a node", len(self.roster), f.num_clients)

    # -- one round -------------------------------------------------------------------------------------
    def exchange(self, server_round: int, instructions, progress):
        from flwr.app import Message

        if not self.roster:
            self.enroll()
        if self.cfg.privacy.secure_aggregation != "none":  # Flower's SecAgg+: the server gets only the sum

            return secagg.secure_exchange(self.grid, self.cfg, self.roster, server_round, instructions, progress)
        replies = Replies([], {})
        sent: dict[int, str] = {}  # node id -> client id this round
        outgoing = []
        for cid, ins in instructions.items():
            node = self.roster.get(cid)
            if node is None:
                replies.failed[cid] = "no_node: no node has enrolled as this client"
                continue
            content = records.instructions_content(ins)
            replies.transport[cid] = {"down": records.message_nbytes(content), "up": 0}
            outgoing.append(Message(content, dst_node_id=node, message_type="train", group_id=str(server_round)))
            sent[node] = cid
        progress.status(f"round {server_round} · waiting for {len(outgoing)} nodes")
        answers = list(self.grid.send_and_receive(outgoing, timeout=self.cfg.federation.round_timeout))
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in outgoing}
        for reply in answers:
            cid = sent.get(records.addressee(reply, asked))
            if cid is None or cid in replies.metrics or cid in replies.failed:
                log.warning("round %d: dropped a reply from node %s (not asked, or a second reply)", server_round,
                            reply.metadata.src_node_id)
                continue
            if reply.has_error():
                replies.failed[cid] = f"node_error: {records.error_reason(reply)}"
                continue
            try:
                update = records.update_from_reply(reply.content, cid)
            except Exception as exc:  # noqa: BLE001 - whatever a node sends, the round goes on
                replies.failed[cid] = f"malformed: {type(exc).__name__}: {str(exc)[:records.REASON_CHARS]}"
                continue
            replies.transport[cid]["up"] = records.message_nbytes(reply.content)
            replies.messages.append(update)
            replies.metrics[cid] = update.metrics
        # replies arrive in any order; the server sees them in the round's sampling order (the same sums as the
        # embedded engine, float for float)
        order = {cid: k for k, cid in enumerate(instructions)}
        replies.messages.sort(key=lambda m: order[m.client_id])
        replies.metrics = {cid: replies.metrics[cid] for cid in instructions if cid in replies.metrics}
        for cid in sent.values():
            if cid not in replies.metrics and cid not in replies.failed:
                replies.failed[cid] = "no_reply: the node did not answer within federation.round_timeout"
        for cid, why in replies.failed.items():
            log.warning("round %d: client %s sent nothing usable (%s)", server_round, cid, why)
        return replies

    # client state lives on the nodes (Context.state), not with the server
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, states: dict) -> None:
        if states:
            log.warning("the checkpoint holds client state of an embedded run; Flower nodes keep their own")


def server_app(cfg: ExperimentConfig | None = None, run_dir: Path | None = None, outcome: dict | None = None):
    """A ``ServerApp`` running ``cfg`` into ``run_dir`` (None: both from the run config, ``config`` = the YAML
    text and ``run-dir``); ``outcome`` receives the ``RunResult`` or the exception."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        try:
            c = cfg if cfg is not None else config_from_context(context)
            given = str(context.run_config.get("run-dir", "") or "").strip()  # "" in the app's defaults: unset
            rd = run_dir if run_dir is not None else (Path(given) if given else None)
            result = run_experiment(c, rd, quiet=True,
                                    clients=lambda c2, resident, probe: FlowerClients(grid, c2, resident, probe))
            if outcome is not None:
                outcome["result"] = result
        except BaseException as exc:
            if outcome is not None:
                outcome["error"] = exc
            raise

    return app


app = server_app()  # for `flwr run` / SuperLink: the config comes with the run
