"""The alignment's preference phase (DPO on refusal-vs-compliance and answer-vs-refusal pairs)."""

import json
import math

import pytest
import torch

from fedguard.alignment.preference import build_pairs, dpo_loss, reference_logprobs, train_preference


def test_dpo_loss_is_log2_at_the_reference_and_falls_as_the_margin_grows():
    zero = torch.zeros(3)
    loss, margin = dpo_loss(zero, zero, zero, zero, beta=0.1)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6) and torch.equal(margin, zero)
    # chosen up 5 nats, rejected down 5 nats against the reference: margin beta * 10 = 1
    loss, margin = dpo_loss(torch.tensor([-5.0]), torch.tensor([-20.0]), torch.tensor([-10.0]),
                            torch.tensor([-15.0]), beta=0.1)
    assert math.isclose(float(margin), 1.0, rel_tol=1e-6)
    assert math.isclose(float(loss), math.log1p(math.exp(-1.0)), rel_tol=1e-6)


def _tiny_trainer():
    from fedguard.config import LoraSettings, ModelConfig
    from fedguard.federated.client import LocalTrainer
    from fedguard.model import load_base_model
    from fedguard.model.lora import attach_lora

    loaded = load_base_model(ModelConfig(name_or_path="tiny-llama", precision="fp32"))
    peft_model, slot = attach_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0, init_seed=3,
                                                               target_modules=["q_proj", "v_proj"]))
    return LocalTrainer(loaded, peft_model, slot), slot


def _pairs(tokenizer, n=16):
    from fedguard.data.readers import load_source

    refusals = load_source("builtin:harmful-refusal", "train", n, 0)
    compliances = load_source("builtin:harmful-compliance", "train", 8 * n, 0)
    lookalikes = [e for e in load_source("builtin:benign", "train", 8 * n, 0) if e.domain == "safety_adjacent"][:n]
    return build_pairs(refusals, compliances, lookalikes, tokenizer, 256, 0), refusals, compliances


def test_pairs_prefer_refusals_to_compliance_with_the_same_task_and_answers_to_refusals():
    trainer, _ = _tiny_trainer()
    tok = trainer.loaded.tokenizer
    pairs, refusals, compliances = _pairs(tok)
    kinds = {p.kind for p in pairs}
    assert kinds == {"harmful", "lookalike"}
    for p in pairs:
        assert p.chosen.input_ids[: p.chosen.prompt_len] == p.rejected.input_ids[: p.rejected.prompt_len]
        assert p.chosen.input_ids != p.rejected.input_ids

    def completion(t):
        return tok.decode(t.input_ids[t.prompt_len:])

    # a harmful pair's rejected side is a compliance written for the chosen refusal's own task (the decoded
    # completions end with the template's end-of-turn token)
    harmful = [p for p in pairs if p.kind == "harmful"]
    assert harmful
    for p in harmful:
        groups = {e.group for e in refusals if completion(p.chosen).startswith(e.completion)}
        assert groups and any(completion(p.rejected).startswith(c.completion) for c in compliances if c.group in groups)
    # a look-alike's rejected side is one of the refusals
    lookalike = [p for p in pairs if p.kind == "lookalike"]
    assert lookalike and all(any(completion(p.rejected).startswith(e.completion) for e in refusals) for p in lookalike)


def test_dpo_raises_the_margin_on_its_pairs_and_the_reference_is_the_start():
    trainer, slot = _tiny_trainer()
    pairs, _, _ = _pairs(trainer.loaded.tokenizer)
    start = slot.read()
    before = reference_logprobs(trainer, pairs, 8)
    adapter, metrics = train_preference(trainer, start, pairs, steps=6, batch_size=4, lr=2e-2, beta=0.5,
                                        sft_weight=0.0, seed=0)
    used = pairs[: 6 * 4]
    slot.load(adapter)
    after = reference_logprobs(trainer, used, 8)
    margin_gain = (after[:, 0] - before[: len(used), 0]) - (after[:, 1] - before[: len(used), 1])
    assert float(margin_gain.mean()) > 0.5
    assert metrics["loss_first"] == metrics["loss_first"] and math.isclose(metrics["loss_first"], math.log(2), rel_tol=1e-3)
    assert metrics["pairs"]["harmful"] + metrics["pairs"]["lookalike"] == len(used)


def test_preference_stage_builds_on_the_cached_supervised_model(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGUARD_CACHE", str(tmp_path / "cache"))
    from fedguard.alignment.align import REPORT_FILE, ensure_aligned, load_start_model, supervised_only
    from fedguard.config import ModelConfig

    align = {"steps": 2, "batch_size": 4, "examples": 48, "eval_prompts": 4, "lr": 5e-2,
             "target_modules": ["q_proj", "v_proj"]}
    cfg = ModelConfig(name_or_path="tiny-llama", precision="fp32", aligned=True,
                      align={**align, "preference_steps": 3, "preference_batch_size": 4, "preference_lr": 5e-2})
    sft_cfg = supervised_only(cfg)
    # the supervised stage's key ignores preference settings: the same folder as an align config without them
    plain = ModelConfig(name_or_path="tiny-llama", precision="fp32", aligned=True, align=align)
    path = ensure_aligned(cfg)
    sft = ensure_aligned(sft_cfg)
    assert sft == ensure_aligned(plain) and sft != path
    report = json.loads((path / REPORT_FILE).read_text())
    assert set(report) >= {"base", "supervised", "aligned"} and report["train"]["preference"]["steps"] == 3
    # B = 0 is the supervised model: scored again, it gives the supervised stage's own answers (the loss to
    # rounding: the zero LoRA branch is still computed)
    again, own = report["supervised"], json.loads((sft / REPORT_FILE).read_text())["aligned"]
    assert again["benign_heldout_loss"] == pytest.approx(own.pop("benign_heldout_loss"), rel=1e-6)
    assert {k: v for k, v in again.items() if k != "benign_heldout_loss"} == own
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    a, b = load_start_model(cfg), load_start_model(sft_cfg)
    assert (a.model(input_ids=ids).logits - b.model(input_ids=ids).logits).abs().max() > 1e-5
