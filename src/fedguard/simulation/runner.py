"""The round loop, the same for every engine.

A plain recipe: load the base model once, attach LoRA, build the defense and the server, then for each round
configure the sampled clients, let the engine's client side (``fedguard.engine.ClientSide``) reach them,
aggregate what came back, evaluate, log and checkpoint. Resume restores the last checkpoint and continues with
identical results, because every random draw is a function of (seed, purpose, round, client).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedguard.config import ExperimentConfig
from fedguard.data.federation import build_eval_data
from fedguard.engine import ClientsFactory, Replies
from fedguard.evaluation.evaluator import Evaluator
from fedguard.factories import Resident, build_defense, build_realign, build_server, load_resident
from fedguard.federated.strategies import flora_merged
from fedguard.federated.transport import decode_update
from fedguard.io import NdjsonWriter, atomic_write_json, atomic_write_text, read_ndjson, save_tensors
from fedguard.messages import ServerState
from fedguard.model.keys import base_layer_key
from fedguard.model.lora import export_peft_adapter
from fedguard.model.registry import resolve_model_path
from fedguard.reporting.report import write_report
from fedguard.run_dir import CONFIG_FILE, FINAL_METRICS_FILE, METRICS_FILE, RunLog, new_run_dir
from fedguard.simulation.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fedguard.simulation.embedded import EmbeddedClients
from fedguard.simulation.metrics import final_metrics, log_eval, log_round, round_record
from fedguard.simulation.population import with_trigger
from fedguard.simulation.privacy_audits import Upload, canary_audit, membership_audit, update_audit
from fedguard.simulation.progress import RunProgress

log = logging.getLogger("fedguard")

FLORA_DELTA_FILE = "final_merged_delta.safetensors"  # FLoRA: ΔW per base weight, W = W_base + ΔW


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
                   stop_after_round: int | None = None, quiet: bool = False,
                   clients: ClientsFactory = EmbeddedClients) -> RunResult:
    """Run (or resume) an experiment in ``run_dir``; returns where the results are. ``clients``: the
    engine's client side (default: the embedded simulation)."""
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
        eval_data.triggered_prompts = [with_trigger(e, cfg.attack.trigger) for e in eval_data.harmful_prompts]
    defense, attacker_probe = build_defense(cfg, resident, progress)
    server = build_server(cfg, defense, build_realign(cfg, resident))
    clients = clients_factory(cfg, resident, attacker_probe)
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
        log_eval(0, record["eval"])
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
        record = round_record(server_round, server.plan.round_config(server_round).lr, instructions, outcome, replies,
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
        log_round(record, total_rounds)
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
    final = final_metrics(cfg, records, time.perf_counter() - t_start, loaded)
    final.update({k: v for k, v in audits.items() if v is not None})
    atomic_write_json(run_dir / FINAL_METRICS_FILE, final)
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
