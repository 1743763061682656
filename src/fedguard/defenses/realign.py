"""Server-side realignment: a few steps on the server's own safety data after each round's aggregation.

Honest fine-tuning of an aligned model wears its refusals away (Qi et al. 2023, "Fine-tuning aligned language
models compromises safety, even when users do not intend to"): every client's benign update is accepted, and
the aggregate still refuses less. No client is to blame, so no per-client defense can help. The server can:
it holds data of its own (harmful requests answered with refusals, benign look-alikes answered helpfully: the
defender's probe split, disjoint from the federation's training and evaluation data), and after aggregating it
takes ``steps`` optimizer steps on that data from the new global adapter, the way alignment-stage methods mix
alignment data back into fine-tuning (Lisa, Huang et al. 2024, alternates alignment and user-data steps).

The look-alikes keep the steps from teaching "refuse anything that sounds dangerous"; their share is set by
``lookalike_examples``. The steps start from a fresh optimizer every round (no state to checkpoint) and are
seeded by (run seed, round), so a resumed run realigns exactly as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fedguard.config import RealignConfig
from fedguard.data.federation import ClientData
from fedguard.messages import AdapterState, RoundConfig
from fedguard.seeding import derive_seed

REALIGN_CLIENT = "server-realign"  # the trainer's name for the server's own steps (never a client's id)


@dataclass
class ServerRealignment:
    cfg: RealignConfig
    trainer: Any  # the resident LocalTrainer
    data: ClientData  # the server's tokenised safety data, under the id REALIGN_CLIENT
    seed: int
    train_lora_a: bool = True  # False under FFA-LoRA: the server trains B only, as clients do

    def __call__(self, server_round: int, adapter: AdapterState) -> tuple[AdapterState, dict[str, Any]]:
        """The realigned global adapter and the round's report."""
        t0 = time.perf_counter()
        rc = RoundConfig(server_round=server_round, lr=self.cfg.lr, local_steps=self.cfg.steps,
                         batch_size=self.cfg.batch_size, grad_accum=1,
                         seed=derive_seed(self.seed, "server-realign"), max_grad_norm=1.0,
                         train_lora_a=self.train_lora_a)
        with self.trainer.holding(REALIGN_CLIENT, {}):  # fresh moments every round, kept nowhere
            update = self.trainer.train(adapter, rc, self.data)
        m = update.metrics
        report = {"steps": self.cfg.steps, "loss_first": m["train_loss_first"], "loss_last": m["train_loss_last"],
                  "seconds": time.perf_counter() - t0}
        return update.tensors, report
