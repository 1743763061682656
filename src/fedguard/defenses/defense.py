"""Server-side Safe-FedLLM defense: probe every update, turn verdicts into aggregation weights.

Uses only the server's view: client ids, the global adapter, θ₀, the updates and their attachments.
Per level (shared/reference/safe-fedllm.md §3):

* step: the client attaches ΔLoRA vs the round-start global after every local step; Beta-Bernoulli
  trust over flagged samples, frozen after ``prefilter_round``;
* client: the probe reads the update itself (last step vs round start); sigmoid map, running mean;
* shadow: the client attaches the steps of a shadow branch trained from θ₀; w = (1 - rho)^eta;
* evidence: shadow probing until ``evidence_min`` consistent verdicts, then frozen, with audits.

One fail policy covers every level: when the probe cannot score a client (attachments missing,
wrong keys or shapes, non-finite values), its weight is 1 (open) or 0 (closed) and the level's state
is left as it was. The weights multiply the aggregator's own (example counts for FedAvg); a round
whose mean weight falls below ``skip_below`` keeps the global adapter unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fedguard.config import DefenseConfig, split_level
from fedguard.defenses.features import FeatureError, adapter_delta
from fedguard.defenses.levels import ClientLevel, EvidenceLevel, StepLevel, shadow_weight
from fedguard.defenses.probe import LoRAProbe
from fedguard.messages import AdapterState, ClientUpdate


@dataclass
class Verdict:
    client_id: str
    weight: float
    probabilities: list[float] = field(default_factory=list)  # per probed step
    score: float | None = None  # summary P(malicious): last probed step
    rho: float | None = None  # share of probed steps flagged
    status: str = "scored"  # scored | unscored (fail policy applied) | frozen (no probing this round) | audited
    reason: str = ""
    audit: dict[str, Any] | None = None  # the behaviour audit's measurements, where it ran
    # P(malicious) of the update itself (vs the round-start global), at every level: the client level's statistic,
    # reported beside the level's own so one run shows both score distributions (never used for weights)
    update_score: float | None = None

    @property
    def suspicion(self) -> float:
        """The ranking score for AUROC: the probe's probability where only the probe ran, the audit's distance
        where only the audit ran, else 1 - weight."""
        if self.audit is not None:
            return self.audit["distance"] if self.score is None else 1.0 - self.weight
        return self.score if self.score is not None else 1.0 - self.weight

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DefenseOutcome:
    weights: list[float]
    verdicts: list[Verdict]
    skip: bool
    mean_weight: float


class ProbeDefense:
    def __init__(self, cfg: DefenseConfig, probe: LoRAProbe, theta0: AdapterState, local_steps: int,
                 samples_per_step: int, lr: float):
        self.level = split_level(cfg.level)[0]
        if self.level is None:
            raise ValueError(f"ProbeDefense needs a probe level (step, client, shadow, evidence), not '{cfg.level}'")
        self.cfg, self.probe, self.theta0 = cfg, probe, theta0
        self.local_steps, self.samples_per_step = local_steps, samples_per_step
        self.shadow_steps = cfg.shadow_steps or local_steps
        self.shadow_lr = cfg.shadow_lr or lr
        # tau: the config's, else the probe's own for this level (calibrated on the defender's held-out benign
        # clients, on the statistic the level reads)
        self.threshold = tau = cfg.threshold if cfg.threshold is not None else probe.threshold_for(self.level)
        self.step_level = StepLevel(cfg.decay, cfg.prefilter_round)
        self.client_level = ClientLevel(knee=tau, slope=cfg.slope, prefilter_round=cfg.prefilter_round)
        self.evidence_level = EvidenceLevel(cfg.eta, tau, cfg.evidence_min, cfg.audit_interval, cfg.reaudit_malicious)

    # -- what clients must send --------------------------------------------------------------------
    def client_requests(self, server_round: int, client_id: str) -> dict[str, Any]:
        """RoundConfig fields this client must honour in this round."""
        level, r0 = self.level, server_round - 1
        keys = tuple(self.probe.spec.keys)
        if level == "step" and r0 < self.cfg.prefilter_round:
            return {"snapshot_keys": keys, "snapshot_steps": True}
        if level == "shadow" or (level == "evidence" and self.evidence_level.needs_shadow(client_id)):
            return {"snapshot_keys": keys, "shadow_steps": self.shadow_steps, "shadow_lr": self.shadow_lr}
        return {}

    # -- scoring -------------------------------------------------------------------------------------
    def _probabilities(self, update: ClientUpdate, prefix: str, steps: int, reference: AdapterState | None) -> list[float]:
        keys = self.probe.spec.keys
        if reference is not None:  # the update itself, relative to the round-start global
            deltas = [adapter_delta(update.tensors, reference, keys)]
        else:
            deltas = []
            for t in range(1, steps + 1):
                d = {}
                for k in keys:
                    name = f"{prefix}/{t}/{k}"
                    if name not in update.attachments:
                        raise FeatureError(f"missing attachment {name}")
                    d[k] = update.attachments[name]
                deltas.append(d)
        if reference is None:
            extra = set(update.attachments) - {f"{prefix}/{t}/{k}" for t in range(1, steps + 1) for k in keys}
            if extra:
                raise FeatureError(f"unexpected attachments, e.g. {sorted(extra)[0]}")
        for d in deltas:
            for k, v in d.items():
                if not isinstance(v, torch.Tensor) or not bool(torch.isfinite(v).all()):
                    raise FeatureError(f"attachment for {k} is not a finite tensor")
        features = torch.stack([self.probe.spec.extract(d) for d in deltas])
        probs = self.probe.probabilities(features).tolist()
        if not all(math.isfinite(p) for p in probs):
            raise FeatureError("the probe returned a non-finite probability")
        return probs

    def weigh(self, server_round: int, global_adapter: AdapterState, updates: list[ClientUpdate]) -> DefenseOutcome:
        level, tau, r0 = self.level, self.threshold, server_round - 1
        verdicts = []
        for u in updates:
            cid = u.client_id
            try:
                if level == "step":
                    if r0 < self.cfg.prefilter_round:
                        probs = self._probabilities(u, "step", self.local_steps, None)
                        flagged = sum(p >= tau for p in probs)
                        w = self.step_level.weight(cid, r0, flagged, self.local_steps * self.samples_per_step,
                                                   self.samples_per_step)
                        v = Verdict(cid, w, probs, probs[-1], flagged / len(probs))
                    else:
                        v = Verdict(cid, self.step_level.weight(cid, r0, 0, 0, 1), status="frozen")
                elif level == "client":
                    if r0 < self.cfg.prefilter_round:
                        probs = self._probabilities(u, "", 1, global_adapter)
                        v = Verdict(cid, self.client_level.weight(cid, r0, probs[0]), probs, probs[0])
                    else:
                        v = Verdict(cid, self.client_level.weight(cid, r0, 1.0), status="frozen")
                elif level == "shadow":
                    probs = self._probabilities(u, "shadow", self.shadow_steps, None)
                    rho = sum(p >= tau for p in probs) / len(probs)
                    v = Verdict(cid, shadow_weight(rho, self.cfg.eta), probs, probs[-1], rho)
                else:  # evidence
                    # Whether this client was asked for a shadow run (state is unchanged since the request);
                    # unsolicited attachments are ignored.
                    if self.evidence_level.needs_shadow(cid):
                        probs = self._probabilities(u, "shadow", self.shadow_steps, None)
                        rho = sum(p >= tau for p in probs) / len(probs)
                        v = Verdict(cid, self.evidence_level.weight(cid, rho, probs[-1]), probs, probs[-1], rho)
                    else:
                        v = Verdict(cid, self.evidence_level.weight(cid, None, None), status="frozen",
                                    reason=self.evidence_level.status.get(cid, "none"))
            except FeatureError as exc:
                w = 1.0 if self.cfg.fail_policy == "open" else 0.0
                v = Verdict(cid, w, status="unscored", reason=f"{exc} (fail {self.cfg.fail_policy})")
            v.weight = max(float(v.weight), self.cfg.min_weight)
            if level == "client":
                v.update_score = v.score
            else:
                try:
                    v.update_score = self._probabilities(u, "", 1, global_adapter)[0]
                except FeatureError:
                    pass
            verdicts.append(v)
        weights = [v.weight for v in verdicts]
        mean = sum(weights) / len(weights) if weights else 0.0
        return DefenseOutcome(weights, verdicts, skip=bool(weights) and mean < self.cfg.skip_below, mean_weight=mean)

    # -- checkpointed state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_level.state_dict(), "client": self.client_level.state_dict(),
                "evidence": self.evidence_level.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step_level.load_state_dict(d["step"])
        self.client_level.load_state_dict(d["client"])
        self.evidence_level.load_state_dict(d["evidence"])


class Defense:
    """The configured defense: a probe level, the behaviour audit, or both (their weights multiply).

    The server calls ``client_requests``, ``weigh`` and ``state_dict``/``load_state_dict``; which parts run is
    ``defense.level`` (``shadow``, ``audit``, ``shadow+audit``, ...)."""

    def __init__(self, cfg: DefenseConfig, probe_defense: ProbeDefense | None, audit=None):
        if probe_defense is None and audit is None:
            raise ValueError("a defense needs a probe level or the behaviour audit")
        self.cfg, self.probe_defense, self.audit = cfg, probe_defense, audit

    @property
    def threshold(self) -> float | None:
        return self.probe_defense.threshold if self.probe_defense is not None else None

    def client_requests(self, server_round: int, client_id: str) -> dict[str, Any]:
        return self.probe_defense.client_requests(server_round, client_id) if self.probe_defense else {}

    def weigh(self, server_round: int, global_adapter: AdapterState, updates: list[ClientUpdate]) -> DefenseOutcome:
        if self.probe_defense is not None:
            verdicts = self.probe_defense.weigh(server_round, global_adapter, updates).verdicts
        else:
            verdicts = [Verdict(str(u.client_id), 1.0, status="audited") for u in updates]
        if self.audit is not None and updates:
            for v, r in zip(verdicts, self.audit.assess(global_adapter, updates)):
                v.audit = r.to_json()
                v.weight = max(v.weight * r.weight, self.cfg.min_weight)
        weights = [v.weight for v in verdicts]
        mean = sum(weights) / len(weights) if weights else 0.0
        return DefenseOutcome(weights, verdicts, skip=bool(weights) and mean < self.cfg.skip_below, mean_weight=mean)

    @property
    def audit_seconds(self) -> float | None:
        return self.audit.last_seconds if self.audit is not None else None

    def state_dict(self) -> dict[str, Any]:
        out = self.probe_defense.state_dict() if self.probe_defense is not None else {}
        if self.audit is not None:
            out["audit"] = self.audit.state_dict()
        return out

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if self.probe_defense is not None:
            self.probe_defense.load_state_dict(d)
        if self.audit is not None and "audit" in d:
            self.audit.load_state_dict(d["audit"])
