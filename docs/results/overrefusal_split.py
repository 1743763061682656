"""Over-refusal of aligned models on the prompts a developer had read vs the ones nobody on the training side read.

The v3 alignment data's topic families were chosen after reading the v2 model's answers to the 48 over-refusal
prompts that `make run` samples (seed 2023). This splits `builtin:overrefusal` into those 48 and the other 96,
so the over-refusal drop can be judged on prompts that influenced nothing.

    FEDGUARD_CACHE=.cache/fedguard .venv/bin/python docs/results/overrefusal_split.py MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import sys

from fedguard.config import ModelConfig
from fedguard.data.prompts import load_prompts
from fedguard.data.tokenize import render_prompt
from fedguard.evaluation.generation import generate_batched
from fedguard.evaluation.refusal import is_refusal
from fedguard.evaluation.stats import wilson_interval
from fedguard.model import load_base_model

SEEN_SEED = 2023 + 1_000_003  # configs/default.yaml's seed, offset as in build_eval_data


def main(paths: list[str]) -> None:
    every = load_prompts("builtin:overrefusal", 0, 0, "benign")
    seen = {e.prompt_text for e in load_prompts("builtin:overrefusal", 48, SEEN_SEED, "benign")}
    for path in paths:
        loaded = load_base_model(ModelConfig(name_or_path=path))
        prompts = [render_prompt(loaded.tokenizer, e.prompt_messages, None) for e in every]
        responses = generate_batched(loaded, loaded.model, prompts, 32, 16)
        refused = [is_refusal(r, e.prompt_text) for e, r in zip(every, responses)]  # as runs score them
        for name, keep in (("read (48)", True), ("never read (96)", False)):
            flags = [f for e, f in zip(every, refused) if (e.prompt_text in seen) == keep]
            lo, hi = wilson_interval(sum(flags), len(flags))
            print(f"{path} · {name}: over-refusal {100 * sum(flags) / len(flags):.1f} % "
                  f"[{100 * lo:.1f}, {100 * hi:.1f}] of {len(flags)}")


if __name__ == "__main__":
    main(sys.argv[1:])
