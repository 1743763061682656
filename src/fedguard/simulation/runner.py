"""The embedded in-process simulation: wires the client role and the server role together.

A plain recipe: load the base model once, attach LoRA, build the clients' data, then for each round
sample clients, run the client role for each, run the server role on their updates, evaluate,
log and checkpoint. Resume restores the last checkpoint and continues with identical results,
because every random draw is a function of (seed, purpose, round, client).
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedguard.config import ExperimentConfig, build_config, split_level
from fedguard.data.federation import build_client_data, build_eval_data
from fedguard.evaluation.stats import paired_refusals
from fedguard.federated.aggregation import build_aggregator
from fedguard.federated.client import LocalTrainer
from fedguard.federated.lora_exact import base_layer_key, lora_scaling, merge_delta, reinit_adapter
from fedguard.federated.sampling import round_lr, sample_clients
from fedguard.federated.server import FederatedServer, flora_merged
from fedguard.federated.transport import (
    UplinkEncoder,
    WireSpec,
    attachment_nbytes,
    uplink_header_nbytes,
    uplink_nbytes,
)
from fedguard.federated.types import RoundConfig, ServerState
from fedguard.io import NdjsonWriter, atomic_write_json, atomic_write_text, read_ndjson, save_tensors
from fedguard.model.loading import load_base_model
from fedguard.model.lora import attach_lora, embed_rank, export_peft_adapter
from fedguard.seeding import derive_seed, numpy_rng
from fedguard.simulation.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fedguard.simulation.population import build_population
from fedguard.simulation.progress import RunProgress

log = logging.getLogger("fedguard")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.ndjson"
FINAL_METRICS_FILE = "final_metrics.json"
FLORA_DELTA_FILE = "final_merged_delta.safetensors"  # FLoRA: ΔW per base weight, W = W_base + ΔW


def new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def load_run_config(run_dir: Path) -> ExperimentConfig:
    import yaml

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return build_config(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


class RunLog:
    """Log to a file in the run directory (always) and to the console (rich) unless told not to."""

    def __init__(self, run_dir: Path, console=None, file_name: str = "run.log", console_output: bool = True):
        from rich.logging import RichHandler

        self.handlers: list[logging.Handler] = []
        fh = logging.FileHandler(run_dir / file_name, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handlers.append(fh)
        if console_output:
            rh = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
            rh.setFormatter(logging.Formatter("%(message)s"))
            self.handlers.append(rh)
        self.logger = logging.getLogger("fedguard")
        self.previous_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        for h in self.handlers:
            self.logger.addHandler(h)

    def close(self) -> None:
        for h in self.handlers:
            self.logger.removeHandler(h)
            h.close()
        self.logger.setLevel(self.previous_level)


def _eval_due(cfg: ExperimentConfig, server_round: int) -> bool:
    if server_round == cfg.federation.rounds:
        return True
    return bool(cfg.eval.every) and server_round % cfg.eval.every == 0


def _checkpoint_due(cfg: ExperimentConfig, server_round: int) -> bool:
    return server_round == cfg.federation.rounds or server_round % cfg.checkpoint.every == 0


@dataclass
class RunResult:
    run_dir: Path
    final_metrics: dict[str, Any]
    report: Path


def run_experiment(cfg: ExperimentConfig, run_dir: Path | None = None, resume: bool = False,
                   stop_after_round: int | None = None, quiet: bool = False) -> RunResult:
    """Run (or resume) an experiment in ``run_dir``; returns where the results are."""
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())
    progress = RunProgress(cfg.federation.rounds, disable=quiet)
    runlog = RunLog(run_dir, progress.console)
    try:
        with progress:
            return _run(cfg, run_dir, resume, stop_after_round, progress)
    finally:
        runlog.close()


def _run(cfg: ExperimentConfig, run_dir: Path, resume: bool, stop_after_round: int | None,
         progress: RunProgress) -> RunResult:
    t_start = time.perf_counter()
    loaded = load_base_model(cfg.model)
    peft_model, slot = attach_lora(loaded.model, cfg.lora)
    theta0 = slot.read()
    clients = build_client_data(cfg, loaded.tokenizer)
    eval_data = build_eval_data(cfg, loaded.tokenizer)
    if cfg.attack.kind == "backdoor" and cfg.attack.malicious_clients:  # attack success, for metrics only
        from fedguard.simulation.population import with_trigger

        eval_data.triggered_prompts = [with_trigger(e, cfg.attack.trigger) for e in eval_data.harmful_prompts]
    trainer = LocalTrainer(loaded, peft_model, slot, keep_optimizer_state=cfg.train.optimizer_state == "keep")
    defense, probe = build_defense(cfg, loaded, trainer, theta0, progress)
    population = build_population(cfg, loaded.tokenizer, clients, probe)
    wire = WireSpec.from_config(cfg)
    flora = cfg.lora.variant == "flora"
    server = FederatedServer(build_aggregator(cfg.server, cfg.seed), int(cfg.server.max_update_mb * 2**20), defense,
                             wire=wire, lora_aggregation=lora_aggregation(cfg),
                             lora_alpha=cfg.lora.alpha, seed=cfg.seed)
    uplink = UplinkEncoder(wire)  # client side: compression with each client's error-feedback memory
    # FLoRA merges every round's update into the base weights: keep the originals, always merge W0 + ΔW (one
    # rounding, the same whether the run went straight through or resumed).
    base0 = {m: p.detach().to("cpu", copy=True) for m, p in slot.base_weights().items()} if flora else None
    from fedguard.evaluation.evaluator import Evaluator

    evaluator = Evaluator(loaded, peft_model, slot, trainer.loss, eval_data, cfg.eval, cfg.data.system_prompt)
    log.info("run directory: %s", run_dir)
    log.info("%d clients with %s examples; %d rounds of %d clients; base %s (%s)",
             len(clients), [len(c) for c in clients], cfg.federation.rounds, cfg.federation.clients_per_round,
             loaded.path, str(loaded.compute_dtype).removeprefix("torch."))

    metrics_path = run_dir / METRICS_FILE
    records = read_ndjson(metrics_path)
    checkpoints = list_checkpoints(run_dir) if resume else []
    if checkpoints:
        ckpt = load_checkpoint(checkpoints[-1])
        if set(ckpt.global_adapter) != set(theta0):
            raise ValueError(f"{ckpt.path}: adapter keys do not match this model and LoRA config")
        global_adapter, state = ckpt.global_adapter, ckpt.server_state
        server.restore(state)
        trainer.client_optimizer_states = ckpt.client_optimizer_states
        uplink.load_state_dict(ckpt.client_feedback)
        if flora:
            _merge_into_base(slot, base0, state)
        start = ckpt.round + 1
        records = [r for r in records if r.get("round", 0) <= ckpt.round]
        log.info("resuming after round %d from %s", ckpt.round, ckpt.path)
    else:
        global_adapter, state, start = theta0, ServerState(), 1
        records = [r for r in records if r.get("round") == 0]
    writer = NdjsonWriter.resume(metrics_path, records)

    if not any(r.get("round") == 0 for r in records):
        progress.status("evaluating the base model (round 0)")
        # before any round the weights are exactly the files on disk plus theta0: runs of a sweep share this
        record = {"round": 0, "eval": evaluator.evaluate(global_adapter, cache=start == 1)}
        _log_eval(0, record["eval"])
        writer.append(record)
        records.append(record)

    total_rounds = cfg.federation.rounds
    steps_per_client = cfg.train.local_steps
    for server_round in range(start, total_rounds + 1):
        t_round = time.perf_counter()
        rc = round_config(cfg, server_round)
        sampled = sample_clients(cfg.federation.num_clients, cfg.federation.clients_per_round, cfg.seed, server_round)
        progress.start_round(server_round, len(sampled) * steps_per_client)
        updates, messages, send_failed = [], [], {}
        # what each sampled client fetches before training (FLoRA: the stacks it has not merged yet)
        down = {str(cid): server.downlink_nbytes(global_adapter, state, str(cid)) for cid in sampled}
        for k, cid in enumerate(sampled):
            progress.status(f"round {server_round}/{total_rounds} · client {cid} ({k + 1}/{len(sampled)})")
            rc_client = server.client_config(rc, str(cid))
            start, rank, scaling = global_adapter, None, None
            if flora:  # a fresh adapter of the client's own rank each round, run at alpha / r_k
                rank = (cfg.lora.client_ranks or [cfg.lora.r] * cfg.federation.num_clients)[cid]
                fresh = reinit_adapter(slot.shapes(), rank, derive_seed(cfg.seed, "flora-reinit", server_round, cid))
                start, scaling = embed_rank(fresh, cfg.lora.r), lora_scaling(cfg.lora.alpha, rank)
            with slot.scaled(scaling):
                if cid in population.attackers:  # simulation side: the attacker shapes what it sends
                    update = population.attackers[cid].run(trainer, start, rc_client, clients[cid],
                                                           population.benign_data.get(cid), theta0)
                else:
                    update = trainer.train(start, rc_client, clients[cid], on_step=progress.step, theta0=theta0)
            updates.append(update)
            try:  # the transport boundary: compression is the last thing a client does
                messages.append(uplink.encode(update, start, rank=rank))
            except ValueError as exc:
                send_failed[update.client_id] = f"encode_failed: {exc}"
                log.warning("round %d: client %s could not encode its update (%s)", server_round, cid, exc)
        train_seconds = time.perf_counter() - t_round
        outcome = server.aggregate_round(server_round, global_adapter, messages, state,
                                         sent_to=[str(c) for c in sampled])
        global_adapter, state = outcome.global_adapter, outcome.state
        if flora:  # every client merges the stacked adapter; on one resident model that is one merge
            _merge_into_base(slot, base0, state)
        traffic = {u.client_id: {"up": 0, "up_header": 0, "down": down[u.client_id], "defense": 0} for u in updates}
        for m in messages:
            traffic[m.client_id].update(up=uplink_nbytes(m), up_header=uplink_header_nbytes(m),
                                        defense=attachment_nbytes(m))
        record: dict[str, Any] = {
            "round": server_round,
            "lr": rc.lr,
            "sampled": sampled,
            "accepted": outcome.accepted,
            "rejected": {**send_failed, **outcome.rejected},
            "clients": {u.client_id: u.metrics for u in updates},
            "train_loss": statistics.fmean(u.metrics["train_loss"] for u in updates),
            "train_seconds": train_seconds,
            # bytes on the wire: uplink = what clients sent for aggregation (payload or tensors; up_header of
            # it is safetensors header), downlink = the global tensors each client received, defense =
            # snapshots a defense asked for
            "communication": traffic,
            "bytes_up": sum(t["up"] for t in traffic.values()),
            "bytes_up_mean": statistics.fmean(t["up"] for t in traffic.values()),
            "bytes_down": sum(t["down"] for t in traffic.values()),
            "bytes_down_mean": statistics.fmean(t["down"] for t in traffic.values()),
            "bytes_defense": sum(t["defense"] for t in traffic.values()),
            # ground truth, from the simulation's metadata; used for metrics only
            "malicious_sampled": [c for c in sampled if population.is_malicious(c)],
        }
        if outcome.lora_aggregation is not None:
            record["lora_aggregation"] = outcome.lora_aggregation
        if defense is not None:
            record["defense"] = {"skipped": outcome.skipped, "verdicts": [v.to_json() for v in outcome.verdicts],
                                 "detection": detection_summary(outcome.verdicts, population)}
            if defense.audit_seconds is not None:
                record["defense"]["audit_seconds"] = defense.audit_seconds
        if outcome.screening is not None:  # what the aggregation rule itself let count
            record["screening"] = {"kept": outcome.screening,
                                   "detection": screening_summary(outcome.screening, population)}
        if _eval_due(cfg, server_round):
            progress.status(f"round {server_round}/{total_rounds} · evaluating")
            record["eval"] = evaluator.evaluate(global_adapter)
        record["round_seconds"] = time.perf_counter() - t_round
        writer.append(record)
        records.append(record)
        log.info("round %d/%d: train loss %.4f, lr %.2e, %d accepted, %d rejected, %.1fs",
                 server_round, total_rounds, record["train_loss"], rc.lr, len(outcome.accepted),
                 len(outcome.rejected), record["round_seconds"])
        if "eval" in record:
            _log_eval(server_round, record["eval"])
        if _checkpoint_due(cfg, server_round):
            save_checkpoint(run_dir, server_round, slot, global_adapter, state, trainer.client_optimizer_states,
                            loaded.path, cfg.checkpoint.keep_last, client_feedback=uplink.state_dict())
        progress.end_round()
        if stop_after_round is not None and server_round == stop_after_round:
            # Simulates a crash: no clean-up, no final artifacts (used to test resume).
            log.warning("stopping hard after round %d (--stop-after-round)", server_round)
            for h in logging.getLogger("fedguard").handlers:
                h.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    export_peft_adapter(slot, global_adapter, run_dir / "final_adapter", loaded.path)
    if flora:  # FLoRA's result lives in the base weights: W = W_base + ΔW per module
        save_tensors(run_dir / FLORA_DELTA_FILE,
                     {base_layer_key(m): d.float() for m, d in flora_merged(state).items()})
    final = _final_metrics(cfg, records, time.perf_counter() - t_start, loaded)
    atomic_write_json(run_dir / FINAL_METRICS_FILE, final)
    from fedguard.reporting.report import write_report

    report = write_report(run_dir, cfg, records, final)
    log.info("report: %s", report)
    return RunResult(run_dir, final, report)


def lora_aggregation(cfg: ExperimentConfig) -> str:
    """How the server combines adapters: FLoRA's stacking for lora.variant flora, else server.lora_aggregation."""
    return "flora" if cfg.lora.variant == "flora" else cfg.server.lora_aggregation


def _merge_into_base(slot, base0: dict[str, Any], state: ServerState) -> None:
    """Set every LoRA module's base weight to W0 + ΔW (FLoRA's merged update so far)."""
    merged = merge_delta(base0, flora_merged(state))
    with torch.no_grad():
        for m, p in slot.base_weights().items():
            p.copy_(merged.get(m, base0[m]))


def round_config(cfg: ExperimentConfig, server_round: int) -> RoundConfig:
    """What the server tells every client of ``server_round`` before the aggregator and defense add theirs."""
    t = cfg.train
    return RoundConfig(server_round=server_round, lr=round_lr(t, server_round, cfg.federation.rounds),
                       local_steps=t.local_steps, batch_size=t.batch_size, grad_accum=t.grad_accum, seed=cfg.seed,
                       weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm)


def needs_probe(cfg: ExperimentConfig) -> bool:
    """The server's defense needs a probe, or a probe-aware attacker borrows the server's."""
    return split_level(cfg.defense.level)[0] is not None or (
        cfg.attack.kind in ("probe_aware", "probe_projection") and cfg.attack.malicious_clients > 0
        and not cfg.attack.probe)


def _probe_dir(cfg: ExperimentConfig, loaded, trainer, theta0, progress=None) -> tuple[Path, dict[str, Any]]:
    """Where the run's probe is, building and caching it first for ``defense.probe: auto``."""
    from fedguard.defenses.build import build_probe, default_probe_dir, probe_compat

    compat = probe_compat(cfg, loaded, {k: tuple(v.shape) for k, v in theta0.items()})
    if cfg.defense.probe != "auto":
        return Path(cfg.defense.probe), compat
    probe_dir = default_probe_dir(compat, cfg)
    if not (probe_dir / "probe.json").is_file():
        if progress is not None:
            progress.status("building the LoRA-Probe (cached for later runs)")
        log.info("no cached probe matches this model and LoRA config; building one in %s", probe_dir)
        build_probe(cfg, loaded, trainer, theta0, probe_dir)
    return probe_dir, compat


def ensure_probe(cfg: ExperimentConfig) -> Path | None:
    """Build (or find) the probe a run of ``cfg`` will use, without running it; None if it needs none."""
    if not needs_probe(cfg):
        return None
    loaded = load_base_model(cfg.model)
    peft_model, slot = attach_lora(loaded.model, cfg.lora)
    theta0 = slot.read()
    trainer = LocalTrainer(loaded, peft_model, slot, keep_optimizer_state=cfg.train.optimizer_state == "keep")
    return _probe_dir(cfg, loaded, trainer, theta0)[0]


def build_defense(cfg: ExperimentConfig, loaded, trainer, theta0, progress):
    """The defense of ``cfg.defense`` (None for level 'none'), and the probe simulated attackers know:
    ``attack.probe`` when given, else the server's (loaded, or built and cached, when a probe-aware
    attacker needs it even without a defense)."""
    from fedguard.defenses.defense import Defense, ProbeDefense
    from fedguard.defenses.probe import LoRAProbe

    server_probe, probe_dir = None, None
    if needs_probe(cfg):
        probe_dir, compat = _probe_dir(cfg, loaded, trainer, theta0, progress)
        server_probe = LoRAProbe.load(probe_dir, expect=compat)
    attacker_probe = LoRAProbe.load(cfg.attack.probe) if cfg.attack.probe else server_probe
    probe_level, audit = split_level(cfg.defense.level)
    if probe_level is None and not audit:
        return None, attacker_probe
    probe_defense = None
    if probe_level is not None:
        probe_defense = ProbeDefense(cfg.defense, server_probe, theta0, cfg.train.local_steps,
                                     cfg.train.batch_size * cfg.train.grad_accum, cfg.train.lr)
        log.info("defense: %s level, probe %s (held-out AUROC %s, tau %.4f)", probe_level, probe_dir,
                 server_probe.metrics.get("auroc"), probe_defense.threshold)
    behaviour = build_audit(cfg, loaded, trainer) if audit else None
    return Defense(cfg.defense, probe_defense, behaviour), attacker_probe


def build_audit(cfg: ExperimentConfig, loaded, trainer):
    """The behaviour audit with the server's private prompts: the defender's probe split of its own sources."""
    from fedguard.data.federation import DataTokenizer, sample_examples
    from fedguard.data.readers import load_source
    from fedguard.defenses.audit import BehaviourAudit

    a = cfg.defense.audit
    seed = cfg.seed + a.seed + 9_000_011
    tok = DataTokenizer(loaded.tokenizer, cfg)
    rng = numpy_rng(seed, "audit-prompts")
    harmful = sample_examples(load_source(a.harmful_source, "probe", a.harmful_examples, seed), a.harmful_examples,
                              rng, "defense.audit.harmful_source")
    benign = []
    if a.benign_examples:
        benign = sample_examples(load_source(a.benign_source, "probe", a.benign_examples, seed), a.benign_examples,
                                 rng, "defense.audit.benign_source")
    log.info("defense: behaviour audit on %d refusal and %d benign examples of the server's own", len(harmful),
             len(benign))
    return BehaviourAudit(a, trainer.slot, trainer.loss, tok(harmful), tok(benign), loaded.tokenizer.pad_token_id,
                          cfg.eval.batch_size)


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
    from fedguard.defenses.probe import detection_metrics

    truth = [int(population.is_malicious(c)) for c in client_ids]
    called = detection_metrics(truth, [float(k < 0.5) for k in kept], 0.5)
    out: dict[str, Any] = {"tpr": called["recall"], "fpr": called["fpr"]}
    if 0 < sum(truth) < len(truth):
        out["auroc"] = detection_metrics(truth, suspicion, 0.5)["auroc"]
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


def _log_eval(server_round: int, ev: dict[str, Any]) -> None:
    parts = []
    for key, fmt in (("refusal_rate", "refusal {:.1f}%"), ("overrefusal_rate", "over-refusal {:.1f}%"),
                     ("refusal_rate_triggered", "refusal with trigger {:.1f}%"), ("exact_match", "exact match {:.1f}%"),
                     ("eval_loss", "held-out loss {:.4f}"), ("perplexity", "ppl {:.2f}")):
        if key in ev:
            parts.append(fmt.format(ev[key]))
    log.info("eval after round %d: %s (%.1fs)", server_round, ", ".join(parts), ev.get("eval_seconds", 0.0))


def _final_metrics(cfg: ExperimentConfig, records: list[dict[str, Any]], seconds: float, loaded) -> dict[str, Any]:
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
        "rejected_updates": sum(len(r.get("rejected", {})) for r in rounds),
        "mean_round_seconds": statistics.fmean(r["round_seconds"] for r in rounds) if rounds else None,
        "mean_train_seconds_per_round": statistics.fmean(r["train_seconds"] for r in rounds) if rounds else None,
        "bytes_up_per_round": statistics.fmean(r["bytes_up"] for r in rounds) if rounds else None,
        **_communication_totals(cfg, rounds),
        "wall_seconds_this_process": seconds,
    }
