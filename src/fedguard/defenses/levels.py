"""Safe-FedLLM defense levels: from probe verdicts to per-client aggregation weights.

Each level is a small state machine over the server's view only (client id, probe probabilities,
round index). Formulas follow the official code as specified in ``shared/reference/safe-fedllm.md``
§3; where fedguard departs from it (knee of the client-level map derived from tau; an explicit fail
policy shared by all levels; optional re-audits of clients frozen as malicious) the docstring says so.
All state is JSON-serialisable (``state_dict`` / ``load_state_dict``) so it is checkpointed with
the server state and restored on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def client_level_raw_weight(s: float, knee: float = 0.8, slope: float = 10.0) -> float:
    """The client-level map from the last-step probability ``s`` to a raw weight (§3.2).

    Below the knee: t = 0.5 * sigmoid(slope * (s / knee - 0.5)); above: t = 0.5 + 0.5 * sigmoid(slope *
    ((s - knee) / (1 - knee) - 0.5)); the weight is 1 - t. The official code hard-codes knee = 0.8;
    fedguard sets knee = tau so the map's midpoint is the decision threshold.
    """
    s = min(max(float(s), 0.0), 1.0)
    if s <= knee:
        t = 0.5 * sigmoid(slope * (s / knee - 0.5))
    else:
        t = 0.5 + 0.5 * sigmoid(slope * ((s - knee) / (1.0 - knee) - 0.5))
    return 1.0 - t


def shadow_weight(rho: float, eta: float = 7.0) -> float:
    """(1 - rho) ** eta, rho being the share of a client's steps the probe flags (§3.3)."""
    return (1.0 - min(max(float(rho), 0.0), 1.0)) ** eta


@dataclass
class StepLevel:
    """Beta-Bernoulli trust with time decay, evidence counted in samples (§3.1)."""

    decay: float = 0.95
    prefilter_round: int = 20
    alpha: dict[str, float] = field(default_factory=dict)
    beta: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)

    def weight(self, client: str, server_round: int, flagged_steps: int, samples: int, samples_per_step: int) -> float:
        """``server_round`` is 0-based like the reference (probing while round < prefilter_round)."""
        a, b = self.alpha.get(client, 1.0), self.beta.get(client, 1.0)
        if server_round < self.prefilter_round:
            harm = min(samples, flagged_steps * samples_per_step)
            a = self.decay * a + (samples - harm)
            b = self.decay * b + harm
            self.alpha[client], self.beta[client] = a, b
            self.last[client] = a / (a + b)
            return self.last[client]
        return self.last.get(client, a / (a + b))

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": dict(self.alpha), "beta": dict(self.beta), "last": dict(self.last)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.alpha, self.beta, self.last = dict(d["alpha"]), dict(d["beta"]), dict(d["last"])


@dataclass
class ClientLevel:
    """Last-step probability -> sigmoid map -> running mean over participations (§3.2)."""

    knee: float = 0.8
    slope: float = 10.0
    prefilter_round: int = 20
    mean: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def weight(self, client: str, server_round: int, last_step_probability: float) -> float:
        if server_round >= self.prefilter_round:
            return self.mean.get(client, 1.0)
        raw = client_level_raw_weight(last_step_probability, self.knee, self.slope)
        k = self.count.get(client, 0)
        self.mean[client] = (self.mean.get(client, 0.0) * k + raw) / (k + 1)
        self.count[client] = k + 1
        return self.mean[client]

    def state_dict(self) -> dict[str, Any]:
        return {"mean": dict(self.mean), "count": dict(self.count)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.mean, self.count = dict(d["mean"]), {k: int(v) for k, v in d["count"].items()}


@dataclass
class EvidenceLevel:
    """Shadow probing with evidence collection, freezing and audits (§3.4, repository-only level).

    Departure from the official code: with ``reaudit_malicious`` > 0 a client frozen as malicious is
    shadow-probed again every that many participations, so a false positive can be undone.
    """

    eta: float = 7.0
    threshold: float = 0.8
    evidence_min: int = 3
    audit_interval: int = 5
    reaudit_malicious: int = 0
    status: dict[str, str] = field(default_factory=dict)  # none | benign | malicious
    evidence: dict[str, list[list[float]]] = field(default_factory=dict)  # [weight, is_malicious]
    frozen: dict[str, float] = field(default_factory=dict)
    audit: dict[str, int] = field(default_factory=dict)

    def needs_shadow(self, client: str) -> bool:
        status = self.status.get(client, "none")
        if status == "none":
            return True
        interval = self.audit_interval if status == "benign" else self.reaudit_malicious
        return interval > 0 and self.audit.get(client, 0) + 1 >= interval

    def weight(self, client: str, rho: float | None, last_step_probability: float | None) -> float:
        """``rho``/``last_step_probability`` are None when this round had no shadow run for the client."""
        status = self.status.get(client, "none")
        if status in ("benign", "malicious"):
            self.audit[client] = self.audit.get(client, 0) + 1
            interval = self.audit_interval if status == "benign" else self.reaudit_malicious
            frozen = self.frozen.get(client, 0.0)
            if interval > 0 and self.audit[client] >= interval and last_step_probability is not None:
                self.audit[client] = 0
                flagged = last_step_probability >= self.threshold
                if flagged == (status == "malicious"):
                    return frozen  # the audit confirms the status
                self._reset(client)  # the audit contradicts it: collect evidence again
                return 0.0
            return frozen
        w = shadow_weight(rho or 0.0, self.eta)
        is_mal = float(last_step_probability is not None and last_step_probability >= self.threshold)
        ev = self.evidence.setdefault(client, [])
        ev.append([w, is_mal])
        if len(ev) >= self.evidence_min:
            recent = ev[-self.evidence_min:]
            if all(m for _, m in recent):
                self.status[client], self.frozen[client], self.audit[client] = "malicious", 0.0, 0
                self.evidence[client] = []
                return 0.0
            if not any(m for _, m in recent):
                self.status[client], self.audit[client] = "benign", 0
                self.frozen[client] = sum(x for x, _ in recent) / len(recent)
                self.evidence[client] = []
                return self.frozen[client]
            self.evidence[client] = []
        return w

    def _reset(self, client: str) -> None:
        self.status[client] = "none"
        self.frozen.pop(client, None)
        self.audit[client] = 0
        self.evidence[client] = []

    def state_dict(self) -> dict[str, Any]:
        return {"status": dict(self.status), "evidence": {k: [list(e) for e in v] for k, v in self.evidence.items()},
                "frozen": dict(self.frozen), "audit": dict(self.audit)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.status = dict(d["status"])
        self.evidence = {k: [list(e) for e in v] for k, v in d["evidence"].items()}
        self.frozen, self.audit = dict(d["frozen"]), {k: int(v) for k, v in d["audit"].items()}
