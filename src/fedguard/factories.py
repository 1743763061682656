"""Config -> role objects, in one place: the resident model, the server, the client, the defense.

Both engines (the embedded simulation and Flower's ServerApp / ClientApp) build their parts here, so a
config means the same federation whichever engine runs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedguard.alignment import load_start_model
from fedguard.config import ExperimentConfig, split_level
from fedguard.data.federation import ClientData, DataTokenizer, sample_examples
from fedguard.data.readers import load_source
from fedguard.defenses.audit import BehaviourAudit
from fedguard.defenses.build import build_probe, default_probe_dir, probe_compat
from fedguard.defenses.defense import Defense, ProbeDefense
from fedguard.defenses.probe import LoRAProbe
from fedguard.defenses.realign import REALIGN_CLIENT, ServerRealignment
from fedguard.federated.aggregation import build_aggregator
from fedguard.federated.client import Client, LocalTrainer, MergedBase
from fedguard.federated.sampling import RoundPlan
from fedguard.federated.server import FederatedServer
from fedguard.federated.transport import WireSpec
from fedguard.messages import AdapterState
from fedguard.model.loading import LoadedModel
from fedguard.model.lora import AdapterSlot, attach_lora
from fedguard.privacy.accountant import noise_for_epsilon
from fedguard.privacy.client_dp import AdaptiveClip, ClientLevelDP
from fedguard.seeding import numpy_rng

log = logging.getLogger("fedguard")


@dataclass
class Resident:
    """The base model, loaded once per process, with LoRA attached and one trainer on it."""

    loaded: LoadedModel
    peft_model: Any
    slot: AdapterSlot
    theta0: AdapterState  # the fixed initial adapter, the same in every process (seeded by lora.init_seed)
    trainer: LocalTrainer
    merged_base: MergedBase | None = None  # FLoRA: the base weights hold W0 + the server's merged update


def load_resident(cfg: ExperimentConfig) -> Resident:
    loaded = load_start_model(cfg.model)
    peft_model, slot = attach_lora(loaded.model, cfg.lora)
    trainer = LocalTrainer(loaded, peft_model, slot, keep_optimizer_state=cfg.train.optimizer_state == "keep")
    merged = MergedBase(slot) if cfg.lora.variant == "flora" else None
    return Resident(loaded, peft_model, slot, slot.read(), trainer, merged)


def lora_aggregation(cfg: ExperimentConfig) -> str:
    """How the server combines adapters: FLoRA's stacking for lora.variant flora, else server.lora_aggregation."""
    return "flora" if cfg.lora.variant == "flora" else cfg.server.lora_aggregation


def build_server(cfg: ExperimentConfig, defense=None, realign=None) -> FederatedServer:
    plan = RoundPlan.from_config(cfg)
    return FederatedServer(build_aggregator(cfg.server, cfg.seed), int(cfg.server.max_update_mb * 2**20), defense,
                           wire=WireSpec.from_config(cfg), lora_aggregation=lora_aggregation(cfg),
                           lora_alpha=cfg.lora.alpha, seed=cfg.seed, plan=plan,
                           max_abs_value=cfg.server.max_abs_value, privacy=build_privacy(cfg, plan),
                           secure_clip=cfg.privacy.clip if cfg.privacy.secure_aggregation != "none" else None,
                           realign=realign)


def build_realign(cfg: ExperimentConfig, resident: Resident):
    """Server-side realignment on the server's own safety data (``server.realign``); None when off. Its data is
    the defender's probe split of its sources, like the behaviour audit's, drawn with another seed."""
    r = cfg.server.realign
    if not r.steps:
        return None
    seed = cfg.seed + r.seed + 11_000_027
    rng = numpy_rng(seed, "realign-data")
    refusals = _defender_examples(r.refusal_source, r.refusal_examples, seed, rng, "server.realign.refusal_source")
    lookalikes = []
    if r.lookalike_examples:  # built-in sources: their safety-adjacent domain; a user's file: all of it
        keep = (lambda e: e.domain == "safety_adjacent") if r.benign_source.startswith("builtin:") else None
        lookalikes = _defender_examples(r.benign_source, r.lookalike_examples, seed, rng,
                                        "server.realign.benign_source", keep=keep)
    examples = DataTokenizer(resident.loaded.tokenizer, cfg)(refusals + lookalikes)
    log.info("server realignment: %d steps of batch %d per round on %d refusal and %d look-alike examples",
             r.steps, r.batch_size, len(refusals), len(lookalikes))
    data = ClientData(REALIGN_CLIENT, examples, {"refusal": len(refusals), "lookalike": len(lookalikes)})
    return ServerRealignment(r, resident.trainer, data, cfg.seed, train_lora_a=not WireSpec.from_config(cfg).lora_b_only)


def _defender_examples(source: str, n: int, seed: int, rng, field: str, keep=None) -> list:
    """``n`` examples of the server's own data: the probe split of ``source`` (disjoint from the federation's training
    and evaluation data), those passing ``keep`` (built-in sources generate 8x the pool to filter from)."""
    pool = load_source(source, "probe", n if keep is None else 8 * n, seed)
    return sample_examples(pool if keep is None else [e for e in pool if keep(e)], n, rng, field)


def build_privacy(cfg: ExperimentConfig, plan: RoundPlan):
    """Client-level DP of ``cfg.privacy`` (None when off)."""
    p = cfg.privacy
    if p.client_dp == "none":
        return None

    sigma = p.noise_multiplier
    if sigma == "auto":
        sigma = noise_for_epsilon(p.target_epsilon, plan.rounds, plan.sample_rate, p.delta, p.accountant)
        log.info("privacy: noise multiplier %.4f keeps %d rounds at q=%.3g within epsilon %g (delta %g)", sigma,
                 plan.rounds, plan.sample_rate, p.target_epsilon, p.delta)
    adaptive = None
    if p.adaptive_clip:  # Andrew et al.'s default count noise: expected clients / 20
        adaptive = AdaptiveClip(p.target_unclipped_quantile, p.clip_learning_rate,
                                p.clipped_count_stddev or plan.sample_rate * plan.num_clients / 20)
    return ClientLevelDP(p.clip, float(sigma), plan.sample_rate, plan.num_clients, p.delta, p.accountant,
                         p.target_epsilon, cfg.seed, p.secure_noise, mode=p.client_dp, adaptive=adaptive,
                         secure_aggregation=p.secure_aggregation != "none")


def build_client(cfg: ExperimentConfig, resident: Resident) -> Client:
    ranks = cfg.lora.client_ranks or [cfg.lora.r] * cfg.federation.num_clients
    return Client(resident.trainer, WireSpec.from_config(cfg), resident.theta0, merged_base=resident.merged_base,
                  lora_alpha=cfg.lora.alpha, rank_of=lambda cid: ranks[int(cid)])


# -- the defense -------------------------------------------------------------------------------------------
def needs_probe(cfg: ExperimentConfig) -> bool:
    """The server's defense needs a probe, or a probe-aware attacker borrows the server's."""
    return split_level(cfg.defense.level)[0] is not None or (
        cfg.attack.kind in ("probe_aware", "probe_projection") and cfg.attack.malicious_clients > 0
        and not cfg.attack.probe)


def probe_dir(cfg: ExperimentConfig, resident: Resident, progress=None) -> tuple[Path, dict[str, Any]]:
    """Where the run's probe is, building and caching it first for ``defense.probe: auto``."""
    compat = probe_compat(cfg, resident.loaded, {k: tuple(v.shape) for k, v in resident.theta0.items()})
    if cfg.defense.probe != "auto":
        return Path(cfg.defense.probe), compat
    path = default_probe_dir(compat, cfg)
    if not (path / "probe.json").is_file():
        if progress is not None:
            progress.status("building the LoRA-Probe (cached for later runs)")
        log.info("no cached probe matches this model and LoRA config; building one in %s", path)
        build_probe(cfg, resident.loaded, resident.trainer, resident.theta0, path)
    return path, compat


def ensure_probe(cfg: ExperimentConfig) -> Path | None:
    """Build (or find) the probe a run of ``cfg`` will use, without running it; None if it needs none."""
    if not needs_probe(cfg):
        return None
    return probe_dir(cfg, load_resident(cfg))[0]


def attacker_probe(cfg: ExperimentConfig, resident: Resident):
    """The probe a simulated probe-aware attacker knows (``attack.probe``, else the server's); None for others."""
    if cfg.attack.kind not in ("probe_aware", "probe_projection") or not cfg.attack.malicious_clients:
        return None
    if cfg.attack.probe:
        return LoRAProbe.load(cfg.attack.probe)
    path, compat = probe_dir(cfg, resident)
    return LoRAProbe.load(path, expect=compat)


def build_defense(cfg: ExperimentConfig, resident: Resident, progress=None):
    """The defense of ``cfg.defense`` (None for level 'none'), and the probe simulated attackers know:
    ``attack.probe`` when given, else the server's (loaded, or built and cached, when a probe-aware
    attacker needs it even without a defense)."""
    server_probe, path = None, None
    if needs_probe(cfg):
        path, compat = probe_dir(cfg, resident, progress)
        server_probe = LoRAProbe.load(path, expect=compat)
    attacker_probe = LoRAProbe.load(cfg.attack.probe) if cfg.attack.probe else server_probe
    probe_level, audit = split_level(cfg.defense.level)
    if probe_level is None and not audit:
        return None, attacker_probe
    probe_defense = None
    if probe_level is not None:
        probe_defense = ProbeDefense(cfg.defense, server_probe, resident.theta0, cfg.train.local_steps,
                                     cfg.train.batch_size * cfg.train.grad_accum, cfg.train.lr)
        log.info("defense: %s level, probe %s (held-out AUROC %s, tau %.4f)", probe_level, path,
                 server_probe.metrics.get("auroc"), probe_defense.threshold)
    behaviour = build_audit(cfg, resident) if audit else None
    return Defense(cfg.defense, probe_defense, behaviour), attacker_probe


def build_audit(cfg: ExperimentConfig, resident: Resident):
    """The behaviour audit with the server's private prompts: the defender's probe split of its own sources."""
    a, loaded = cfg.defense.audit, resident.loaded
    seed = cfg.seed + a.seed + 9_000_011
    tok = DataTokenizer(loaded.tokenizer, cfg)
    rng = numpy_rng(seed, "audit-prompts")
    harmful = _defender_examples(a.harmful_source, a.harmful_examples, seed, rng, "defense.audit.harmful_source")
    benign = []
    if a.benign_examples:
        benign = _defender_examples(a.benign_source, a.benign_examples, seed, rng, "defense.audit.benign_source")
    log.info("defense: behaviour audit on %d refusal and %d benign examples of the server's own", len(harmful),
             len(benign))
    return BehaviourAudit(a, resident.slot, resident.trainer.loss, tok(harmful), tok(benign),
                          loaded.tokenizer.pad_token_id, cfg.eval.batch_size)
