"""A run's metrics: one record per round (metrics.ndjson), detection against ground truth, and the final
summary (final_metrics.json); and the lines the run logs from them."""

from __future__ import annotations

import logging
import statistics
from typing import Any

from fedguard.config import ExperimentConfig
from fedguard.defenses.probe import detection_metrics
from fedguard.engine import Replies
from fedguard.evaluation.stats import paired_refusals
from fedguard.factories import lora_aggregation
from fedguard.federated.transport import attachment_nbytes, uplink_header_nbytes, uplink_nbytes
from fedguard.messages import Instructions

log = logging.getLogger("fedguard")


def round_record(server_round: int, lr: float, instructions: dict[str, Instructions], outcome, replies: Replies,
                  down: dict[str, int], population) -> dict[str, Any]:
    """One round's line of metrics.ndjson."""
    sampled = [int(c) for c in instructions]
    metrics = replies.metrics
    traffic = {cid: {"up": 0, "up_header": 0, "down": down[cid], "defense": 0} for cid in metrics}
    for m in replies.messages:
        traffic[m.client_id].update(up=uplink_nbytes(m), up_header=uplink_header_nbytes(m),
                                    defense=attachment_nbytes(m))
    secure = replies.summed.report if replies.summed is not None else {}
    if secure.get("bytes_up") and metrics:  # the protocol's messages (keys, shares, masked vectors), per client
        for t in traffic.values():
            t["up"] = secure["bytes_up"] // len(metrics)
            t["down"] += secure["bytes_down"] // len(metrics)
    record: dict[str, Any] = {
        "round": server_round,
        "lr": lr,
        "sampled": sampled,
        "accepted": outcome.accepted,
        "rejected": {**replies.failed, **outcome.rejected},
        "clients": metrics,
        "train_loss": _mean([m.get("train_loss") for m in metrics.values()]),
        # bytes on the wire: uplink = what clients sent for aggregation (payload or tensors; up_header of
        # it is safetensors header), downlink = the global tensors each client received, defense =
        # snapshots a defense asked for
        "communication": traffic,
        "bytes_up": sum(t["up"] for t in traffic.values()),
        "bytes_up_mean": _mean([t["up"] for t in traffic.values()]),
        "bytes_down": sum(t["down"] for t in traffic.values()),
        "bytes_down_mean": _mean([t["down"] for t in traffic.values()]),
        "bytes_defense": sum(t["defense"] for t in traffic.values()),
        # ground truth, from the simulation's metadata; used for metrics only
        "malicious_sampled": [c for c in sampled if population.is_malicious(c)],
    }
    if replies.transport:
        record["transport_bytes"] = replies.transport
    if outcome.privacy is not None:
        record["privacy"] = outcome.privacy
    if outcome.lora_aggregation is not None:
        record["lora_aggregation"] = outcome.lora_aggregation
    if outcome.realign is not None:
        record["realign"] = outcome.realign
    if outcome.defended:
        record["defense"] = {"skipped": outcome.skipped, "verdicts": [v.to_json() for v in outcome.verdicts],
                             "detection": detection_summary(outcome.verdicts, population)}
    if outcome.screening is not None:  # what the aggregation rule itself let count
        record["screening"] = {"kept": outcome.screening,
                               "detection": screening_summary(outcome.screening, population)}
    return record


def _mean(values: list) -> float | None:
    """The mean of the numbers among ``values`` (None when there are none: a round nobody answered)."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    return statistics.fmean(numbers) if numbers else None


def detection_summary(verdicts, population) -> dict[str, Any]:
    """TPR, FPR and AUROC of one round's probe verdicts against ground truth: flagged when the weight is
    below 0.5; AUROC ranks by the probe's score."""
    return _against_truth([v.client_id for v in verdicts], [v.weight for v in verdicts],
                          [v.suspicion for v in verdicts], population)


def screening_summary(screening: dict[str, float] | None, population) -> dict[str, Any]:
    """TPR, FPR and AUROC of what a robust aggregation rule let count, against ground truth: screened out
    when its share is below 0.5; AUROC ranks by 1 − share."""
    screening = screening or {}
    return _against_truth(list(screening), list(screening.values()), [1.0 - s for s in screening.values()],
                          population)


def _against_truth(client_ids: list[str], kept: list[float], suspicion: list[float], population) -> dict[str, Any]:
    """Clients counting for less than half (``kept`` < 0.5) are the positives the server called; {} for none."""
    if not client_ids:
        return {}
    truth = [int(population.is_malicious(c)) for c in client_ids]
    called = detection_metrics(truth, [float(k < 0.5) for k in kept], 0.5)
    out: dict[str, Any] = {"tpr": called["recall"], "fpr": called["fpr"]}
    if 0 < sum(truth) < len(truth):
        out["auroc"] = detection_metrics(truth, suspicion, 0.5)["auroc"]
    return out


def _privacy_totals(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Client-level DP's epsilon after the last round (and the server's own view of one update), secure
    aggregation's dropouts, and each client's DP-SGD epsilon (its last report) with the largest of them."""
    out: dict[str, Any] = {}
    last = rounds[-1].get("privacy") if rounds else None
    if last is not None:
        out["privacy_rounds"] = len(rounds)
        if "epsilon" in last:
            out["privacy"] = {k: last.get(k) for k in ("epsilon", "delta", "epsilon_server_view")}
        if last.get("secure_aggregation"):
            out["secure_aggregation"] = {"dropped": sum(len(r.get("privacy", {}).get("dropped", [])) for r in rounds)}
    per_client = {cid: m["dpsgd_epsilon"] for r in rounds for cid, m in r.get("clients", {}).items()
                  if isinstance(m.get("dpsgd_epsilon"), (int, float))}
    if per_client:
        finite = [e for e in per_client.values() if e != float("inf")]
        out["dpsgd"] = {"epsilon_per_client": per_client,
                        "epsilon_max": max(per_client.values()) if len(finite) == len(per_client) else None}
    return out


def _communication_totals(cfg: ExperimentConfig, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes over the whole run, per client per round, and the exactness of product averaging."""
    per_client = [t for r in rounds for t in r.get("communication", {}).values()]
    out: dict[str, Any] = {
        "compression": cfg.communication.compression,
        "lora_variant": cfg.lora.variant,
        "lora_aggregation": lora_aggregation(cfg),
        "bytes_up_total": sum(r.get("bytes_up", 0) for r in rounds),
        "bytes_down_total": sum(r.get("bytes_down", 0) for r in rounds),
        "bytes_defense_total": sum(r.get("bytes_defense", 0) for r in rounds),
        "bytes_up_per_client_round": statistics.fmean(t["up"] for t in per_client) if per_client else None,
        "bytes_down_per_client_round": statistics.fmean(t["down"] for t in per_client) if per_client else None,
    }
    for key in ("naive_rel", "refactor_rel"):
        values = [r["lora_aggregation"][key] for r in rounds
                  if r.get("lora_aggregation", {}).get(key) is not None]
        if values:
            out[f"mean_{key}"] = statistics.fmean(values)
    return out


def log_round(record: dict[str, Any], total_rounds: int) -> None:
    loss = "-" if record["train_loss"] is None else f"{record['train_loss']:.4f}"  # "-": nobody answered
    log.info("round %d/%d: train loss %s, lr %.2e, %d accepted, %d rejected, %.1fs", record["round"], total_rounds,
             loss, record["lr"], len(record["accepted"]), len(record["rejected"]), record["round_seconds"])
    if "eval" in record:
        log_eval(record["round"], record["eval"])


def log_eval(server_round: int, ev: dict[str, Any]) -> None:
    parts = []
    for key, fmt in (("refusal_rate", "refusal {:.1f}%"), ("overrefusal_rate", "over-refusal {:.1f}%"),
                     ("refusal_rate_triggered", "refusal with trigger {:.1f}%"), ("exact_match", "exact match {:.1f}%"),
                     ("eval_loss", "held-out loss {:.4f}"), ("perplexity", "ppl {:.2f}")):
        if key in ev:
            parts.append(fmt.format(ev[key]))
    log.info("eval after round %d: %s (%.1fs)", server_round, ", ".join(parts), ev.get("eval_seconds", 0.0))


def final_metrics(cfg: ExperimentConfig, records: list[dict[str, Any]], seconds: float, loaded) -> dict[str, Any]:
    evals = [r for r in records if "eval" in r]
    scalar = ("refusal_rate", "compliance_rate", "neither_rate", "refusal_rate_keyword", "overrefusal_rate",
              "refusal_rate_triggered", "exact_match", "eval_loss", "perplexity", "harmful_n", "overrefusal_n",
              "refusal_triggered_n")
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    paired = None if last is first else paired_refusals(first.get("eval", {}).get("refused"),
                                                         last.get("eval", {}).get("refused"))
    rounds = [r for r in records if r.get("round", 0) > 0]
    return {
        "name": cfg.name,
        "rounds": len(rounds),
        "model": loaded.fingerprint(),
        "precision": str(loaded.compute_dtype).removeprefix("torch."),
        "before": {k: first["eval"][k] for k in scalar if k in first.get("eval", {})},
        "after": {k: last["eval"][k] for k in scalar if k in last.get("eval", {})},
        "after_round": last.get("round"),
        **({"refusal_change_p": paired["p"]} if paired else {}),
        "final_train_loss": rounds[-1]["train_loss"] if rounds else None,
        **_privacy_totals(rounds),
        "rejected_updates": sum(len(r.get("rejected", {})) for r in rounds),
        "mean_round_seconds": statistics.fmean(r["round_seconds"] for r in rounds) if rounds else None,
        "mean_train_seconds_per_round": statistics.fmean(r["train_seconds"] for r in rounds) if rounds else None,
        "bytes_up_per_round": statistics.fmean(r["bytes_up"] for r in rounds) if rounds else None,
        **_communication_totals(cfg, rounds),
        "wall_seconds_this_process": seconds,
    }
