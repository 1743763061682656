"""Every aggregation rule on the very same client updates: the aggregator comparison of one real round.

A recipe beside ``fedguard sweep``. For each scenario (an attack kind at a benign:malicious ratio) every
client trains once from θ₀, and then each rule in the list aggregates those identical messages and
the result is evaluated. So the rules differ in nothing but the rule: no run-to-run drift, and the
training is paid once per scenario instead of once per rule. Two more rows per scenario frame the rules:

* ``benign_only``: FedAvg over the scenario's benign clients alone, the result a perfect defense gets
  (ground truth picks the clients; it is a reference, not a rule);
* ``fedavg+probe``: FedAvg weighted by the Safe-FedLLM LoRA-Probe at the client level (no extra
  client computation, so it fits the shared updates; shadow and evidence need a shadow branch).

A last section compares wire formats (``communication.compression``) and exact product averaging on
the all-benign federation: bytes per client against utility.

What one round cannot show: multi-round dynamics (FoolsGold's growing histories, server optimisers,
error feedback paying back what top-k dropped, attackers adapting). ``fedguard sweep --aggregators``
runs whole federations for that. A benign client's update does not depend on the scenario here (one
round from θ₀, its own data and seeds), so each distinct (data, round config) is trained once for the
whole study (``_TrainOnce``).

Results go to ``OUT/rows.ndjson`` as they are measured (an interrupted study skips the rows it has),
then ``study.md`` / ``study.json`` and the plots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedguard.config import ConfigError, ExperimentConfig, build_config, differing_fields, split_level
from fedguard.data.federation import ClientData, build_client_data, build_eval_data
from fedguard.evaluation.evaluator import Evaluator
from fedguard.factories import build_defense, load_resident
from fedguard.federated.aggregation import build_aggregator
from fedguard.federated.client import LocalTrainer
from fedguard.federated.compression import CompressionSpec
from fedguard.federated.sampling import RoundPlan
from fedguard.federated.server import FederatedServer
from fedguard.federated.transport import WireSpec, encode_update, uplink_nbytes
from fedguard.io import NdjsonWriter, atomic_write_text, read_ndjson
from fedguard.messages import AdapterState, ClientUpdate, RoundConfig, ServerState
from fedguard.privacy.canaries import audited_client
from fedguard.recipes.sweep import parse_ratio
from fedguard.reporting.format import number
from fedguard.reporting.study import BENIGN_ONLY, BENIGN_SCENARIO, PROBE_ROW, write_study_report
from fedguard.run_dir import RunLog
from fedguard.simulation.metrics import detection_summary, screening_summary
from fedguard.simulation.population import build_population, with_trigger

log = logging.getLogger("fedguard")

ROWS_FILE = "rows.ndjson"
PRODUCT_ROW = "product"
LEVEL_PREFIX = "fedavg+"  # rows of FedAvg weighted by a defense level: fedavg+shadow, fedavg+audit, ...


@dataclass(frozen=True)
class Scenario:
    attack: str  # an attack kind, or "none"
    ratio: str  # BENIGN:MALICIOUS

    @classmethod
    def parse(cls, text: str) -> Scenario:
        attack, _, ratio = text.partition("@")
        return cls(attack, ratio)

    @property
    def name(self) -> str:
        return f"{self.attack}@{self.ratio}"

    def config(self, base: ExperimentConfig) -> ExperimentConfig:
        raw = base.model_dump(mode="json")
        raw["attack"]["malicious_clients"] = parse_ratio(self.ratio, base.federation.num_clients)
        if self.attack != "none":
            raw["attack"]["kind"] = self.attack
        raw["defense"]["level"] = "none"
        return build_config(raw)


class _TrainOnce:
    """The trainer, remembering each update by (client data, round config, start adapter): within one study
    every client starts from θ₀, so a benign client (or an attacker's harmful run) is trained once for all
    scenarios. Runs with an extra objective (probe-aware attackers) are never shared."""

    def __init__(self, trainer: LocalTrainer):
        self.trainer = trainer
        self.cache: dict[tuple, ClientUpdate] = {}
        self.trained = self.reused = 0

    def train(self, global_adapter: AdapterState, rc: RoundConfig, data: ClientData, on_step=None,
              objective=None, theta0: AdapterState | None = None) -> ClientUpdate:
        if objective is not None:
            return self.trainer.train(global_adapter, rc, data, on_step=on_step, objective=objective, theta0=theta0)
        key = (_fingerprint(data), rc, _adapter_fingerprint(global_adapter))
        if key in self.cache:
            self.reused += 1
        else:
            self.cache[key] = self.trainer.train(global_adapter, rc, data, on_step=on_step, theta0=theta0)
            self.trained += 1
        u = self.cache[key]  # a copy: attackers replace the tensors of what they get
        return replace(u, tensors=dict(u.tensors), attachments=dict(u.attachments), metrics=dict(u.metrics))


def _fingerprint(data: ClientData) -> str:
    h = hashlib.sha256(str(data.client_id).encode())
    for ex in data.examples:
        h.update(repr((ex.prompt_len, ex.input_ids)).encode())
    return h.hexdigest()


def _adapter_fingerprint(adapter: AdapterState) -> str:
    h = hashlib.sha256()
    for k in sorted(adapter):
        h.update(k.encode())
        h.update(adapter[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_aggregator_study(cfg: ExperimentConfig, out_dir: Path, quiet: bool = False,
                         scenarios: list[str] | None = None, aggregators: list[str] | None = None,
                         codecs: list[str] | None = None) -> Path:
    """Run the study of ``cfg.aggregator_study`` (or the given lists) into ``out_dir``; returns study.md."""
    raw = cfg.model_dump(mode="json")
    for key, given in (("scenarios", scenarios), ("aggregators", aggregators), ("codecs", codecs)):
        if given is not None:
            raw["aggregator_study"][key] = given
    cfg = build_config(raw)  # lists given as flags are validated like the config's own
    _check_fits_study(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_same_study(cfg, out_dir)
    runlog = RunLog(out_dir, file_name="study.log", console_output=not quiet)
    try:
        rows = _run(cfg, out_dir)
    finally:
        runlog.close()
    return write_study_report(cfg, rows, out_dir)


def _check_fits_study(cfg: ExperimentConfig) -> None:
    """Refuse what the shared one-round updates cannot honour, naming the field."""
    if cfg.lora.variant != "standard":
        raise ConfigError(f"aggregator-study compares rules on standard LoRA updates; lora.variant is "
                          f"'{cfg.lora.variant}' (FFA-LoRA and FLoRA change what clients train and send)")
    if cfg.server.lora_aggregation != "naive":
        raise ConfigError("aggregator-study: server.lora_aggregation must be 'naive' (product averaging is "
                          "its own row, aggregator_study.product)")
    if "fedprox" in cfg.aggregator_study.aggregators:
        raise ConfigError("aggregator_study.aggregators: fedprox changes the clients' training (its proximal "
                          "term), so it cannot share the other rules' updates; use fedguard sweep for it")


def _check_same_study(cfg: ExperimentConfig, out_dir: Path) -> None:
    """Rows in a folder are reused only for the config that made them (the study lists may differ)."""
    path = out_dir / "config.json"
    skip = ("aggregator_study", "sweep", "name", "split")  # split learning is not a study's concern
    mine = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip}
    if path.is_file():
        theirs = json.loads(path.read_text(encoding="utf-8"))
        # a field added to the config after the folder was written counts as its default there
        defaults = ExperimentConfig().model_dump(mode="json")
        diff = [f for f in differing_fields(theirs, mine) if not _added_at_default(f, theirs, mine, defaults)]
        if diff:
            raise ConfigError(f"{out_dir} holds a study of a different config ({', '.join(diff[:6])}"
                              f"{' ...' if len(diff) > 6 else ''} differ); pass another --out or remove it")
    else:
        atomic_write_text(path, json.dumps(mine, indent=2, sort_keys=True) + "\n")


def _added_at_default(field: str, theirs: dict, mine: dict, defaults: dict) -> bool:
    def get(d, parts):
        for part in parts:
            if not isinstance(d, dict) or part not in d:
                return KeyError
            d = d[part]
        return d

    parts = field.split(".")
    return get(theirs, parts) is KeyError and get(mine, parts) == get(defaults, parts)


def _run(cfg: ExperimentConfig, out_dir: Path) -> list[dict]:
    study = cfg.aggregator_study
    rows = read_ndjson(out_dir / ROWS_FILE)
    done = {(r["scenario"], r["method"]) for r in rows}
    writer = NdjsonWriter.resume(out_dir / ROWS_FILE, rows)

    plan: list[tuple[Scenario, list[str]]] = []
    for s in study.scenarios:
        methods = list(study.aggregators) + ([PROBE_ROW] if study.probe_level else []) \
            + [LEVEL_PREFIX + lv for lv in study.defense_levels if LEVEL_PREFIX + lv != PROBE_ROW] + [BENIGN_ONLY]
        plan.append((Scenario.parse(s), methods))
    benign_methods = [f"codec:{c}" for c in study.codecs] + ([PRODUCT_ROW] if study.product else [])
    if benign_methods:
        plan.append((Scenario.parse(BENIGN_SCENARIO), benign_methods))
    wanted = [("base", "base")] + [(s.name, m) for s, ms in plan for m in ms]
    if all(w in done for w in wanted):
        return _ordered(rows, wanted)

    resident = load_resident(cfg)
    loaded, peft_model, slot, theta0, trainer = (resident.loaded, resident.peft_model, resident.slot, resident.theta0,
                                                 resident.trainer)
    once = _TrainOnce(trainer)
    evaluator = Evaluator(loaded, peft_model, slot, trainer.loss, build_eval_data(cfg, loaded.tokenizer), cfg.eval,
                          cfg.data.system_prompt)
    def level_cfg(level: str) -> ExperimentConfig:
        return build_config({**cfg.model_dump(mode="json"), "defense": {**cfg.defense.model_dump(mode="json"),
                                                                         "level": level}})

    probe_cfg = level_cfg("client")
    # the probe simulated attackers know (the server's unless attack.probe names another)
    probe_aware = any(Scenario.parse(s).attack in ("probe_aware", "probe_projection") for s in study.scenarios)
    needs_probe = study.probe_level or probe_aware or any(split_level(lv)[0] for lv in study.defense_levels)
    probe = build_defense(probe_cfg if needs_probe else cfg, resident)[1]

    def probe_defense(level: str = "client"):  # a level with fresh state: every row is one first round
        return build_defense(level_cfg(level), resident)[0]

    log.info("aggregator study in %s: %d scenarios, base %s (%s)", out_dir, len(plan), loaded.path,
             str(loaded.compute_dtype).removeprefix("torch."))

    def add(row: dict[str, Any]) -> None:
        writer.append(row)
        rows.append(row)
        done.add((row["scenario"], row["method"]))

    if ("base", "base") not in done:
        add({"scenario": "base", "method": "base", "eval": _evaluate(evaluator, theta0, cache=True)})  # the base: shared
    rc = _with_defense_requests(RoundPlan.from_config(cfg).round_config(1), study.defense_levels, probe_defense)
    max_bytes = int(cfg.server.max_update_mb * 2**20)
    for scenario, methods in plan:
        todo = [m for m in methods if (scenario.name, m) not in done]
        if not todo:
            continue
        s_cfg = scenario.config(cfg)
        t0 = time.perf_counter()
        updates, population = _client_updates(s_cfg, loaded.tokenizer, once, probe, theta0, rc)
        log.info("%s: %d client updates (%d trained so far, %d reused) in %.0fs; %d methods to evaluate",
                 scenario.name, len(updates), once.trained, once.reused, time.perf_counter() - t0, len(todo))
        client_seconds = statistics.fmean(u.metrics.get("seconds", 0.0) for u in updates)
        evaluator.set_triggered(_triggered(s_cfg, evaluator))
        for method in todo:
            server, sent, wire = _server_for(method, s_cfg, population, updates, theta0, max_bytes, probe_defense)
            row = _measure(scenario, method, server, sent, wire, theta0, population, evaluator, client_seconds)
            add(row)
            ev, det = row["eval"], row["detection"] or {}
            log.info("%s · %-13s refusal %s%%  exact match %s%%  loss %s  TPR %s  FPR %s  (%.3fs aggregation)",
                     scenario.name, method, number(ev.get("refusal_rate")), number(ev.get("exact_match")),
                     number(ev.get("eval_loss"), 4), number(det.get("tpr"), 2), number(det.get("fpr"), 2),
                     row["aggregate_seconds"])
    return _ordered(rows, wanted)


def _with_defense_requests(rc: RoundConfig, levels: list[str], probe_defense: Callable[[str], Any]) -> RoundConfig:
    """Every client attaches what any compared level asks for (a shadow branch, step snapshots), merged from the
    levels' own requests: attachments never change the update itself, so every row aggregates the same tensors."""
    asked: dict[str, Any] = {}
    for level in levels:
        defense = probe_defense(level)
        for key, value in (defense.client_requests(1, "0") if defense is not None else {}).items():
            asked[key] = (asked.get(key) or value) if key == "snapshot_steps" else value
    return replace(rc, **asked)


def _triggered(cfg: ExperimentConfig, evaluator) -> list:
    """A backdoor scenario's harmful prompts with its trigger (attack success; simulation metrics only)."""
    if cfg.attack.kind != "backdoor" or not cfg.attack.malicious_clients:
        return []

    return [with_trigger(e, cfg.attack.trigger) for e in evaluator.data.harmful_prompts]


def _client_updates(cfg: ExperimentConfig, tokenizer, once: _TrainOnce, probe, theta0: AdapterState,
                    rc: RoundConfig) -> tuple[list[ClientUpdate], Any]:
    """Every client's update of the scenario ``cfg`` (attackers shape theirs), and who is who."""
    clients = build_client_data(cfg, tokenizer, audited_client(cfg))
    population = build_population(cfg, tokenizer, clients, probe)
    updates = []
    for cid in range(cfg.federation.num_clients):
        if cid in population.attackers:
            updates.append(population.attackers[cid].run(once, theta0, rc, clients[cid],
                                                          population.benign_data.get(cid), theta0))
        else:
            updates.append(once.train(theta0, rc, clients[cid], theta0=theta0))
    return updates, population


def _measure(scenario: Scenario, method: str, server: FederatedServer, sent: list[ClientUpdate], wire: WireSpec,
             theta0: AdapterState, population, evaluator, client_seconds: float) -> dict[str, Any]:
    """One row: aggregate the round, score what the server screened or weighted, evaluate the result;
    ``client_seconds``: the mean local training time of the scenario's clients (shared by its rows)."""
    t = time.perf_counter()
    outcome = server.aggregate_round(1, theta0, sent, ServerState())
    aggregate_seconds = time.perf_counter() - t
    if outcome.verdicts:
        detection = detection_summary(outcome.verdicts, population)
    else:
        detection = screening_summary(outcome.screening, population)
    return {"scenario": scenario.name, "method": method, "malicious": sorted(population.attackers),
            "accepted": outcome.accepted, "rejected": outcome.rejected, "detection": detection or None,
            "screening": outcome.screening, "aggregate_seconds": aggregate_seconds,
            "client_seconds": client_seconds,
            "bytes_up_mean": statistics.fmean(uplink_nbytes(m) for m in sent) if sent else None,
            "compression": wire.compression.kind, "lora_aggregation": outcome.lora_aggregation,
            "eval": _evaluate(evaluator, outcome.global_adapter)}


def _server_for(method: str, cfg: ExperimentConfig, population, updates: list[ClientUpdate], theta0: AdapterState,
                max_bytes: int, probe_defense: Callable[[], Any]) -> tuple[FederatedServer, list[ClientUpdate], WireSpec]:
    """The server a row uses and the messages it receives (the same client updates, as that row's wire sends them)."""
    wire = WireSpec()
    aggregator, defense, lora_aggregation, sent = "fedavg", None, "naive", list(updates)
    if method == BENIGN_ONLY:
        sent = [u for u in updates if not population.is_malicious(u.client_id)]
    elif method == PROBE_ROW:
        defense = probe_defense()
    elif method.startswith(LEVEL_PREFIX):
        level = method.removeprefix(LEVEL_PREFIX)
        defense = probe_defense(level)
        # each level receives only the attachments it asked for (clients attached every compared level's)
        wanted = {"step": ("step/",), "shadow": ("shadow/",), "evidence": ("shadow/",)}.get(split_level(level)[0], ())
        sent = [replace(u, attachments={k: v for k, v in u.attachments.items() if k.startswith(wanted)})
                if wanted else replace(u, attachments={}) for u in updates]
    elif method == PRODUCT_ROW:
        lora_aggregation = "product"
    elif method.startswith("codec:"):
        c = cfg.communication
        wire = WireSpec(CompressionSpec(method.removeprefix("codec:"), c.block_size, c.topk_fraction),
                        c.error_feedback)
        sent = [encode_update(u, theta0, wire) for u in updates]  # one round: no error-feedback memory yet
    else:
        aggregator = method
    server_cfg = cfg.server.model_copy(update={"aggregator": aggregator})
    server = FederatedServer(build_aggregator(server_cfg, cfg.seed), max_bytes, defense, wire=wire,
                             lora_aggregation=lora_aggregation, lora_alpha=cfg.lora.alpha, seed=cfg.seed)
    return server, sent, wire


def _evaluate(evaluator, adapter: AdapterState, cache: bool = False) -> dict[str, Any]:
    return evaluator.evaluate(adapter, samples=2, cache=cache)


def _ordered(rows: list[dict], wanted: list[tuple[str, str]]) -> list[dict]:
    by_key = {(r["scenario"], r["method"]): r for r in rows}
    return [by_key[w] for w in wanted if w in by_key]


# -- report ------------------------------------------------------------------------------------------------
