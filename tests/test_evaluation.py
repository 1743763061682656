"""Evaluation inputs a user brings (benign checkable prompts), the numbers' noise, and the round-0 cache."""

import json

import pytest

from conftest import tiny_config


def test_rates_carry_wilson_intervals_and_runs_compare_on_the_same_prompts():
    from fedguard.evaluation.stats import format_rate, paired_refusals, rate_interval

    ev = {"refusal_rate": 93.75, "harmful_n": 48, "overrefusal_rate": 10.0}
    lo, hi = rate_interval(ev, "refusal_rate")
    assert 83 < lo < 84 and 97 < hi < 98
    assert format_rate(ev, "refusal_rate") == f"93.8 [{lo:.1f}, {hi:.1f}]"
    assert format_rate(ev, "overrefusal_rate") == "10.0"  # no prompt count: no interval is invented
    assert format_rate(ev, "exact_match") == "–"
    t = paired_refusals([1, 1, 1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1])
    assert (t["only_a"], t["only_b"]) == (6, 0) and t["p"] == pytest.approx(2 / 64)
    assert paired_refusals([1, 0], [1, 0, 1]) is None  # not the same prompts: no test


def test_benign_source_takes_a_users_file_with_answers(tmp_path):
    import csv

    from fedguard.data.federation import build_eval_data
    from fedguard.data.schema import DataError

    path = tmp_path / "qa.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer"])
        for i in range(12):
            w.writerow([f"What is {i} plus {i}?", str(2 * i)])
        w.writerow(["Tell me a story.", ""])  # no reference answer: not checkable, skipped
    cfg = tiny_config(eval={"benign_source": str(path), "benign_prompts": 5, "loss_examples": 0})
    data = build_eval_data(cfg, tokenizer=None)
    assert len(data.benign_prompts) == 5
    assert all(e.answer == str(2 * int(e.prompt_text.split()[2])) for e in data.benign_prompts)
    assert [e.prompt_text for e in build_eval_data(cfg, None).benign_prompts] == \
        [e.prompt_text for e in data.benign_prompts]  # seeded
    everything = tiny_config(eval={"benign_source": str(path), "benign_prompts": 0, "loss_examples": 0})
    assert build_eval_data(everything, None).benign_prompts == []  # 0 prompts: exact match off
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text('{"prompt": "Say hello."}\n')
    with pytest.raises(DataError, match="eval.benign_source.*reference answer"):
        build_eval_data(tiny_config(eval={"benign_source": str(prompts_only), "loss_examples": 0}), None)
    shipped = build_eval_data(tiny_config(eval={"benign_source": "builtin:benign-heldout", "benign_prompts": 0,
                                                "loss_examples": 0}), None)
    assert shipped.benign_prompts == []
    shipped = build_eval_data(tiny_config(eval={"benign_source": "builtin:benign-heldout", "benign_prompts": 20,
                                                "loss_examples": 0}), None)
    assert len(shipped.benign_prompts) == 20 and all(e.answer for e in shipped.benign_prompts)


def test_the_base_model_evaluation_is_cached_by_everything_it_depends_on(tiny_loaded, tmp_path, monkeypatch):
    """Runs of a sweep share the round-0 evaluation: reused only for the very same inputs, scored anew."""
    from fedguard.data.federation import build_eval_data
    from fedguard.evaluation.evaluator import Evaluator
    from fedguard.federated.client import LocalTrainer

    monkeypatch.setenv("FEDGUARD_CACHE", str(tmp_path))
    loaded, peft_model, slot = tiny_loaded
    cfg = tiny_config(eval={"harmful_prompts": 4, "overrefusal_prompts": 3, "benign_prompts": 2, "loss_examples": 2})
    theta0 = slot.read()
    trainer = LocalTrainer(loaded, peft_model, slot)
    evaluator = Evaluator(loaded, peft_model, slot, trainer.loss, build_eval_data(cfg, loaded.tokenizer), cfg.eval)
    first = evaluator.evaluate(theta0, cache=True)
    (entry,) = (tmp_path / "evals").iterdir()
    assert first["refusal_rate"] == evaluator.evaluate(theta0)["refusal_rate"]
    # A second evaluation of the same inputs reads the stored responses (and scores them again).
    stored = json.loads(entry.read_text())
    stored["harmful"] = ["I'm sorry, but I can't help with that."] * 4
    entry.write_text(json.dumps(stored))
    assert evaluator.evaluate(theta0, cache=True)["refusal_rate"] == 100.0
    # Another adapter, or other generation settings, is another entry: never a stale answer.
    other = {k: v + 0.01 if "lora_B" in k else v for k, v in theta0.items()}
    assert evaluator.evaluate(other, cache=True)["refusal_rate"] == evaluator.evaluate(other)["refusal_rate"]
    longer = Evaluator(loaded, peft_model, slot, trainer.loss, evaluator.data,
                       cfg.eval.model_copy(update={"max_new_tokens": 5}))
    longer.evaluate(theta0, cache=True)
    assert len(list((tmp_path / "evals").iterdir())) == 3
    # A damaged entry is recomputed, not trusted.
    entry.write_text('{"harmful": 1}')
    assert evaluator.evaluate(theta0, cache=True)["refusal_rate"] == first["refusal_rate"]
