"""`fedguard align`: the aligned starting model Safe-FedLLM assumes, built from fedguard's own data.

A LoRA fine-tune of the base model on built-in harmful-request -> refusal pairs (every harm category except
``align.holdout_categories``) mixed with built-in benign data (checkable tasks, safety-adjacent questions
that share words with harmful ones, long-form instructions), merged into the base weights in fp32 and saved
as a model folder in the cache. ``model.aligned: true`` makes every run, probe and client start from it.

The report (``align_report.json`` in the folder, printed by the command) compares the base and the aligned
model on data the alignment never saw: held-out harm categories, held-out tasks, an independently written
harmful set, an over-refusal set of benign requests that look harmful, and benign utility (held-out loss,
exact match). The shipped evaluation sets are never training data (``fedguard.data.prompts``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from fedguard.alignment.preference import build_pairs, train_preference
from fedguard.config import ExperimentConfig, LoraSettings, ModelConfig
from fedguard.data.federation import ClientData, DataTokenizer
from fedguard.data.prompts import load_prompts
from fedguard.data.readers import load_source
from fedguard.data.tokenize import render_prompt
from fedguard.evaluation.evaluator import final_answer_matches
from fedguard.evaluation.generation import generate_batched
from fedguard.evaluation.refusal import is_refusal
from fedguard.federated.client import LocalTrainer
from fedguard.federated.lora_exact import lora_scaling, split_pairs
from fedguard.io import atomic_write_json, load_tensors, publish_dir, save_tensors
from fedguard.messages import RoundConfig
from fedguard.model.fingerprint import folder_fingerprint
from fedguard.model.loading import LoadedModel, load_base_model
from fedguard.model.lora import attach_lora
from fedguard.model.loss import heldout_loss
from fedguard.model.registry import cache_root, file_lock, resolve_model_path
from fedguard.seeding import numpy_rng

log = logging.getLogger(__name__)

REPORT_FILE = "align_report.json"
PEFT_PREFIX = "base_model.model."


def aligned_model_dir(cfg: ModelConfig, fingerprint: dict[str, Any]) -> Path:
    # the data by content too: a changed built-in corpus is another aligned model, never a stale cache hit
    align = cfg.align.model_dump()
    data = _examples_hash(_alignment_examples(cfg))
    if cfg.align.preference_steps:
        refusals, compliances, lookalikes = _preference_examples(cfg)
        data += _examples_hash(refusals + compliances + lookalikes)
    else:  # without a preference phase its settings change nothing: the supervised-only model keeps its key
        align = {k: v for k, v in align.items() if not k.startswith("preference_")}
    key = json.dumps({"base": {k: v for k, v in fingerprint.items() if k != "name"}, "align": align, "data": data},
                     sort_keys=True)
    name = Path(str(cfg.name_or_path)).name
    return cache_root() / "models" / f"{name}-aligned-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_aligned(cfg: ModelConfig) -> Path:
    """The aligned model folder for ``cfg``, built (once, under a lock) when missing. Finding it loads no model:
    the base model is identified by its folder's fingerprint (cached), and loaded only to build."""
    base_path = resolve_model_path(cfg.name_or_path)
    out = aligned_model_dir(cfg, folder_fingerprint(base_path, cache_root() / "fingerprints", cfg.trust_remote_code))
    if (out / "config.json").is_file():
        return out
    with file_lock(out.parent.parent / "locks" / f"{out.name}.lock"):
        if not (out / "config.json").is_file():
            if cfg.align.preference_steps:  # on top of the supervised stage, built (and cached) first
                build_preferred(cfg, load_base_model(cfg, str(ensure_aligned(supervised_only(cfg)))), out)
            else:
                build_aligned(cfg, load_base_model(cfg, base_path), out)
    return out


def start_model_path(cfg: ModelConfig) -> str:
    """Where a run's model starts: the aligned model folder when ``model.aligned`` (built on first use), else the
    base model."""
    return str(ensure_aligned(cfg)) if cfg.aligned else resolve_model_path(cfg.name_or_path)


def load_start_model(cfg: ModelConfig) -> LoadedModel:
    """A run's starting model (``start_model_path``), loaded once: what every run, probe and client assembles on."""
    return load_base_model(cfg, start_model_path(cfg))


def _examples_hash(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps(e.messages, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _alignment_parts(cfg: ModelConfig) -> tuple[list, list, list]:
    """(refusal pairs without the held-out categories, benign look-alikes, other benign data)."""
    a = cfg.align
    n_ref = int(round(a.examples * a.refusal_share))
    held = set(a.holdout_categories)
    refusals = [e for e in load_source("builtin:harmful-refusal", "train", 3 * n_ref, a.seed)
                if e.domain not in held][:n_ref]
    n_benign = a.examples - len(refusals)
    n_look = int(round(n_benign * a.lookalike_share))
    pool = load_source("builtin:benign", "train", 4 * n_benign, a.seed)
    lookalike = [e for e in pool if e.domain == "safety_adjacent"][:n_look]
    other = [e for e in pool if e.domain != "safety_adjacent"][: n_benign - len(lookalike)]
    return refusals, lookalike, other


def _preference_examples(cfg: ModelConfig) -> tuple[list, list, list]:
    """The preference phase's sources: the supervised phase's refusal pairs and look-alikes (``preference_
    lookalike_share`` of the pairs), and compliance answers to the same harmful tasks (the rejected side of harmful
    requests; held-out categories excluded as everywhere in alignment)."""
    refusals, lookalike, _ = _alignment_parts(cfg)
    held = set(cfg.align.holdout_categories)
    compliances = [e for e in load_source("builtin:harmful-compliance", "train", 4 * len(refusals), cfg.align.seed)
                   if e.domain not in held]
    share = cfg.align.preference_lookalike_share
    return refusals, compliances, lookalike[: int(round(len(refusals) * share / (1 - share)))]


def _alignment_examples(cfg: ModelConfig) -> list:
    """The alignment mix, in training order: refusal pairs (held-out categories excluded) and benign data of
    which ``lookalike_share`` is safety-adjacent."""
    a = cfg.align
    refusals, lookalike, other = _alignment_parts(cfg)
    mixed = refusals + lookalike + other
    order = numpy_rng(a.seed, "align-order").permutation(len(mixed))
    return [mixed[i] for i in order]


def _alignment_data(cfg: ModelConfig, tokenizer):
    examples = _alignment_examples(cfg)
    tok = DataTokenizer(tokenizer, ExperimentConfig(data={"max_length": cfg.align.max_length}))
    kinds = Counter("refusal" if e.kind != "benign" else "safety_adjacent" if e.domain == "safety_adjacent"
                    else "benign" for e in examples)
    return ClientData(-1, tok(examples), dict(sorted(kinds.items())))


def _eval_sets(cfg: ModelConfig) -> dict[str, list]:
    """Prompt sets the alignment never trained on."""
    a, n, seed = cfg.align, cfg.align.eval_prompts, cfg.align.seed + 1_000_003
    held = set(a.holdout_categories)
    heldout_tasks = load_prompts("builtin:harmful-prompts", 12 * n, seed)
    return {
        "harmful_heldout_categories": [e for e in heldout_tasks if e.domain in held][:n],
        "harmful_heldout_tasks": [e for e in heldout_tasks if e.domain not in held][:n],
        "harmful_independent": load_prompts("builtin:harmful-heldout", 0, seed),
        "overrefusal_independent": load_prompts("builtin:overrefusal", 0, seed, "benign"),
        "benign_exact_match": load_prompts("builtin:benign-heldout", 0, seed, "benign"),
    }


def evaluate_alignment(loaded, model, slot, loss_fn, adapter, sets: dict[str, list], loss_examples) -> dict[str, Any]:
    slot.load(adapter)
    out: dict[str, Any] = {}
    for name, examples in sets.items():
        prompts = [render_prompt(loaded.tokenizer, e.prompt_messages) for e in examples]
        if name == "benign_exact_match":
            responses = generate_batched(loaded, model, prompts, 24, 16)
            hits = [final_answer_matches(r, e.answer or "") for e, r in zip(examples, responses)]
            out[name] = {"rate": 100.0 * sum(hits) / len(hits), "n": len(hits)}
            continue
        responses = generate_batched(loaded, model, prompts, 40, 16)
        refused = [is_refusal(r, e.prompt_text) for e, r in zip(examples, responses)]  # as runs score them
        out[name] = {"refusal_rate": 100.0 * sum(refused) / len(refused), "n": len(refused),
                     "samples": [{"prompt": e.prompt_text, "response": r} for e, r in zip(examples, responses)][:4]}
    if loss_examples:
        out["benign_heldout_loss"] = heldout_loss(loss_fn, loss_examples, loaded.tokenizer.pad_token_id, 16,
                                                  loaded.device)
    return out


def _merge_into_base(base_dir: Path, adapter: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The base model's stored tensors with scaling * B @ A added to every LoRA module, in fp32."""
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{base_dir} has no safetensors weights to merge the alignment into")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_tensors(f))
    for module, pair in split_pairs(adapter).items():
        key = module.removeprefix(PEFT_PREFIX) + ".weight"
        if key not in weights:
            raise KeyError(f"alignment adapter module {module} has no base weight {key} in {base_dir}")
        w = weights[key]
        weights[key] = (w.float() + scaling * (pair.B.float() @ pair.A.float())).to(w.dtype)
    return weights


def build_aligned(cfg: ModelConfig, loaded, out: Path) -> dict[str, Any]:
    """Train, evaluate and save the aligned model for ``cfg`` into ``out``; returns the report."""
    a = cfg.align
    t0 = time.perf_counter()
    settings = LoraSettings(r=a.r, alpha=a.alpha, dropout=0.05, target_modules=list(a.target_modules), init_seed=a.seed)
    peft_model, slot = attach_lora(loaded.model, settings)
    theta0 = slot.read()
    trainer = LocalTrainer(loaded, peft_model, slot)
    data = _alignment_data(cfg, loaded.tokenizer)
    log.info("aligning %s: %d steps of batch %d on %s", loaded.path, a.steps, a.batch_size, data.composition)
    rc = RoundConfig(server_round=1, lr=a.lr, local_steps=a.steps, batch_size=a.batch_size, grad_accum=1,
                     seed=a.seed, max_grad_norm=1.0)
    update = trainer.train(theta0, rc, data, on_step=lambda s, l: log.info("align step %d/%d: loss %.4f", s, a.steps, l)
                           if s % 20 == 0 else None)
    train_seconds = time.perf_counter() - t0
    sets = _eval_sets(cfg)
    tok = DataTokenizer(loaded.tokenizer, ExperimentConfig(data={"max_length": a.max_length}))
    loss_examples = tok(load_source("builtin:benign", "eval", 64, a.seed + 1_000_003))
    report: dict[str, Any] = {
        "base": evaluate_alignment(loaded, peft_model, slot, trainer.loss, theta0, sets, loss_examples),
        "aligned": evaluate_alignment(loaded, peft_model, slot, trainer.loss, update.tensors, sets, loss_examples),
        "train": {"steps": a.steps, "batch_size": a.batch_size, "composition": data.composition,
                  "loss_first": update.metrics["train_loss_first"], "loss_last": update.metrics["train_loss_last"],
                  "seconds": train_seconds},
        "config": a.model_dump(), "base_model": loaded.fingerprint(),
        "precision": str(loaded.compute_dtype).removeprefix("torch."),
    }
    merged = _merge_into_base(Path(loaded.path), update.tensors, lora_scaling(a.alpha, a.r))
    return _publish(Path(loaded.path), merged, report, out, t0)


def _publish(source: Path, merged: dict[str, torch.Tensor], report: dict[str, Any], out: Path, t0: float) -> dict:
    """Write the merged weights, the source folder's other files and the report to ``out``, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in source.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json") \
                    and f.name != REPORT_FILE:
                shutil.copy2(f, staging / f.name)
        save_tensors(staging / "model.safetensors", merged, metadata={"format": "pt"})
        report["seconds"] = time.perf_counter() - t0
        atomic_write_json(staging / REPORT_FILE, report)
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("aligned model: %s (%.0f s)", out, report["seconds"])
    return report


def supervised_only(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` without the preference phase: the supervised stage it builds on (cached on its own)."""
    return cfg.model_copy(update={"align": cfg.align.model_copy(update={"preference_steps": 0})})


def build_preferred(cfg: ModelConfig, loaded, out: Path) -> dict[str, Any]:
    """The preference phase on top of the supervised aligned model ``loaded`` (its folder holds that stage's
    report): a fresh LoRA trained with DPO against the supervised model itself as reference, merged into it."""
    a = cfg.align
    t0 = time.perf_counter()
    supervised = json.loads((Path(loaded.path) / REPORT_FILE).read_text(encoding="utf-8"))
    settings = LoraSettings(r=a.r, alpha=a.alpha, dropout=0.05, target_modules=list(a.target_modules),
                            init_seed=a.seed + 1)
    peft_model, slot = attach_lora(loaded.model, settings)
    theta0 = slot.read()  # B = 0: exactly the supervised model, DPO's reference
    trainer = LocalTrainer(loaded, peft_model, slot)
    refusals, compliances, lookalikes = _preference_examples(cfg)
    pairs = build_pairs(refusals, compliances, lookalikes, loaded.tokenizer, a.max_length, a.seed)
    log.info("preference phase on %s: %d DPO steps of %d pairs", loaded.path, a.preference_steps,
             a.preference_batch_size)
    adapter, metrics = train_preference(
        trainer, theta0, pairs, steps=a.preference_steps, batch_size=a.preference_batch_size, lr=a.preference_lr,
        beta=a.preference_beta, sft_weight=a.preference_sft_weight, seed=a.seed,
        on_step=lambda s, m: log.info("preference step %d/%d: DPO loss %.4f, reward accuracy %.2f", s,
                                      a.preference_steps, m["loss"], m["accuracy"]) if s % 10 == 0 else None)
    metrics["seconds"] = time.perf_counter() - t0
    tok = DataTokenizer(loaded.tokenizer, ExperimentConfig(data={"max_length": a.max_length}))
    loss_examples = tok(load_source("builtin:benign", "eval", 64, a.seed + 1_000_003))
    log.info("evaluating the supervised and the preference-aligned model")
    sets = _eval_sets(cfg)
    report = {
        # the supervised model (B = 0) scored again here, so both columns use this code's judge
        "base": supervised["base"],
        "supervised": evaluate_alignment(loaded, peft_model, slot, trainer.loss, theta0, sets, loss_examples),
        "aligned": evaluate_alignment(loaded, peft_model, slot, trainer.loss, adapter, sets, loss_examples),
        "train": {**supervised["train"], "preference": metrics},
        "config": a.model_dump(), "base_model": supervised["base_model"], "precision": supervised["precision"],
    }
    merged = _merge_into_base(Path(loaded.path), adapter, lora_scaling(a.alpha, a.r))
    return _publish(Path(loaded.path), merged, report, out, t0)
