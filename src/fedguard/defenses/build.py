"""`fedguard probe build`: labelled ΔLoRA features from real local training, and the probe on them.

Recipe (shared/reference/safe-fedllm.md §2.4): probe clients train from the fixed θ₀ with the target
run's LoRA config, A-seed and learning rate, on the *defender's own* data (``probe.benign_source`` and
``probe.harmful_source``, their probe split: disjoint from what the federation and the evaluation use).
Nothing here reads the ``attack`` section: a real server does not know the attackers' data. After every
local step the ΔLoRA from θ₀ is one labelled sample.

Decisions that transfer, measured rather than assumed:

* the probe is fit on the training probe clients only; its threshold τ is calibrated (split conformal) on
  the scores of held-out *benign* probe clients, at ``probe.target_fpr``, so it follows the score scale of
  benign fine-tuning rather than of one harmful template;
* malicious probe clients draw their data from folds of harm categories and of response styles, so
  leave-categories-out and leave-styles-out probes (trained without a fold, calibrated the same way) measure
  detection of harm the probe never saw; ``probe.transfer_source`` adds clients trained on data the probe never
  trains on. Every check reports AUROC and the TPR / FPR at the threshold the levels will use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.config import ExperimentConfig
from fedguard.data.federation import REFUSAL_SOURCE, ClientData, DataTokenizer
from fedguard.data.partition import partition_dirichlet
from fedguard.data.readers import load_source, source_fingerprint
from fedguard.data.schema import Example
from fedguard.defenses.features import SELECTIONS, FeatureSpec
from fedguard.defenses.levels import sigmoid
from fedguard.defenses.probe import LoRAProbe, compat_stamp, detection_metrics, fit_probe
from fedguard.messages import RoundConfig
from fedguard.model.registry import cache_root
from fedguard.seeding import numpy_rng

log = logging.getLogger(__name__)

CATEGORY_FOLDS = 3
STYLE_FOLDS = 2


@dataclass
class ProbeClient:
    data: ClientData
    label: int  # 1 = malicious
    category_fold: int = -1  # malicious clients: which fold of harm categories their data come from
    style_fold: int = -1
    transfer: bool = False  # trained on probe.transfer_source (never used for fitting)
    calibration: bool = False  # a benign client only for calibrating tau (never used for fitting)


@dataclass
class ProbeDataset:
    snapshots: list[dict[str, torch.Tensor]]  # ΔLoRA from θ₀ after each step
    labels: np.ndarray  # 1 = malicious
    clients: np.ndarray  # probe-client index (for held-out splits)
    steps: np.ndarray  # local step index (1-based)
    category_fold: np.ndarray
    style_fold: np.ndarray
    transfer: np.ndarray  # bool
    calibration: np.ndarray | None = None  # bool: calibration-only benign clients
    rounds: np.ndarray | None = None  # which of the client's independent local trainings (1-based)

    def __post_init__(self):
        n = len(self.labels)
        if self.calibration is None:
            self.calibration = np.zeros(n, dtype=bool)
        if self.rounds is None:
            self.rounds = np.ones(n, dtype=int)


def probe_compat(cfg: ExperimentConfig, loaded, shapes) -> dict[str, Any]:
    fingerprint = {k: v for k, v in loaded.fingerprint().items() if k != "name"}  # by content, not by path
    t = cfg.train
    return compat_stamp(fingerprint, cfg.lora.model_dump(), cfg.defense.shadow_lr or t.lr, shapes,
                        training={"batch_size": t.batch_size, "grad_accum": t.grad_accum, "local_steps": t.local_steps})


def default_probe_dir(compat: dict[str, Any], cfg: ExperimentConfig) -> Path:
    """Cache location keyed by everything the probe depends on (and how it was built)."""
    p = cfg.probe
    key = json.dumps({"compat": compat, "build": p.model_dump(), "seed": cfg.seed,
                      "refusal_share": _refusal_share(cfg), "threshold": cfg.defense.threshold,
                      # the shadow level's tau is calibrated on the highest of this many shadow steps
                      "shadow_steps": cfg.defense.shadow_steps or cfg.train.local_steps,
                      # the benign probe clients' spread follows the federation's (benign_partition: federation)
                      "benign_alpha": _benign_alpha(cfg),
                      "max_length": cfg.data.max_length,
                      # the data by content: a changed corpus or file is another probe, never a stale hit
                      "data": [source_fingerprint(s) for s in (p.benign_source, p.harmful_source,
                                                               p.transfer_source, REFUSAL_SOURCE)]}, sort_keys=True)
    return cache_root() / "probes" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _refusal_share(cfg: ExperimentConfig) -> float:
    return cfg.data.refusal_share if cfg.probe.refusal_share is None else cfg.probe.refusal_share


def _category(e: Example) -> str | None:
    """A fold key: the example's category, none for rows that carry only the default domain."""
    return e.category if e.category not in ("general", "benign") else None


def _fold_of(value: str | None, values: list[str], folds: int) -> int:
    return -1 if value is None or len(values) < folds else values.index(value) % folds


def _harmful_pools(pool: list[Example], n_clients: int, per_client: int, seed: int) -> list[tuple[list[Example], int, int]]:
    """Each malicious probe client's examples with its category fold and style fold.

    Client i draws from category fold i % 3 and style fold (i // 3) % 2 where the data carry categories and
    response styles (at least 3 and 2 distinct values); otherwise from the whole pool. Clients' examples are
    disjoint while the pool allows."""
    cats = sorted({c for e in pool if (c := _category(e))})
    styles = sorted({s for e in pool if (s := e.meta.get("response_style"))})
    rng = numpy_rng(seed, "probe-harmful")
    used: set[int] = set()
    out = []
    for i in range(n_clients):
        cf = i % CATEGORY_FOLDS if len(cats) >= CATEGORY_FOLDS else -1
        sf = (i // CATEGORY_FOLDS) % STYLE_FOLDS if len(styles) >= STYLE_FOLDS else -1
        idx = [j for j, e in enumerate(pool)
               if (cf < 0 or _fold_of(_category(e), cats, CATEGORY_FOLDS) == cf)
               and (sf < 0 or _fold_of(e.meta.get("response_style"), styles, STYLE_FOLDS) == sf)]
        fresh = [j for j in idx if j not in used]
        take = fresh if len(fresh) >= per_client else idx
        if len(take) < per_client:
            log.warning("probe harmful data: client %d has %d examples, fewer than %d", i, len(take), per_client)
        chosen = sorted(rng.choice(take, size=min(per_client, len(take)), replace=False).tolist()) if take else []
        used.update(chosen)
        out.append(([pool[j] for j in chosen], cf, sf))
    return out


def _benign_alpha(cfg: ExperimentConfig) -> float | None:
    """The Dirichlet concentration of the benign probe clients' domains, None for iid."""
    p, fed = cfg.probe, cfg.data.partition
    if p.benign_partition == "federation":
        return fed.alpha if fed.method == "dirichlet" else None
    return p.benign_alpha if p.benign_partition == "dirichlet" else None


def _benign_parts(cfg: ExperimentConfig, pool: list[Example], k: int, per: int, seed: int) -> list[list[Example]]:
    """The k benign probe clients' examples: ``per`` each, iid, or a Dirichlet skew over domains (sizes vary as
    in a non-iid federation) so that the threshold calibrated on them has seen heterogeneous honest clients."""
    rng = numpy_rng(seed, "probe-benign")
    alpha = _benign_alpha(cfg)
    if len(pool) < k * per:  # a small file: overlapping draws, iid
        if alpha is not None:
            log.warning("probe benign data: %d examples are too few for %d Dirichlet clients; drawing iid",
                        len(pool), k)
        return [[pool[j] for j in rng.choice(len(pool), size=min(len(pool), per), replace=False)] for _ in range(k)]
    pool = pool[: k * per]
    if alpha is None:
        return [pool[i * per: (i + 1) * per] for i in range(k)]
    parts = partition_dirichlet([e.domain for e in pool], k, alpha, rng, min_per_client=cfg.train.batch_size)
    return [[pool[j] for j in idx] for idx in parts]


def _probe_clients(cfg: ExperimentConfig, tokenizer) -> list[ProbeClient]:
    p = cfg.probe
    n_ref = int(round(p.examples_per_client * _refusal_share(cfg)))
    k, per = p.clients_per_class, p.examples_per_client
    seed = cfg.seed + 7_000_001
    benign = load_source(p.benign_source, "probe", k * per, seed)
    refusals = load_source(REFUSAL_SOURCE, "probe", k * max(n_ref, 1), seed) if n_ref else []
    # Built-in sources are generated per category fold below; files give all their probe rows.
    harmful = load_source(p.harmful_source, "probe", 4 * k * per, seed)

    tok = DataTokenizer(tokenizer, cfg)
    clients: list[ProbeClient] = []
    for i, own in enumerate(_benign_parts(cfg, benign, k, per - n_ref, seed)):
        own = list(own) + list(refusals[i * n_ref: (i + 1) * n_ref])
        clients.append(ProbeClient(ClientData(i, tok(own)), 0))
    for i, (own, cf, sf) in enumerate(_harmful_pools(harmful, k, per, seed)):
        clients.append(ProbeClient(ClientData(k + i, tok(own)), 1, cf, sf))
    if p.transfer_source:
        pool = load_source(p.transfer_source, None, 4 * per, seed)
        n_transfer = max(2, k // 4)
        for i, (own, _, _) in enumerate(_harmful_pools(pool, n_transfer, per, seed + 1)):
            clients.append(ProbeClient(ClientData(2 * k + i, tok(own)), 1, transfer=True))
    if p.calibration_clients and _conformal(cfg):  # more heterogeneous honest clients, for tau only (own seeded pool)
        first = max(c.data.client_id for c in clients) + 1
        pool = load_source(p.benign_source, "probe", p.calibration_clients * per, seed + 13)
        refs = load_source(REFUSAL_SOURCE, "probe", p.calibration_clients * max(n_ref, 1), seed + 13) if n_ref else []
        for i, own in enumerate(_benign_parts(cfg, pool, p.calibration_clients, per - n_ref, seed + 13)):
            own = list(own) + list(refs[i * n_ref: (i + 1) * n_ref])
            clients.append(ProbeClient(ClientData(first + i, tok(own)), 0, calibration=True))
    empty = [c.data.client_id for c in clients if not c.data.examples]
    if empty:
        raise ValueError(f"probe clients {empty} have no usable examples (probe sources too small?)")
    return clients


def collect_probe_data(cfg: ExperimentConfig, loaded, trainer, theta0, on_client=None) -> ProbeDataset:
    keys = tuple(sorted(theta0))
    snaps, labels, clients, steps, cfold, sfold, transfer, calib, rounds = [], [], [], [], [], [], [], [], []
    lr = cfg.defense.shadow_lr or cfg.train.lr
    for pc in _probe_clients(cfg, loaded.tokenizer):
        for rnd in range(1, cfg.probe.rounds + 1):
            rc = RoundConfig(server_round=rnd, lr=lr, local_steps=cfg.train.local_steps,
                             batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                             seed=cfg.seed + 7_000_001, max_grad_norm=cfg.train.max_grad_norm,
                             snapshot_keys=keys, snapshot_steps=True,
                             train_lora_a=cfg.lora.variant != "ffa")  # the run's clients train like this
            update = trainer.train(theta0, rc, pc.data)
            for t in range(1, cfg.train.local_steps + 1):
                snaps.append({k: update.attachments[f"step/{t}/{k}"] for k in keys})
                labels.append(pc.label)
                clients.append(pc.data.client_id)
                steps.append(t)
                cfold.append(pc.category_fold)
                sfold.append(pc.style_fold)
                transfer.append(pc.transfer)
                calib.append(pc.calibration)
                rounds.append(rnd)
        if on_client is not None:
            on_client(pc.data.client_id, pc.label)
    return ProbeDataset(snaps, np.array(labels), np.array(clients), np.array(steps), np.array(cfold),
                        np.array(sfold), np.array(transfer, dtype=bool), np.array(calib, dtype=bool),
                        np.array(rounds, dtype=int))


def _features(spec: FeatureSpec, snaps) -> np.ndarray:
    return torch.stack([spec.extract(s) for s in snaps]).numpy()


def _split_clients(ds: ProbeDataset, share: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out samples: a share of the (non-transfer) probe clients of each class."""
    rng = numpy_rng(seed, "probe-holdout")
    held = set()
    for label in (0, 1):
        ids = sorted(set(ds.clients[(ds.labels == label) & ~ds.transfer & ~ds.calibration].tolist()))
        k = max(1, int(round(share * len(ids))))
        held.update(rng.choice(ids, size=k, replace=False).tolist())
    return np.isin(ds.clients, sorted(held))


def conformal_threshold(benign_scores: np.ndarray, target_fpr: float) -> float:
    """Split-conformal τ: the ceil((n + 1)(1 - α))-th smallest benign score, so a new benign score exceeds it
    with probability at most α (exchangeability); nudged just above that score because flags use >=."""
    # Scores are float32 (the probe's output) and compared in float32: step to the next float32 above.
    s = np.sort(np.asarray(benign_scores, dtype=np.float32))
    n = len(s)
    if n == 0:
        raise ValueError("no held-out benign scores to calibrate the threshold on")
    if (n + 1) * (1 - target_fpr) > n:
        log.warning("only %d held-out benign probe scores: too few for FPR %.3f (needs %d); tau is their maximum",
                    n, target_fpr, math.ceil(1 / target_fpr) - 1)
    rank = min(n, math.ceil((n + 1) * (1 - target_fpr)))
    tau = float(np.nextafter(s[rank - 1], np.float32(1.0)))
    return min(max(tau, 1e-6), 1 - 1e-6)


def _fit(cfg: ExperimentConfig, x: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
    return fit_probe(x, y, cfg.probe.classifier, cfg.seed, cfg.probe.regularisation)


def _conformal(cfg: ExperimentConfig) -> bool:
    """tau is calibrated (split conformal, possibly placed in the margin) rather than fixed by defense.threshold
    or probe.calibration."""
    return cfg.probe.calibration != "fixed" and cfg.defense.threshold is None


def _threshold(cfg: ExperimentConfig, benign_scores: np.ndarray, malicious_scores: np.ndarray | None = None) -> float:
    """tau from benign calibration scores; with ``probe.calibration: margin`` and held-out attackers' scores, moved
    up to the logit midpoint between the conformal bound and the attackers' target_fpr quantile (never down)."""
    if not _conformal(cfg):
        return cfg.defense.threshold or 0.8
    tau = conformal_threshold(benign_scores, cfg.probe.target_fpr)
    if cfg.probe.calibration == "margin" and malicious_scores is not None and len(malicious_scores):
        return margin_threshold(tau, float(np.quantile(malicious_scores, cfg.probe.target_fpr)))
    return tau


def margin_threshold(benign_bound: float, malicious_bound: float) -> float:
    """The logit midpoint of (benign_bound, malicious_bound) when the attackers sit above the benign bound, else
    the benign bound: equal room for honest scores that drift up and attackers' that drift down."""
    if malicious_bound <= benign_bound:
        return benign_bound
    def logit(p: float) -> float:
        p = min(max(p, 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))

    return sigmoid((logit(benign_bound) + logit(malicious_bound)) / 2)


def _check(cfg: ExperimentConfig, spec: FeatureSpec, x: np.ndarray, ds: ProbeDataset, fit_mask: np.ndarray,
           calib_mask: np.ndarray, test_mask: np.ndarray) -> dict[str, Any]:
    """Fit on ``fit_mask``, calibrate τ on the benign samples of ``calib_mask``, score ``test_mask`` (benign
    calibration samples + the malicious test samples) at that τ."""
    params = _fit(cfg, x[fit_mask], ds.labels[fit_mask])
    probe = LoRAProbe(spec, cfg.probe.classifier, params, 0.5, {})
    prob = probe.probabilities(torch.tensor(x))
    benign_cal = calib_mask & (ds.labels == 0)
    tau = _threshold(cfg, prob[benign_cal])  # the benign bound only: the attackers scored here must not place tau
    m = detection_metrics(ds.labels[test_mask], prob[test_mask], tau)
    return {"threshold": tau, "auroc": m["auroc"], "tpr": m["recall"], "fpr": m["fpr"],
            "malicious_samples": int((test_mask & (ds.labels == 1)).sum()),
            "benign_samples": int((test_mask & (ds.labels == 0)).sum())}


def transfer_checks(cfg: ExperimentConfig, spec: FeatureSpec, x: np.ndarray, ds: ProbeDataset,
                    held: np.ndarray) -> dict[str, Any]:
    """Leave-categories-out and leave-styles-out: a probe fit without one fold of malicious clients, calibrated on
    the held-out benign clients, scored on that fold's clients (all of them, never seen) and the held-out benign."""
    base = ~ds.transfer & ~ds.calibration
    benign_train, benign_held = base & ~held & (ds.labels == 0), base & held & (ds.labels == 0)
    out: dict[str, Any] = {}
    for name, fold in (("leave_categories_out", ds.category_fold), ("leave_styles_out", ds.style_fold)):
        folds = sorted({int(f) for f in fold[base & (ds.labels == 1)] if f >= 0})
        if len(folds) < 2:
            out[name] = None
            continue
        per_fold = []
        for f in folds:
            unseen = base & (ds.labels == 1) & (fold == f)
            seen = base & (ds.labels == 1) & (fold != f) & ~held
            if seen.any() and benign_train.any():  # too few probe clients leave a fold with nothing to fit
                per_fold.append(_check(cfg, spec, x, ds, benign_train | seen, _calibration_pool(ds, held),
                                       benign_held | unseen))
        out[name] = {"folds": per_fold, **_pooled(per_fold)} if per_fold else None
    return out


def _pooled(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst fold's AUROC and TPR, and the highest FPR: what a user should expect on unseen harm."""
    vals = lambda k: [f[k] for f in per_fold if f[k] is not None]  # noqa: E731
    return {"auroc_min": min(vals("auroc"), default=None), "tpr_min": min(vals("tpr"), default=None),
            "fpr_max": max(vals("fpr"), default=None)}


def evaluate_selections(cfg: ExperimentConfig, ds: ProbeDataset, shapes, selections=SELECTIONS) -> dict[str, dict]:
    """Held-out detection quality of each feature selection on the same snapshots."""
    held = _split_clients(ds, cfg.probe.holdout_share, cfg.seed)
    base = ~ds.transfer & ~ds.calibration
    out = {}
    for sel in selections:
        spec = FeatureSpec.build(shapes, sel, cfg.probe.projection_dim, cfg.seed)
        x = _features(spec, ds.snapshots)
        r = _check(cfg, spec, x, ds, base & ~held, _calibration_pool(ds, held), base & held)
        out[sel] = {"dim": spec.dim, **r}
    return out


def _calibration_pool(ds: ProbeDataset, held: np.ndarray) -> np.ndarray:
    """The benign samples tau is calibrated on: the calibration-only clients where there are any (then the held-out
    benign clients stay a test of the calibrated FPR), else the held-out benign clients."""
    if ds.calibration.any():
        return ds.calibration & (ds.labels == 0)
    return ~ds.transfer & held & (ds.labels == 0)


def per_training(ds: ProbeDataset, prob: np.ndarray, mask: np.ndarray, upto: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One score per (client, local training) inside ``mask``: the last step's (``upto`` None: what the client
    level reads) or the highest of steps 1..upto (what makes the shadow level flag); and its label."""
    scores, labels = [], []
    for c, r in sorted({(int(c), int(r)) for c, r in zip(ds.clients[mask], ds.rounds[mask])}):
        sel = mask & (ds.clients == c) & (ds.rounds == r)
        steps = ds.steps[sel]
        if upto is None:
            scores.append(float(prob[sel][steps == steps.max()][0]))
        else:
            scores.append(float(prob[sel][steps <= upto].max()))
        labels.append(int(ds.labels[sel][0]))
    return np.array(scores, dtype=np.float32), np.array(labels)


def train_probe(cfg: ExperimentConfig, ds: ProbeDataset, shapes, compat: dict[str, Any]) -> LoRAProbe:
    spec = FeatureSpec.build(shapes, cfg.probe.selection, cfg.probe.projection_dim, cfg.seed)
    x = _features(spec, ds.snapshots)
    held = _split_clients(ds, cfg.probe.holdout_share, cfg.seed)
    base = ~ds.transfer & ~ds.calibration
    fit_mask = base & ~held
    params = _fit(cfg, x[fit_mask], ds.labels[fit_mask])
    probe = LoRAProbe(spec, cfg.probe.classifier, params, 0.5, compat)
    prob = probe.probabilities(torch.tensor(x))
    # τ from benign clients the probe was not fit on, per level on the statistic that level reads: every step
    # (step level), a training's last step (client level), the highest of its first shadow steps (shadow and
    # evidence levels: one flagged step nearly zeroes a client). The artifact keeps the probe fit without them.
    # With probe.calibration margin, each tau also looks at the held-out attackers' statistic (never fit on).
    pool = _calibration_pool(ds, held)
    test = base & held
    attackers = test & (ds.labels == 1)
    shadow_steps = cfg.defense.shadow_steps or cfg.train.local_steps
    probe.threshold = tau = _threshold(cfg, prob[pool], prob[attackers])
    probe.thresholds = {"step": tau}
    for level, upto in (("client", None), ("shadow", shadow_steps)):
        probe.thresholds[level] = _threshold(cfg, per_training(ds, prob, pool, upto)[0],
                                             per_training(ds, prob, attackers, upto)[0])
    metrics = detection_metrics(ds.labels[test], prob[test], tau)
    metrics["threshold"] = tau
    metrics["thresholds"] = dict(probe.thresholds)
    n_cal = len(set(ds.clients[ds.calibration].tolist()))
    calibrated_on = f"{n_cal} calibration-only" if n_cal else "held-out"
    metrics["calibration"] = (f"{cfg.probe.calibration} at FPR {cfg.probe.target_fpr} on {calibrated_on} benign probe "
                              "clients" + (" and the held-out attackers" if cfg.probe.calibration == "margin" else "")
                              if _conformal(cfg) else "fixed")
    # Detection as each level sees it, on held-out clients (benign ones out of sample when calibration clients
    # exist): one verdict per client and local training.
    for level, upto in (("client", None), ("shadow", shadow_steps)):
        scores, labels = per_training(ds, prob, test, upto)
        metrics[f"{level}_level"] = detection_metrics(labels, scores, probe.thresholds[level])
    last = test & (ds.steps == ds.steps.max())
    metrics["last_step"] = detection_metrics(ds.labels[last], prob[last], tau)
    # Detection at each local step: how many shadow steps a cheaper shadow level needs.
    metrics["by_step"] = {int(t): detection_metrics(ds.labels[test & (ds.steps == t)], prob[test & (ds.steps == t)], tau)
                          for t in sorted(set(ds.steps.tolist()))}
    benign_clients = sorted(set(ds.clients[test & (ds.labels == 0)].tolist()))
    flagged = [c for c in benign_clients if (prob[ds.clients == c] >= tau).mean() > 0.5]
    metrics["benign_client_fpr"] = len(flagged) / len(benign_clients) if benign_clients else None
    metrics["samples"] = {"train": int(fit_mask.sum()), "heldout": int(test.sum()),
                          "transfer": int(ds.transfer.sum())}
    if ds.transfer.any():
        t_mask = ds.transfer | (test & (ds.labels == 0))
        m = detection_metrics(ds.labels[t_mask], prob[t_mask], tau)
        metrics["transfer_source"] = {"source": cfg.probe.transfer_source, "auroc": m["auroc"], "tpr": m["recall"],
                                      "fpr": m["fpr"], "malicious_samples": int(ds.transfer.sum())}
    if cfg.probe.transfer_checks:
        metrics.update(transfer_checks(cfg, spec, x, ds, held))
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
    log.info("probe %s: held-out AUROC %s, precision %s, recall %s, FPR %s at tau=%.4f", out_dir,
             *(f"{m[k]:.4f}" if m[k] is not None else "n/a" for k in ("auroc", "precision", "recall", "fpr")),
             probe.threshold)
    return probe, out_dir, comparison
