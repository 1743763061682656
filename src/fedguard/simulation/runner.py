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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from fedguard.config import ExperimentConfig, build_config
from fedguard.data.federation import build_client_data, build_eval_data
from fedguard.evaluation.stats import paired_refusals
from fedguard.factories import (Resident, build_client, build_defense, build_realign, build_server, load_resident,
                                lora_aggregation)
from fedguard.federated.client import ClientState, EncodeError
from fedguard.federated.server import flora_merged
from fedguard.federated.transport import attachment_nbytes, uplink_header_nbytes, uplink_nbytes
from fedguard.io import NdjsonWriter, atomic_write_json, atomic_write_text, read_ndjson, save_tensors
from fedguard.messages import ClientUpdate, Instructions, ServerState, UpdateSum
from fedguard.model.keys import base_layer_key
from fedguard.model.lora import export_peft_adapter
from fedguard.seeding import derive_seed
from fedguard.simulation.population import build_population
from fedguard.simulation.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fedguard.simulation.privacy_audits import Upload, canary_audit, membership_audit, update_audit
from fedguard.simulation.progress import RunProgress

log = logging.getLogger("fedguard")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.ndjson"
FINAL_METRICS_FILE = "final_metrics.json"
FLORA_DELTA_FILE = "final_merged_delta.safetensors"  # FLoRA: ΔW per base weight, W = W_base + ΔW


def new_run_dir(cfg: ExperimentConfig, kind: str = "") -> Path:
    """A fresh ``OUTPUT_DIR/NAME[-KIND]-TIMESTAMP[-N]`` (``kind``: e.g. ``split``, ``split-server``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / f"{cfg.name}{'-' + kind if kind else ''}-{stamp}"
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


@dataclass
class Replies:
    """What came back from one round's clients."""

    messages: list[ClientUpdate]  # what arrived, for the server to judge
    metrics: dict[str, dict[str, float]]  # client id -> its training metrics (clients that trained)
    failed: dict[str, str] = field(default_factory=dict)  # client id -> why its message never arrived
    # networked engines: bytes the transport itself carried per client ({"down": n, "up": n}, whole messages)
    transport: dict[str, dict[str, int]] = field(default_factory=dict)
    # secure aggregation: the sum the protocol produced (``messages`` is then empty)
    summed: UpdateSum | None = None


class EmbeddedClients:
    """The embedded engine's side of a round: every sampled client's role, run in this process on the one
    resident model, with the clients' data and state held here (and checkpointed with the run)."""

    def __init__(self, cfg: ExperimentConfig, resident: Resident, attacker_probe):
        self.data = build_client_data(cfg, resident.loaded.tokenizer)
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
        from fedguard.privacy.secagg import round_settings, secure_round_sum
        from fedguard.seeding import numpy_rng

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


# An engine's client side: (config, the server process's resident model, the probe attackers know) -> an
# object with ``population``, ``exchange``, ``state_dict`` and ``load_state_dict`` (EmbeddedClients).
ClientsFactory = Callable[[ExperimentConfig, Resident, Any], Any]


def run_experiment(cfg: ExperimentConfig, run_dir: Path | None = None, resume: bool = False,
                   stop_after_round: int | None = None, quiet: bool = False,
                   clients: ClientsFactory = EmbeddedClients) -> RunResult:
    """Run (or resume) an experiment in ``run_dir``; returns where the results are. ``clients``: the
    engine's client side (default: the embedded simulation)."""
    from fedguard.model.registry import resolve_model_path

    resolve_model_path(cfg.model.name_or_path)  # a model that is not there fails before a run folder exists
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())
    progress = RunProgress(cfg.federation.rounds, disable=quiet)
    runlog = RunLog(run_dir, progress.console)
    try:
        with progress:
            return _run(cfg, run_dir, resume, stop_after_round, progress, clients)
    finally:
        runlog.close()


def _run(cfg: ExperimentConfig, run_dir: Path, resume: bool, stop_after_round: int | None,
         progress: RunProgress, clients_factory: ClientsFactory) -> RunResult:
    t_start = time.perf_counter()
    resident = load_resident(cfg)
    loaded = resident.loaded
    eval_data = build_eval_data(cfg, loaded.tokenizer)
    if cfg.attack.kind == "backdoor" and cfg.attack.malicious_clients:  # attack success, for metrics only
        from fedguard.simulation.population import with_trigger

        eval_data.triggered_prompts = [with_trigger(e, cfg.attack.trigger) for e in eval_data.harmful_prompts]
    defense, attacker_probe = build_defense(cfg, resident, progress)
    server = build_server(cfg, defense, build_realign(cfg, resident))
    clients = clients_factory(cfg, resident, attacker_probe)
    from fedguard.evaluation.evaluator import Evaluator

    evaluator = Evaluator(loaded, resident.peft_model, resident.slot, resident.trainer.loss, eval_data, cfg.eval,
                          cfg.data.system_prompt)
    log.info("run directory: %s", run_dir)
    log.info("%d clients, %d rounds of %d; base %s (%s)", cfg.federation.num_clients, cfg.federation.rounds,
             cfg.federation.clients_per_round, loaded.path, str(loaded.compute_dtype).removeprefix("torch."))

    start, global_adapter, state, client_states, records = _start_or_resume(cfg, run_dir, resume, resident, server)
    clients.load_state_dict(client_states)
    writer = NdjsonWriter.resume(run_dir / METRICS_FILE, records)
    if not any(r.get("round") == 0 for r in records):
        progress.status("evaluating the base model (round 0)")
        # before any round the weights are exactly the files on disk plus theta0: runs of a sweep share this
        record = {"round": 0, "eval": evaluator.evaluate(global_adapter, cache=start == 1)}
        _log_eval(0, record["eval"])
        writer.append(record)
        records.append(record)

    total_rounds = cfg.federation.rounds
    upload = None  # the audited client's last upload (privacy.audit_update)
    for server_round in range(start, total_rounds + 1):
        if server.privacy is not None and server.privacy.would_exceed(state):
            log.warning("stopping before round %d: it would spend more than privacy.target_epsilon %.3g (spent %.3f)",
                        server_round, server.privacy.target_epsilon, server.privacy.spent(state))
            break
        t_round = time.perf_counter()
        instructions = server.configure(server_round, global_adapter, state)
        progress.start_round(server_round, len(instructions) * cfg.train.local_steps)
        # what each sampled client fetches before training (FLoRA: the stacks it has not merged yet)
        down = {cid: server.downlink_nbytes(global_adapter, state, cid) for cid in instructions}
        replies = clients.exchange(server_round, instructions, progress)
        train_seconds = time.perf_counter() - t_round
        if cfg.privacy.audit_update:
            upload = _keep_upload(str(cfg.privacy.audit_client), server, server_round, global_adapter, instructions,
                                  replies) or upload
        outcome = server.aggregate_round(server_round, global_adapter, replies.messages, state,
                                         sent_to=list(instructions), summed=replies.summed)
        global_adapter, state = outcome.global_adapter, outcome.state
        if resident.merged_base is not None:  # FLoRA: the resident model evaluates W0 + ΔW
            resident.merged_base.sync(flora_merged(state), state.round)
        record = _round_record(server_round, server.plan.round_config(server_round).lr, instructions, outcome, replies,
                               down, clients.population)
        record["train_seconds"] = train_seconds
        if defense is not None and defense.audit_seconds is not None:
            record["defense"]["audit_seconds"] = defense.audit_seconds
        if _eval_due(cfg, server_round):
            progress.status(f"round {server_round}/{total_rounds} · evaluating")
            record["eval"] = evaluator.evaluate(global_adapter)
        record["round_seconds"] = time.perf_counter() - t_round
        writer.append(record)
        records.append(record)
        _log_round(record, total_rounds)
        if _checkpoint_due(cfg, server_round):
            save_checkpoint(run_dir, server_round, resident.slot, global_adapter, state, clients.state_dict(),
                            loaded.path, cfg.checkpoint.keep_last)
        progress.end_round()
        if stop_after_round is not None and server_round == stop_after_round:
            _crash(server_round)
    return _finish(cfg, run_dir, resident, clients, global_adapter, state, records, t_start, upload)


def _keep_upload(audited: str, server, server_round: int, global_adapter, instructions,
                 replies: Replies) -> Upload | None:
    """The audited client's message of this round as the server decodes it (None if it sent none)."""
    from fedguard.federated.transport import decode_update

    for m in replies.messages:
        if m.client_id == audited:
            try:
                tensors = decode_update(m, global_adapter, server.wire, server.max_update_bytes).tensors
            except Exception:  # noqa: BLE001 - the server would reject it as well: nothing to attack
                return None
            return Upload(server_round, instructions[audited].config, global_adapter,
                          server.wire.full_view(tensors, global_adapter))
    return None


def _crash(server_round: int) -> None:
    """Simulates a crash: no clean-up, no final artifacts (used to test resume)."""
    log.warning("stopping hard after round %d (--stop-after-round)", server_round)
    for h in logging.getLogger("fedguard").handlers:
        h.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _finish(cfg: ExperimentConfig, run_dir: Path, resident: Resident, clients, global_adapter, state: ServerState,
            records: list[dict[str, Any]], t_start: float, upload: Upload | None = None) -> RunResult:
    """The run's artifacts: the final adapter (PEFT), FLoRA's merged delta, the privacy audits, final metrics and
    the report. ``upload``: the audited client's last upload, for the server-view audit."""
    loaded = resident.loaded
    export_peft_adapter(resident.slot, global_adapter, run_dir / "final_adapter", loaded.path)
    p = cfg.privacy
    audits = {"membership_inference": membership_audit(cfg, resident, clients, global_adapter)
              if p.audit_membership else None,
              "canary_exposure": canary_audit(cfg, resident, global_adapter) if p.canaries else None,
              "update_attack": update_audit(cfg, resident, clients, upload) if p.audit_update else None}
    if cfg.lora.variant == "flora":  # FLoRA's result lives in the base weights: W = W_base + ΔW per module
        save_tensors(run_dir / FLORA_DELTA_FILE,
                     {base_layer_key(m): d.float() for m, d in flora_merged(state).items()})
    final = _final_metrics(cfg, records, time.perf_counter() - t_start, loaded)
    final.update({k: v for k, v in audits.items() if v is not None})
    atomic_write_json(run_dir / FINAL_METRICS_FILE, final)
    from fedguard.reporting.report import write_report

    report = write_report(run_dir, cfg, records, final)
    log.info("report: %s", report)
    return RunResult(run_dir, final, report)


def _start_or_resume(cfg: ExperimentConfig, run_dir: Path, resume: bool, resident: Resident, server):
    """(first round, global adapter, server state, client states, metric records so far): from the last
    checkpoint when resuming, else from θ₀."""
    records = read_ndjson(run_dir / METRICS_FILE)
    checkpoints = list_checkpoints(run_dir) if resume else []
    if not checkpoints:
        return 1, resident.theta0, ServerState(), {}, [r for r in records if r.get("round") == 0]
    ckpt = load_checkpoint(checkpoints[-1])
    if set(ckpt.global_adapter) != set(resident.theta0):
        raise ValueError(f"{ckpt.path}: adapter keys do not match this model and LoRA config")
    wire = server.wire
    if any(s.residual for s in ckpt.client_states.values()) and not (wire.compressed and wire.error_feedback):
        raise ValueError("the checkpoint holds error-feedback memory but this run keeps none "
                         "(communication.compression / error_feedback changed?)")
    server.restore(ckpt.server_state)
    if resident.merged_base is not None:
        resident.merged_base.sync(flora_merged(ckpt.server_state), ckpt.round)
    log.info("resuming after round %d from %s", ckpt.round, ckpt.path)
    return (ckpt.round + 1, ckpt.global_adapter, ckpt.server_state, ckpt.client_states,
            [r for r in records if r.get("round", 0) <= ckpt.round])


def _round_record(server_round: int, lr: float, instructions: dict[str, Instructions], outcome, replies: Replies,
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
    from fedguard.defenses.probe import detection_metrics

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


def _log_round(record: dict[str, Any], total_rounds: int) -> None:
    loss = "-" if record["train_loss"] is None else f"{record['train_loss']:.4f}"  # "-": nobody answered
    log.info("round %d/%d: train loss %s, lr %.2e, %d accepted, %d rejected, %.1fs", record["round"], total_rounds,
             loss, record["lr"], len(record["accepted"]), len(record["rejected"]), record["round_seconds"])
    if "eval" in record:
        _log_eval(record["round"], record["eval"])


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
        **_privacy_totals(rounds),
        "rejected_updates": sum(len(r.get("rejected", {})) for r in rounds),
        "mean_round_seconds": statistics.fmean(r["round_seconds"] for r in rounds) if rounds else None,
        "mean_train_seconds_per_round": statistics.fmean(r["train_seconds"] for r in rounds) if rounds else None,
        "bytes_up_per_round": statistics.fmean(r["bytes_up"] for r in rounds) if rounds else None,
        **_communication_totals(cfg, rounds),
        "wall_seconds_this_process": seconds,
    }
