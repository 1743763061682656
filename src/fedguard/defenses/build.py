"""`fedguard probe build`: labelled ΔLoRA features from real local training, and the probe on them.

Recipe (shared/reference/safe-fedllm.md §2.4): probe clients train from the fixed θ₀ with the target
run's LoRA config, A-seed and learning rate, on the built-in *probe* split (disjoint from the
federation's training and evaluation data): benign clients on benign data mixed with refusals like
the federation's benign clients, malicious clients on harmful-request -> compliance data. After every
local step the ΔLoRA from θ₀ is one labelled sample. Probe clients are split into training and
held-out clients, so the reported metrics are on clients the probe never saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.config import ExperimentConfig
from fedguard.data.federation import ClientData, DataTokenizer
from fedguard.data.readers import load_source
from fedguard.defenses.features import SELECTIONS, FeatureSpec
from fedguard.defenses.probe import LoRAProbe, compat_stamp, detection_metrics, fit_probe
from fedguard.federated.types import RoundConfig
from fedguard.model.registry import cache_root
from fedguard.seeding import numpy_rng

log = logging.getLogger(__name__)


@dataclass
class ProbeDataset:
    snapshots: list[dict[str, torch.Tensor]]  # ΔLoRA from θ₀ after each step
    labels: np.ndarray  # 1 = malicious
    clients: np.ndarray  # probe-client index (for held-out splits)
    steps: np.ndarray  # local step index (1-based)


def probe_compat(cfg: ExperimentConfig, loaded, shapes) -> dict[str, Any]:
    return compat_stamp(loaded.fingerprint(), cfg.lora.model_dump(), cfg.defense.shadow_lr or cfg.train.lr, shapes)


def default_probe_dir(compat: dict[str, Any], cfg: ExperimentConfig) -> Path:
    """Cache location keyed by everything the probe depends on (and how it was built)."""
    key = json.dumps({"compat": compat, "build": cfg.probe.model_dump(), "steps": cfg.train.local_steps,
                      "batch": cfg.train.batch_size, "seed": cfg.seed}, sort_keys=True)
    return cache_root() / "probes" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _probe_clients(cfg: ExperimentConfig, tokenizer) -> list[tuple[ClientData, int]]:
    p, d = cfg.probe, cfg.data
    n_ref = int(round(p.examples_per_client * d.refusal_share))
    total = p.clients_per_class * p.examples_per_client
    seed = cfg.seed + 7_000_001
    benign = load_source("builtin:benign", "probe", total, seed)
    refusals = load_source("builtin:harmful-refusal", "probe", p.clients_per_class * max(n_ref, 1), seed)
    harmful = load_source(cfg.attack.source, "probe", total, seed)

    tok = DataTokenizer(tokenizer, cfg)
    clients = []
    for i in range(p.clients_per_class):
        own = benign[i * p.examples_per_client: (i + 1) * p.examples_per_client - n_ref]
        own += refusals[i * n_ref: (i + 1) * n_ref]
        clients.append((ClientData(i, tok(own)), 0))
    for i in range(p.clients_per_class):
        own = harmful[i * p.examples_per_client: (i + 1) * p.examples_per_client]
        clients.append((ClientData(p.clients_per_class + i, tok(own)), 1))
    return clients


def collect_probe_data(cfg: ExperimentConfig, loaded, trainer, theta0, on_client=None) -> ProbeDataset:
    keys = tuple(sorted(theta0))
    snaps, labels, clients, steps = [], [], [], []
    lr = cfg.defense.shadow_lr or cfg.train.lr
    for data, label in _probe_clients(cfg, loaded.tokenizer):
        for rnd in range(1, cfg.probe.rounds + 1):
            rc = RoundConfig(server_round=rnd, lr=lr, local_steps=cfg.train.local_steps,
                             batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                             seed=cfg.seed + 7_000_001, max_grad_norm=cfg.train.max_grad_norm,
                             snapshot_keys=keys, snapshot_steps=True,
                             train_lora_a=cfg.lora.variant != "ffa")  # the run's clients train like this
            update = trainer.train(theta0, rc, data)
            for t in range(1, cfg.train.local_steps + 1):
                snaps.append({k: update.attachments[f"step/{t}/{k}"] for k in keys})
                labels.append(label)
                clients.append(data.client_id)
                steps.append(t)
        if on_client is not None:
            on_client(data.client_id, label)
    return ProbeDataset(snaps, np.array(labels), np.array(clients), np.array(steps))


def _features(spec: FeatureSpec, snaps) -> np.ndarray:
    return torch.stack([spec.extract(s) for s in snaps]).numpy()


def _split_clients(ds: ProbeDataset, share: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out samples: a share of the probe clients of each class."""
    rng = numpy_rng(seed, "probe-holdout")
    held = set()
    for label in (0, 1):
        ids = sorted(set(ds.clients[ds.labels == label].tolist()))
        k = max(1, int(round(share * len(ids))))
        held.update(rng.choice(ids, size=k, replace=False).tolist())
    return np.isin(ds.clients, sorted(held))


def evaluate_selections(cfg: ExperimentConfig, ds: ProbeDataset, shapes, selections=SELECTIONS) -> dict[str, dict]:
    """Held-out detection quality of each feature selection on the same snapshots."""
    held = _split_clients(ds, cfg.probe.holdout_share, cfg.seed)
    out = {}
    for sel in selections:
        spec = FeatureSpec.build(shapes, sel, cfg.probe.projection_dim, cfg.seed)
        x = _features(spec, ds.snapshots)
        params = fit_probe(x[~held], ds.labels[~held], cfg.probe.classifier, cfg.seed, cfg.probe.regularisation)
        probe = LoRAProbe(spec, cfg.probe.classifier, params, cfg.defense.threshold, {})
        prob = probe.probabilities(torch.tensor(x[held]))
        out[sel] = {"dim": spec.dim, **detection_metrics(ds.labels[held], prob, cfg.defense.threshold)}
    return out


def train_probe(cfg: ExperimentConfig, ds: ProbeDataset, shapes, compat: dict[str, Any]) -> LoRAProbe:
    spec = FeatureSpec.build(shapes, cfg.probe.selection, cfg.probe.projection_dim, cfg.seed)
    x = _features(spec, ds.snapshots)
    held = _split_clients(ds, cfg.probe.holdout_share, cfg.seed)
    params = fit_probe(x[~held], ds.labels[~held], cfg.probe.classifier, cfg.seed, cfg.probe.regularisation)
    probe = LoRAProbe(spec, cfg.probe.classifier, params, cfg.defense.threshold, compat)
    prob = probe.probabilities(torch.tensor(x[held]))
    metrics = detection_metrics(ds.labels[held], prob, cfg.defense.threshold)
    last = ds.steps[held] == ds.steps.max()
    metrics["last_step"] = detection_metrics(ds.labels[held][last], prob[last], cfg.defense.threshold)
    # Detection at each local step: how many shadow steps a cheaper shadow level needs.
    metrics["by_step"] = {int(t): detection_metrics(ds.labels[held][ds.steps[held] == t], prob[ds.steps[held] == t],
                                                    cfg.defense.threshold) for t in sorted(set(ds.steps.tolist()))}
    benign_clients = sorted(set(ds.clients[held & (ds.labels == 0)].tolist()))
    flagged = [c for c in benign_clients if (prob[(ds.clients[held] == c)] >= cfg.defense.threshold).mean() > 0.5]
    metrics["benign_client_fpr"] = len(flagged) / len(benign_clients) if benign_clients else None
    metrics["samples"] = {"train": int((~held).sum()), "heldout": int(held.sum())}
    # Refit on every probe client for the artifact; the metrics above stay held-out ones.
    probe.tensors = fit_probe(x, ds.labels, cfg.probe.classifier, cfg.seed, cfg.probe.regularisation)
    probe.metrics = metrics
    return probe


def build_probe(cfg: ExperimentConfig, loaded, trainer, theta0, out_dir: Path | None = None,
                compare_selections: bool = False) -> tuple[LoRAProbe, Path, dict]:
    shapes = {k: tuple(v.shape) for k, v in theta0.items()}
    compat = probe_compat(cfg, loaded, shapes)
    out_dir = out_dir or default_probe_dir(compat, cfg)
    ds = collect_probe_data(cfg, loaded, trainer, theta0,
                            on_client=lambda c, y: log.info("probe client %d (%s) trained", c, "malicious" if y else "benign"))
    probe = train_probe(cfg, ds, shapes, compat)
    comparison = evaluate_selections(cfg, ds, shapes) if compare_selections else {}
    if comparison:
        probe.metrics["selection_comparison"] = comparison
    probe.save(out_dir)
    m = probe.metrics
    log.info("probe %s: held-out AUROC %s, precision %s, recall %s, FPR %s at tau=%.2f", out_dir,
             *(f"{m[k]:.4f}" if m[k] is not None else "n/a" for k in ("auroc", "precision", "recall", "fpr")),
             probe.threshold)
    return probe, out_dir, comparison
