"""`fedguard align`: build (or find) the safety-aligned starting model of a config and print its report.

The handler imports the alignment when it runs (a lazy import): `fedguard --help` never imports torch.
"""

from __future__ import annotations

import json

from fedguard.config import add_config_arguments, load_config
from fedguard.run_dir import console_log


def register(sub) -> None:
    al = sub.add_parser("align", help="build (or find) the safety-aligned starting model of a config and report it",
                        description="Fine-tune the base model on built-in harmful-request -> refusal pairs and benign "
                                    "data (model.align), merge it into the base weights and cache the folder; "
                                    "model.aligned: true makes runs start from it. Prints refusal on held-out harm "
                                    "categories and an independent harmful set, over-refusal on benign look-alikes, "
                                    "and benign utility, for the base and the aligned model.")
    add_config_arguments(al)
    al.set_defaults(handler=_align)


def _align(args) -> int:
    # lazy: alignment trains and evaluates on the model (torch, transformers)
    from fedguard.alignment.align import REPORT_FILE, ensure_aligned

    cfg = load_config(args.config, args.overrides)
    console_log()
    path = ensure_aligned(cfg.model)
    report = json.loads((path / REPORT_FILE).read_text(encoding="utf-8"))
    print(f"aligned model: {path}")
    stages = [s for s in ("base", "supervised", "aligned") if s in report]  # supervised: before a preference phase
    print(f"{'set':<28} " + " ".join(f"{s:>10}" for s in stages) + "   (n)")
    for name, base in report["base"].items():
        if isinstance(base, dict):
            key = "rate" if "rate" in base else "refusal_rate"
            print(f"{name:<28} " + " ".join(f"{report[s][name][key]:>9.1f}%" for s in stages) + f"   ({base['n']})")
        else:
            print(f"{name:<28} " + " ".join(f"{report[s][name]:>10.4f}" for s in stages))
    return 0
