"""Defense overhead on SmolLM2: the probe's share of round time (client level) and the shadow level's
round time relative to no defense, with the full shadow branch (T steps, as the official code) and
with a short one (``--shadow-steps``), measured in one run on the same clients and data.

    .venv/bin/python benchmarks/bench_defense_overhead.py --probe PROBE_DIR [--shadow-steps 2]
"""

from __future__ import annotations

import argparse
import time

import _common


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", required=True, help="a probe artifact for configs/default.yaml (fedguard probe build)")
    ap.add_argument("--shadow-steps", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()

    from fedguard.config import DefenseConfig, load_config
    from fedguard.data.federation import build_client_data
    from fedguard.defenses.defense import ProbeDefense
    from fedguard.defenses.probe import LoRAProbe
    from fedguard.federated.client import LocalTrainer
    from fedguard.messages import RoundConfig
    from fedguard.alignment import load_start_model
    from fedguard.model import attach_lora

    cfg = load_config(_common.REPO / "configs" / "default.yaml")
    loaded = load_start_model(cfg.model)
    peft_model, slot = attach_lora(loaded.model, cfg.lora)
    theta0 = slot.read()
    clients = build_client_data(cfg, loaded.tokenizer)[: args.clients]
    trainer = LocalTrainer(loaded, peft_model, slot)
    probe = LoRAProbe.load(args.probe)
    T = cfg.train.local_steps
    base = RoundConfig(server_round=1, lr=cfg.train.lr, local_steps=T, batch_size=cfg.train.batch_size,
                       grad_accum=1, seed=cfg.seed, max_grad_norm=1.0)
    trainer.train(theta0, RoundConfig(**{**base.to_dict(), "local_steps": 1}), clients[0])  # warm-up

    def round_time(level: str | None, shadow_steps: int | None = None) -> tuple[float, float]:
        defense = None if level is None else ProbeDefense(
            DefenseConfig(level=level, shadow_steps=shadow_steps), probe, theta0, T, cfg.train.batch_size, cfg.train.lr)
        t0 = time.perf_counter()
        updates = []
        for c in clients:
            extra = defense.client_requests(1, str(c.client_id)) if defense else {}
            rc = RoundConfig(**{**base.to_dict(), **extra})
            updates.append(trainer.train(theta0, rc, c, theta0=theta0))
        t1 = time.perf_counter()
        if defense is not None:
            defense.weigh(1, theta0, updates)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    none, _ = round_time(None)
    client, client_probe = round_time("client")
    shadow_full, _ = round_time("shadow", T)
    shadow_short, _ = round_time("shadow", args.shadow_steps)
    print(f"{args.clients} clients x {T} local steps, SmolLM2-135M, probe selection {probe.spec.selection}")
    print(f"no defense:                     {none:6.1f} s  1.00x")
    print(f"client level:                   {client:6.1f} s  {client / none:.2f}x  (probe {client_probe * 1000:.0f} ms "
          f"= {100 * client_probe / client:.2f}% of the round; target <= 2%)")
    print(f"shadow level, {T} shadow steps:   {shadow_full:6.1f} s  {shadow_full / none:.2f}x  (official code's cost)")
    print(f"shadow level, {args.shadow_steps} shadow steps:    {shadow_short:6.1f} s  {shadow_short / none:.2f}x  (target <= 1.3x)")


if __name__ == "__main__":
    main()
