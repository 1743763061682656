"""The behaviour audit: what a client's update does to the server's own prompts.

A fifth defense level beside the probe's four (none of the Safe-FedLLM anchors has it). The server keeps a
private, seeded set of harmful requests paired with refusal answers, and benign control examples, drawn from
its own data (the defender's probe split: disjoint from the federation's training and evaluation data) and
never sent to clients. For each update it loads the client's adapter on the resident model and measures the
teacher-forced loss of those answers against the round's global adapter:

* ``refusal shift`` = loss(refusal answers | client) - loss(refusal answers | global): an update that
  unlearns refusing raises it; honest clients (on an aligned start) leave it where it was or lower it;
* ``benign shift`` likewise on the control examples: only an *increase* counts (a destructive update).

suspicion s = refusal shift + benign_weight * max(benign shift, 0). Two scale-free tests turn s into a
distance d, and d into a weight: relative to the round (a robust z-score against the median and MAD of the
round's clients, the spread floored at ``min_spread`` x |median| so near-identical honest clients flag no
one) and absolute (``absolute_margin`` nats, which keeps working when most clients in a round are attackers
and the median is one of them). d = max(z / z_threshold, s / absolute_margin); weight = 1 - sigmoid(slope *
(d - 1)), 0.5 at d = 1.

What the audit cannot see: behaviour that its prompts do not exercise (a trigger phrase the server never
sends), and an update that keeps the refusal answers likely on the server's prompts while changing behaviour
elsewhere. docs/guide/safety.md's adaptive-attacker table measures both.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any


from fedguard.config import AuditConfig
from fedguard.data.tokenize import TokenizedExample
from fedguard.messages import AdapterState, ClientUpdate
from fedguard.model.loss import heldout_loss

MAD_TO_SIGMA = 1.4826


@dataclass
class AuditResult:
    client_id: str
    weight: float
    refusal_shift: float
    benign_shift: float
    suspicion: float
    z: float
    distance: float

    def to_json(self) -> dict[str, Any]:
        return {"weight": self.weight, "refusal_shift": self.refusal_shift, "benign_shift": self.benign_shift,
                "suspicion": self.suspicion, "z": self.z, "distance": self.distance}


@dataclass
class AuditState:
    """Per client: how many rounds it was audited and its running mean distance (reports, resume)."""

    count: dict[str, int] = field(default_factory=dict)
    mean_distance: dict[str, float] = field(default_factory=dict)

    def add(self, client: str, d: float) -> None:
        k = self.count.get(client, 0)
        self.mean_distance[client] = (self.mean_distance.get(client, 0.0) * k + d) / (k + 1)
        self.count[client] = k + 1


def audit_weight(d: float, slope: float) -> float:
    return 1.0 - 1.0 / (1.0 + math.exp(-max(min(slope * (d - 1.0), 60.0), -60.0)))


def robust_z(values: list[float], min_spread: float) -> list[float]:
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    spread = max(MAD_TO_SIGMA * mad, min_spread * abs(med), 1e-6)
    return [(v - med) / spread for v in values]


class BehaviourAudit:
    def __init__(self, cfg: AuditConfig, slot, loss_fn, harmful: list[TokenizedExample],
                 benign: list[TokenizedExample], pad_id: int, batch_size: int = 16):
        if len(harmful) < 2:
            raise ValueError("the behaviour audit needs at least 2 harmful-request -> refusal examples")
        self.cfg, self.slot, self.loss_fn, self.pad_id, self.batch_size = cfg, slot, loss_fn, pad_id, batch_size
        self.harmful = [self._truncate(e) for e in harmful]
        self.benign = [self._truncate(e) for e in benign]
        self.state = AuditState()
        self.last_seconds = 0.0

    def _truncate(self, e: TokenizedExample) -> TokenizedExample:
        """Keep the prompt's end and the answer's start: what a refusal decides is in its first tokens."""
        if len(e.input_ids) <= self.cfg.max_tokens:
            return e
        keep_prompt = min(e.prompt_len, self.cfg.max_tokens // 2)
        ids = e.input_ids[e.prompt_len - keep_prompt: e.prompt_len + self.cfg.max_tokens - keep_prompt]
        return TokenizedExample(tuple(ids), keep_prompt)

    def _mean_loss(self, examples: list[TokenizedExample]) -> float:
        """Mean completion-token loss of one audit set; an empty set shifts nothing (0.0)."""
        device = next(iter(self.slot.named_parameters().values())).device
        loss = heldout_loss(self.loss_fn, examples, self.pad_id, self.batch_size, device)
        return 0.0 if loss is None else loss

    def _losses(self, adapter: AdapterState) -> tuple[float, float]:
        self.slot.load(adapter)
        return self._mean_loss(self.harmful), self._mean_loss(self.benign)

    def assess(self, global_adapter: AdapterState, updates: list[ClientUpdate]) -> list[AuditResult]:
        """One result per update (whole adapters, already decoded and validated), in order."""
        t0 = time.perf_counter()
        model = self.loss_fn.peft_model
        was_training = model.training
        model.eval()
        try:
            ref_h, ref_b = self._losses(global_adapter)
            shifts = []
            for u in updates:
                h, b = self._losses(u.tensors)
                shifts.append((h - ref_h, b - ref_b))
        finally:
            model.train(was_training)
        c = self.cfg
        suspicion = [rs + c.benign_weight * max(bs, 0.0) for rs, bs in shifts]
        zs = robust_z(suspicion, c.min_spread) if len(suspicion) >= 3 else [0.0] * len(suspicion)
        out = []
        for u, (rs, bs), s, z in zip(updates, shifts, suspicion, zs):
            d = max(z / c.z_threshold, s / c.absolute_margin if c.absolute_margin > 0 else -math.inf)
            if not math.isfinite(d):  # a loss that overflowed: the update breaks the model
                d = math.inf
            out.append(AuditResult(str(u.client_id), audit_weight(d, c.slope), rs, bs, s, z, d))
            self.state.add(str(u.client_id), min(d, 1e6))
        self.last_seconds = time.perf_counter() - t0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"count": dict(self.state.count), "mean_distance": dict(self.state.mean_distance)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.state = AuditState({k: int(v) for k, v in d["count"].items()}, dict(d["mean_distance"]))
