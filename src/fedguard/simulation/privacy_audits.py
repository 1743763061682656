"""The privacy audits a run asks for, run by the simulation at the end (it knows which examples each client
trained on and where the canaries are, which no server does).

* membership inference: the loss-ratio attack on the released final adapter (anyone who gets the model);
* canary exposure: the planted secrets' rank among random candidates under the final adapter, and verbatim
  extraction by greedy decoding;
* the server's view: the loss-ratio attack on one client's upload of one round (its last), against the
  round-start global adapter, on the examples it drew that round vs examples nobody trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fedguard.config import ExperimentConfig
from fedguard.data.federation import DataTokenizer, sample_examples
from fedguard.data.readers import load_source
from fedguard.federated.batches import batch_plan, trained_on
from fedguard.messages import AdapterState, RoundConfig
from fedguard.privacy.audits import membership_inference, update_attack
from fedguard.privacy.canaries import canary_examples, canary_exposure, run_canaries
from fedguard.seeding import numpy_rng

log = logging.getLogger("fedguard")


@dataclass
class Upload:
    """One client's upload as the server received it, kept for the server-view audit."""

    server_round: int
    config: RoundConfig
    global_adapter: AdapterState  # what the round started from
    adapter: AdapterState  # what the client sent, whole (FFA-LoRA: the frozen A filled in)


def _audited_data(cfg: ExperimentConfig, clients, what: str):
    data = getattr(clients, "data", None)
    if data is None or cfg.lora.variant == "flora" or cfg.privacy.audit_client >= len(data):
        log.warning("%s skipped: it needs the embedded engine, a non-FLoRA adapter and client %d", what,
                    cfg.privacy.audit_client)
        return None
    return data[cfg.privacy.audit_client]


def _non_members(cfg: ExperimentConfig, resident, count: int):
    """Examples of the training source that no client saw (its evaluation split)."""
    source = cfg.data.source if cfg.data.partition.method != "explicit" else "builtin:benign"
    unseen = load_source(source, "eval", 4 * count, cfg.seed + 2_000_003)
    rng = numpy_rng(cfg.seed, "membership-audit")
    return DataTokenizer(resident.loaded.tokenizer, cfg)(sample_examples(unseen, count, rng, source))


def _not_canaries(cfg: ExperimentConfig, resident, examples):
    """``examples`` without the planted canaries (the audits of ordinary data leave them out)."""
    if not cfg.privacy.canaries:
        return list(examples)

    planted = {e.input_ids for e in DataTokenizer(resident.loaded.tokenizer, cfg)(canary_examples(run_canaries(cfg), 1))}
    return [e for e in examples if e.input_ids not in planted]


def membership_audit(cfg: ExperimentConfig, resident, clients, final_adapter) -> dict[str, Any] | None:
    data = _audited_data(cfg, clients, "membership audit")
    if data is None:
        return None
    # non-members: the client's own examples held out of its training (same distribution as its members); the
    # evaluation split of the source only where none were held out (a different mix of domains: confounded)
    held = data.held_out
    members = _not_canaries(cfg, resident, data.examples)[: len(held) or cfg.privacy.audit_examples]
    non_members = held[: len(members)] if held else _non_members(cfg, resident, len(members))
    out = membership_inference(resident, resident.theta0, final_adapter, members[: len(non_members)], non_members,
                               batch_size=16)
    out["non_members_from"] = "the client's held-out examples" if held else "the source's evaluation split"
    log.info("membership inference on client %d: AUC %.3f (+- %.3f), TPR at 1%% FPR %.3f", cfg.privacy.audit_client,
             out["auc"], out["auc_standard_error"], out["tpr_at_1pct_fpr"])
    return {"client": cfg.privacy.audit_client, **out}


def canary_audit(cfg: ExperimentConfig, resident, final_adapter) -> dict[str, Any]:
    out = canary_exposure(resident, final_adapter, run_canaries(cfg), before=resident.theta0, data=cfg.data)
    log.info("canary exposure on client %d: mean %.2f of %.2f bits (%.2f before training), extraction %.0f%%",
             cfg.privacy.audit_client, out["mean_exposure"], out["max_exposure_possible"],
             out["before"]["mean_exposure"], 100 * (out["extraction_rate"] or 0.0))
    return {"client": cfg.privacy.audit_client, "repeats": cfg.privacy.canary_repeats, **out}


def update_audit(cfg: ExperimentConfig, resident, clients, upload: Upload | None) -> dict[str, Any] | None:
    """The server's attack on the audited client's last upload; None (with the reason logged) when the server
    never held one (secure aggregation) or this process did not see it."""
    if cfg.privacy.secure_aggregation != "none":
        return {"client": cfg.privacy.audit_client, "skipped": "secure aggregation: the server never holds one "
                "client's update, only the round's sum"}
    data = _audited_data(cfg, clients, "update audit")
    if data is None:
        return None
    if upload is None:
        log.warning("update audit skipped: client %d sent no update in this process (resumed after its last "
                    "round, or never sampled)", cfg.privacy.audit_client)
        return None

    # members: what the client drew that round; non-members: its own examples it did not draw that round (the same
    # distribution: the attack must find the round's examples, not the client's domains)
    drawn = set(trained_on(batch_plan(upload.config, len(data.examples), str(data.client_id))))
    members = _not_canaries(cfg, resident, [data.examples[i] for i in sorted(drawn)])
    rest = _not_canaries(cfg, resident, [e for i, e in enumerate(data.examples) if i not in drawn]) + data.held_out
    k = min(len(members), len(rest), cfg.privacy.audit_examples)
    if k < 4:
        log.warning("update audit skipped: client %d has %d drawn and %d undrawn examples (needs 4 of each)",
                    cfg.privacy.audit_client, len(members), len(rest))
        return None
    rng = numpy_rng(cfg.seed, "update-audit")
    members = [members[i] for i in sorted(rng.choice(len(members), k, replace=False))]
    non_members = [rest[i] for i in sorted(rng.choice(len(rest), k, replace=False))]
    out = update_attack(resident, upload.global_adapter, upload.adapter, members, non_members)
    out["non_members_from"] = "the client's examples not drawn in that round"
    log.info("server-view attack on client %d's round-%d update: AUC %.3f (+- %.3f)", cfg.privacy.audit_client,
             upload.server_round, out["auc"], out["auc_standard_error"])
    return {"client": cfg.privacy.audit_client, "round": upload.server_round, **out}
