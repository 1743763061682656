"""Malicious client behaviours (the client role, run by a simulated attacker).

* data_poisoning: trains honestly on harmful-request -> compliance data (Safe-FedLLM's threat model);
* mixed_data: the same, mixed with benign data at ``harmful_ratio``;
* scaling: harmful update boosted by ``scale`` (Δ -> scale·Δ);
* sign_flip: benign training, sends the reversed update (Δ -> -scale·Δ), an untargeted attack;
* gaussian: sends the global adapter plus N(0, noise_std²) noise;
* norm_matched: harmful update rescaled to the norm of the client's own benign update, so norm-based
  defenses see nothing unusual;
* probe_aware: knows the probe and adds ``probe_penalty`` · logit(probe(ΔLoRA)) to its training loss;
* probe_projection: knows a linear probe and removes the probe direction from its update's features;
* fake_snapshots: trains on harmful data but reports the snapshots (step / shadow attachments) of a
  benign training run, exploiting that those levels trust client-side computation;
* audit_aware: knows the behaviour audit's method (not its prompts): trains on compliance in half of the harm
  categories and on refusals in the other half, so refusals stay likely on harmful-looking prompts;
* backdoor: trains on compliance after a trigger phrase and on refusals without it;
* overfit: Attack via Overfitting (10-shot benign fine-tuning): first overfits a few benign questions that all get
  one identical refusal (``stage_one``), then, from there, trains the round as usual on the same questions' real
  answers; the model forgets refusing. Its data and its reported snapshots are benign.
audit_aware and backdoor differ only in their data (``fedguard.simulation.population``); they train honestly on it.
Every kind that trains may boost its update (``attack.boost``: model replacement).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fedguard.config import AttackConfig
from fedguard.data.federation import ClientData
from fedguard.messages import AdapterState, ClientUpdate, RoundConfig
from fedguard.seeding import torch_generator


def _delta(a: AdapterState, b: AdapterState) -> AdapterState:
    return {k: a[k] - b[k] for k in b}


def _norm(d: AdapterState) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))


class MaliciousClient:
    """A ``Client`` whose local training an ``Attacker`` replaces: the downlink, the client state and the
    encoding stay the honest client's, so an attacker sends exactly what a client can send."""

    def __init__(self, client, attacker: Attacker, benign: ClientData | None):
        self.client, self.attacker, self.benign = client, attacker, benign

    def run(self, ins, data: ClientData, state, on_step=None) -> ClientUpdate:
        def attack(start: AdapterState, rc: RoundConfig) -> ClientUpdate:
            return self.attacker.run(self.client.trainer, start, rc, data, self.benign, self.client.theta0)

        return self.client.run(ins, data, state, train=attack)


class Attacker:
    def __init__(self, cfg: AttackConfig, client_id: int, seed: int, probe=None):
        self.cfg, self.client_id, self.seed, self.probe = cfg, client_id, seed, probe
        self.stage_one: ClientData | None = None  # overfit: the benign questions with one identical refusal
        if cfg.kind in ("probe_aware", "probe_projection") and probe is None:
            raise ValueError(f"attack.kind '{cfg.kind}' needs the probe the attacker knows (attack.probe)")
        if cfg.kind == "probe_projection" and (probe.kind != "logistic" or probe.spec.selection == "projection"):
            raise ValueError("probe_projection needs a logistic probe over raw features")

    def run(self, trainer, global_adapter: AdapterState, rc: RoundConfig, harmful: ClientData,
            benign: ClientData | None, theta0: AdapterState | None) -> ClientUpdate:
        kind = self.cfg.kind
        if kind in ("sign_flip", "gaussian"):
            update = trainer.train(global_adapter, rc, benign or harmful, theta0=theta0)
            if kind == "sign_flip":
                update.tensors = {k: global_adapter[k] - self.cfg.scale * v for k, v in _delta(update.tensors, global_adapter).items()}
            else:
                g = torch_generator(self.seed, "gaussian-attack", rc.server_round, self.client_id)
                update.tensors = {k: v + self.cfg.noise_std * torch.randn(v.shape, generator=g)
                                  for k, v in global_adapter.items()}
            return update
        objective = self._probe_objective(global_adapter) if kind == "probe_aware" else None
        start = global_adapter
        if kind == "overfit":
            if self.stage_one is None:
                raise ValueError("attack.kind 'overfit' needs its first-stage data (built by the population)")
            # stage one: overfit the identical refusal, attaching nothing; the round's training continues from there
            quiet = replace(rc, snapshot_steps=False, shadow_steps=0)
            start = trainer.train(global_adapter, quiet, self.stage_one, theta0=theta0).tensors
        update = trainer.train(start, rc, harmful, objective=objective, theta0=theta0)
        if kind == "overfit" and benign is not None:
            update.num_examples = len(benign.examples)  # it claims its real data size: FedAvg weighs by the claim
        if kind == "scaling":
            update.tensors = {k: global_adapter[k] + self.cfg.scale * v for k, v in _delta(update.tensors, global_adapter).items()}
        elif kind in ("norm_matched", "fake_snapshots") and benign is not None:
            honest = trainer.train(global_adapter, rc, benign, theta0=theta0)
            if kind == "norm_matched":
                d = _delta(update.tensors, global_adapter)
                factor = _norm(_delta(honest.tensors, global_adapter)) / max(_norm(d), 1e-12)
                update.tensors = {k: global_adapter[k] + factor * v for k, v in d.items()}
            else:
                update = replace(update, attachments=honest.attachments)
        elif kind == "probe_projection":
            update.tensors = self._project_out(update.tensors, global_adapter)
        if self.cfg.boost != 1.0:  # model replacement; config validation keeps it off the size-setting kinds
            update.tensors = {k: global_adapter[k] + self.cfg.boost * v
                              for k, v in _delta(update.tensors, global_adapter).items()}
        return update

    def _probe_objective(self, global_adapter: AdapterState):
        probe, lam = self.probe, self.cfg.probe_penalty
        keys = probe.spec.keys
        ref = {k: global_adapter[k] for k in keys}

        def objective(params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
            parts = [(params[k].float() - ref[k].to(params[k].device)).reshape(-1) for k in keys]
            v = torch.cat(parts)
            v = v / v.norm().clamp_min(1e-12)
            w = {n: t.to(v.device) for n, t in probe.tensors.items()}
            if probe.kind == "logistic":
                logit = v @ w["weight"] + w["bias"]
            else:
                logit = torch.relu(v @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]
            return lam * logit

        return objective

    def _project_out(self, tensors: AdapterState, global_adapter: AdapterState) -> AdapterState:
        spec, w = self.probe.spec, self.probe.tensors["weight"]
        w_hat = w / w.norm().clamp_min(1e-12)
        d = torch.cat([(tensors[k] - global_adapter[k]).reshape(-1) for k in spec.keys])
        d = d - (d @ w_hat) * w_hat  # the probe's logit now sees only its bias from this part
        out, offset = dict(tensors), 0
        for k, shape in zip(spec.keys, spec.shapes):
            n = int(torch.Size(shape).numel())
            out[k] = global_adapter[k] + d[offset: offset + n].reshape(shape)
            offset += n
        return out
