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
from fedguard.evaluation.stats import format_rate, paired_refusals
from fedguard.factories import build_defense, load_resident
from fedguard.federated.aggregation import build_aggregator
from fedguard.federated.client import LocalTrainer
from fedguard.federated.compression import CompressionSpec
from fedguard.federated.sampling import RoundPlan
from fedguard.federated.server import FederatedServer
from fedguard.federated.transport import WireSpec, encode_update, uplink_nbytes
from fedguard.io import NdjsonWriter, atomic_write_bytes, atomic_write_text, read_ndjson
from fedguard.messages import AdapterState, ClientUpdate, RoundConfig, ServerState
from fedguard.privacy.canaries import audited_client
from fedguard.recipes.sweep import parse_ratio
from fedguard.reporting.figures import png_bytes, pyplot
from fedguard.run_dir import RunLog
from fedguard.simulation.metrics import detection_summary, screening_summary
from fedguard.simulation.population import build_population, with_trigger

log = logging.getLogger("fedguard")

ROWS_FILE = "rows.ndjson"
BENIGN_ONLY = "benign_only"
PROBE_ROW = "fedavg+probe"
PRODUCT_ROW = "product"
BENIGN_SCENARIO = "none@1:0"  # the wire-format section: every client benign
EVAL_SCALARS = ("refusal_rate", "compliance_rate", "neither_rate", "refusal_rate_keyword", "overrefusal_rate",
                "refusal_rate_triggered", "exact_match", "eval_loss", "perplexity", "harmful_n", "overrefusal_n",
                "refusal_triggered_n")
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
                     scenario.name, method, _fmt(ev.get("refusal_rate")), _fmt(ev.get("exact_match")),
                     _fmt(ev.get("eval_loss"), 4), _fmt(det.get("tpr"), 2), _fmt(det.get("fpr"), 2),
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
def _fmt(v, nd=1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _kb(n: float | None) -> float | None:
    return None if n is None else n / 1e3


def write_study_report(cfg: ExperimentConfig, rows: list[dict], out_dir: Path) -> Path:
    base = next((r for r in rows if r["method"] == "base"), None)
    rule_rows = [r for r in rows if r["scenario"] not in ("base", BENIGN_SCENARIO)]
    wire_rows = [r for r in rows if r["scenario"] == BENIGN_SCENARIO]
    b = (base or {}).get("eval", {})
    t = cfg.train
    lines = [f"# fedguard aggregator study: {cfg.name}", "",
             f"Model `{cfg.model.name_or_path}`, {cfg.federation.num_clients} clients, one round of {t.local_steps} "
             f"local steps (batch {t.batch_size}, lr {t.lr:g}) from the base adapter. In each scenario every rule "
             "aggregates the very same client updates, so the rows differ only by the rule. "
             f"Refusal = rule score on {cfg.eval.harmful_prompts} held-out harmful prompts (higher is safer); exact "
             f"match on {cfg.eval.benign_prompts} checkable prompts and held-out loss on {cfg.eval.loss_examples} "
             "benign examples measure utility. TPR / FPR: malicious / benign clients a rule screened out (kept in "
             "less than half of the aggregate) or the probe weighted below 0.5; – where a rule does not screen. "
             f"`benign_only` is FedAvg over the benign clients alone (the target); `{PROBE_ROW}` is FedAvg weighted "
             "by the LoRA-Probe (client level). Brackets: 95 % Wilson intervals; keyword rule: the Safe-FedLLM "
             "keyword rule on the same responses; *vs benign_only*: refusal difference in points, with the exact "
             "McNemar p on the same prompts. Expected attackers (server.expected_malicious): "
             f"{cfg.server.expected_malicious}.", "",
             f"Base model: refusal {format_rate(b, 'refusal_rate')} %, over-refusal "
             f"{format_rate(b, 'overrefusal_rate')} %, exact match {_fmt(b.get('exact_match'))} %, "
             f"held-out loss {_fmt(b.get('eval_loss'), 4)}.", ""]
    scenarios = list(dict.fromkeys(r["scenario"] for r in rule_rows))
    lines += _summary_table(rule_rows, scenarios)
    for s in scenarios:
        sub = [r for r in rule_rows if r["scenario"] == s]
        secs = sub[0].get("client_seconds")
        lines += [f"## {s}", "",
                  f"Malicious clients: {sub[0].get('malicious')}. Local training: {_fmt(secs)} s per client "
                  "(shared by every row).", "",
                  "| method | refusal % [95 % CI] | keyword rule % | over-refusal % [95 % CI] | vs benign_only | "
                  "refusal with trigger % | exact match % | held-out loss | TPR | FPR | aggregation ms | "
                  "uplink KB / client |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        target = next((r for r in sub if r["method"] == BENIGN_ONLY), None)
        for r in sub:
            ev, det = r["eval"], r.get("detection") or {}
            vs = None if target is None or r is target else paired_refusals(ev.get("refused"),
                                                                            target["eval"].get("refused"))
            vs_text = "–" if vs is None else (f"{ev['refusal_rate'] - target['eval']['refusal_rate']:+.1f} "
                                              f"(p {vs['p']:.2g})")
            lines.append(f"| {r['method']} | {format_rate(ev, 'refusal_rate')} | "
                         f"{_fmt(ev.get('refusal_rate_keyword'))} | {format_rate(ev, 'overrefusal_rate')} | "
                         f"{vs_text} | {_fmt(ev.get('refusal_rate_triggered'))} | {_fmt(ev.get('exact_match'))} | "
                         f"{_fmt(ev.get('eval_loss'), 4)} | {_fmt(det.get('tpr'), 2)} | {_fmt(det.get('fpr'), 2)} | "
                         f"{_fmt(1e3 * r['aggregate_seconds'])} | {_fmt(_kb(r['bytes_up_mean']))} |")
        lines.append("")
    if scenarios:
        for key, label, bars in _PLOTS:
            atomic_write_bytes(out_dir / f"{key}.png", _rules_plot(rule_rows, scenarios, key, label, b.get(key), bars))
        lines += [f"![{label} per rule]({key}.png)\n" for key, label, _ in _PLOTS]
    if wire_rows:
        plain = next((r for r in wire_rows if r["method"] == "codec:none"), None)
        lines += ["## Wire formats on the all-benign federation", "",
                  "One round, so error feedback has nothing to pay back yet: a lossy codec's error shows in full. "
                  "`product`: exact averaging of the products B_k A_k, re-factorised to rank r (relative error of "
                  "naive A/B averaging vs the exact mean in the last column).", "",
                  "| method | uplink bytes / client | vs plain | refusal % | exact match % | held-out loss | naive A/B error |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in wire_rows:
            ev = r["eval"]
            ratio = r["bytes_up_mean"] / plain["bytes_up_mean"] if plain else None
            naive = (r.get("lora_aggregation") or {}).get("naive_rel")
            lines.append(f"| {r['method']} | {r['bytes_up_mean']:,.0f} | {_fmt(ratio, 3)}x | "
                         f"{_fmt(ev.get('refusal_rate'))} | {_fmt(ev.get('exact_match'))} | "
                         f"{_fmt(ev.get('eval_loss'), 4)} | {_fmt(naive, 4)} |")
        atomic_write_bytes(out_dir / "bytes_vs_utility.png", _wire_plot(wire_rows))
        lines += ["", "![bytes vs utility](bytes_vs_utility.png)", ""]
    report = out_dir / "study.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "study.json", json.dumps(
        [{**{k: v for k, v in r.items() if k != "eval"},
          "eval": {k: r["eval"].get(k) for k in EVAL_SCALARS if k in r["eval"]}} for r in rows],
        indent=2, sort_keys=True) + "\n")
    return report


def _summary_table(rows: list[dict], scenarios: list[str]) -> list[str]:
    """Rules x scenarios: refusal % · held-out loss (docs/guide/aggregation.md's summary comes from here)."""
    if not scenarios:
        return []
    cell = {(r["scenario"], r["method"]): r["eval"] for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["## Summary: refusal % · held-out loss", "",
             "| method | " + " | ".join(scenarios) + " |", "|---|" + "---:|" * len(scenarios)]
    for m in methods:
        cells = [(f"{_fmt(ev.get('refusal_rate'))} · {_fmt(ev.get('eval_loss'), 3)}" if (ev := cell.get((s, m)))
                  else "–") for s in scenarios]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


# (metric, axis label, bars from 0 on a shared axis; else points on each panel's own axis, for a loss whose
# spread between rules is small next to the blow-ups some attacks cause)
_PLOTS = (("refusal_rate", "refusal rate (%)", True), ("eval_loss", "held-out loss", False))


def _rules_plot(rows: list[dict], scenarios: list[str], key: str, label: str, base_value, bars: bool) -> bytes:
    plt = pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = min(3, len(scenarios))
    nrows = (len(scenarios) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 0.32 * len(methods) * nrows + 1.2 * nrows),
                             sharex=bars, squeeze=False)
    flat = [ax for line in axes for ax in line]
    colours = ["tab:green" if m == BENIGN_ONLY else "tab:purple" if m == PROBE_ROW else "tab:blue" for m in methods]
    for ax, s in zip(flat, scenarios):
        vals = {r["method"]: r["eval"].get(key) for r in rows if r["scenario"] == s}
        ys = list(range(len(methods)))
        if bars:
            ax.barh(ys, [vals.get(m) or 0.0 for m in methods], color=colours)
        else:
            shown = [(y, vals[m], c) for y, m, c in zip(ys, methods, colours) if vals.get(m) is not None]
            ax.scatter([v for _, v, _ in shown], [y for y, _, _ in shown], c=[c for *_, c in shown], zorder=3)
        ax.set_yticks(ys, methods, fontsize=8)
        ax.invert_yaxis()
        if base_value is not None:
            ax.axvline(base_value, color="grey", ls="--", lw=1, label="base model")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(s, fontsize=10)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    for ax in flat[len(scenarios):]:
        ax.axis("off")
    fig.tight_layout()
    return png_bytes(fig)


def _wire_plot(rows: list[dict]) -> bytes:
    """Per wire format: uplink bytes (bars, log axis) beside held-out loss and exact match (points)."""
    plt = pyplot()
    names = [r["method"].removeprefix("codec:") for r in rows]
    ys = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.45 * len(rows) + 1.4), sharey=True)
    axes[0].barh(ys, [r["bytes_up_mean"] / 1e3 for r in rows], color="tab:blue")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("uplink KB per client per round (log)")
    for ax, key, label in ((axes[1], "eval_loss", "held-out loss"), (axes[2], "exact_match", "exact match (%)")):
        shown = [(y, r["eval"][key]) for y, r in zip(ys, rows) if r["eval"].get(key) is not None]
        ax.scatter([v for _, v in shown], [y for y, _ in shown], color="tab:orange", zorder=3)
        ax.set_xlabel(label)
    axes[0].set_yticks(ys, names, fontsize=9)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)
