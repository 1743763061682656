"""The embedded engine: every sampled client's role run in this process, on the one resident model.

The clients' data and state are held here (and checkpointed with the run); under secure aggregation the
clients' SecAgg+ protocol runs here too, and the server side gets only the sum.
"""

from __future__ import annotations

import logging
import time

from fedguard.config import ExperimentConfig
from fedguard.data.federation import build_client_data
from fedguard.engine import Replies
from fedguard.factories import Resident, build_client
from fedguard.federated.client import ClientState, EncodeError
from fedguard.messages import Instructions
from fedguard.privacy.canaries import audited_client
from fedguard.seeding import derive_seed, numpy_rng
from fedguard.simulation.population import build_population
from fedguard.simulation.progress import RunProgress

log = logging.getLogger("fedguard")


class EmbeddedClients:
    """The embedded engine's side of a round: every sampled client's role, run in this process on the one
    resident model, with the clients' data and state held here (and checkpointed with the run)."""

    def __init__(self, cfg: ExperimentConfig, resident: Resident, attacker_probe):
        self.data = build_client_data(cfg, resident.loaded.tokenizer, audited_client(cfg))
        # ground truth: which clients are malicious (they run their attacker's role; metrics only otherwise)
        self.population = build_population(cfg, resident.loaded.tokenizer, self.data, attacker_probe)
        self.client = build_client(cfg, resident)
        self.states: dict[str, ClientState] = {}
        self.privacy, self.seed = cfg.privacy, cfg.seed
        log.info("%d clients with %s examples", len(self.data), [len(c) for c in self.data])

    def exchange(self, server_round: int, instructions: dict[str, Instructions], progress: RunProgress) -> Replies:
        replies = Replies([], {})
        for k, (cid, ins) in enumerate(instructions.items()):
            progress.status(f"round {server_round} · client {cid} ({k + 1}/{len(instructions)})")
            state = self.states.setdefault(cid, ClientState())
            try:
                message = self.population.role(self.client, cid).run(ins, self.data[int(cid)], state,
                                                                      on_step=progress.step)
            except EncodeError as exc:
                replies.failed[cid], replies.metrics[cid] = f"encode_failed: {exc}", exc.update.metrics
                log.warning("round %d: client %s could not encode its update (%s)", server_round, cid, exc)
                continue
            replies.messages.append(message)
            replies.metrics[cid] = message.metrics
        if self.privacy.secure_aggregation != "none":
            self._secure_sum(server_round, instructions, replies)
        return replies

    def _secure_sum(self, server_round: int, instructions: dict[str, Instructions], replies: Replies) -> None:
        """SecAgg+ among the round's clients, in this process: the server side gets only the sum. With
        ``privacy.secagg_dropout``, that fraction of the clients (seeded) drops after sharing keys."""
        # lazy: privacy.secagg imports flwr (0.8 s), which a run without secure aggregation never needs
        from fedguard.privacy.secagg import round_settings, secure_round_sum

        p, messages = self.privacy, replies.messages
        replies.messages = []
        if not messages:
            return
        ins = next(iter(instructions.values()))
        sent = self.client.wire.sent_view(ins.global_adapter)
        ids = sorted(m.client_id for m in messages)
        gone = numpy_rng(self.seed, "secagg-dropout", server_round).permutation(ids)[: int(p.secagg_dropout * len(ids))]
        settings = round_settings(ins.config, p.secagg_quantization_range, p.secagg_share_fraction,
                                  p.secagg_reconstruction_fraction)
        t0 = time.perf_counter()
        try:
            replies.summed = secure_round_sum(messages, sent, settings, derive_seed(self.seed, "secagg", server_round),
                                              dropped=[str(c) for c in gone])
            replies.summed.report["seconds"] = time.perf_counter() - t0  # every party's work, in this process
        except ValueError as exc:  # too few survivors to unmask: nothing of this round can be used
            log.warning("round %d: secure aggregation failed (%s); nothing is summed", server_round, exc)
            replies.summed = secure_round_sum([], sent, settings, 0)
            replies.failed.update({m.client_id: f"secure_aggregation: {exc}" for m in messages})
            return
        for m in replies.metrics.values():  # the bit travelled inside the secure sum, not beside it
            m.pop("dp_unclipped", None)
        for cid in replies.summed.report.get("dropped", []):
            replies.failed[cid] = "dropped out after key sharing (simulated); its masks were removed from the sum"

    def state_dict(self) -> dict[str, ClientState]:
        return self.states

    def load_state_dict(self, states: dict[str, ClientState]) -> None:
        self.states = dict(states)
