"""Split learning (fedguard.split): bytes, decode speed, training throughput and the parallel modes, one run.

Everything is measured in the same process on one resident model (fp32 by default, LoRA r 8 on q/v, no noise), and each
number is printed as a ratio against a baseline measured in the same run:

1. bytes per training step (forward + backward messages, as the in-process transport counts them) with
   counts-only masks vs the naive protocol: the same messages re-serialised with the full 4-D ``[B,1,T,T]``
   additive mask (model dtype) and ``[B,T]`` int64 position ids instead of the counts, in the forward request
   (FL-GLM's client message) and, "echoed", in the forward reply too (FedSEA's released prefill);
2. bytes per decode step: KV collaboration (``decode``: one ``[B,1,H]`` each way) vs re-feeding the whole
   sequence every step (an evaluation ``forward`` with ``[B,T+t,H]`` each way), measured; a re-feed that also
   sends the 4-D mask and positions (as FL-GLM does) is added from the formula;
3. greedy decode tokens/s, KV-cache collaborative decoding (``collaborative_greedy``) vs re-feeding the whole
   sequence each step, both through the in-process transport, batch 1, at 128- and 512-token prompts; end to
   end (prefill included) and per decode step (the time after the first token); target >= 8x;
4. split training throughput (examples/s over steps on the same batch) vs unsplit training of the same LoRA
   model: fedguard's ``CompletionLoss``, AdamW, gradient clipping at ``train.max_grad_norm``, one process;
5. the parallel modes, batch_parallel and hierarchical (averaging every step), with 2, 4 and 8 clients vs
   sequential with the same clients: wall time per round (every client one step on its own copy of one
   batch), B's forward passes and rows, server forward seconds per client-step, optimizer steps, messages.
   All parties share this machine's cores and one compute lock, so concurrency cannot shorten a round here;
   what batch_parallel can gain is one larger batched forward/backward of B instead of N small ones;
6. (``--grpc``) the decode comparison of 3 over the gRPC transport on localhost with mutual TLS.

    .venv/bin/python benchmarks/bench_split.py                                   # a 4-layer tiny LLaMA
    .venv/bin/python benchmarks/bench_split.py --model smollm2-135m-instruct --grpc
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common  # puts src/ on the path, sets the cache
import torch

TINY = "tiny4"  # a 4-layer tiny LLaMA built here (the registry's tiny-llama has 2 layers: too few to split)


# -- set-up -------------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_config(path: str, args, mode: str = "sequential"):
    from fedguard.config import build_config

    return build_config({
        "name": "bench-split", "seed": 0,
        "model": {"name_or_path": path, "precision": args.precision},
        "lora": {"r": 8, "alpha": 16},
        "train": {"batch_size": args.batch, "lr": 1e-4, "max_grad_norm": 1.0},
        "split": {"k_a": args.k_a, "k_c": args.k_c, "mode": mode, "steps": 100_000, "eval_examples": 0,
                  "average_every": 1, "barrier_timeout": 600},
    })


def build(cfg, loaded, peft_model, ids, *, record=False):
    from fedguard.split.train import build_split_system

    system = build_split_system(cfg, loaded, peft_model, client_ids=list(ids), record=record)
    for c in system.clients:
        c.hello()
    return system


def release(system) -> None:
    """Put the model's own LoRA parameters back (the next system's banks take them as their originals)."""
    for bank in (*system.banks, system.server.lora):
        bank.restore()


def collate(examples, pad_id):
    from fedguard.split.client import collate_with_counts

    return collate_with_counts(examples, pad_id)


def median_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def fmt_bytes(n: float) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def kind_bytes(before: dict, after: dict, kinds) -> dict[str, int]:
    return {d: sum(after.get(k, {}).get(d, 0) - before.get(k, {}).get(d, 0) for k in kinds) for d in ("up", "down")}


# -- 1. bytes per training step -----------------------------------------------------------------------------

def naive_extras(hidden: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The 4-D additive causal + padding mask ``[B,1,T,T]`` (as transformers builds it for eager attention) and
    the position ids ``[B,T]`` a naive split would send with ``hidden``."""
    from fedguard.model.blocks import padding_mask_from_counts

    batch, length = hidden.shape[:2]
    valid = padding_mask_from_counts(counts, length, batch)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    mask = torch.zeros(batch, 1, length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"attention_mask": mask, "position_ids": torch.arange(length).expand(batch, length).contiguous()}


def training_bytes(system, batch, counts, step: int, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """One training step through a recording transport; its bytes per kind and direction, and the same
    messages re-serialised the naive way."""
    from fedguard.split.messages import encode_message

    tr = system.transport
    tr.record = True
    tr.clear_records()
    client = system.clients[0]
    before = tr.bytes_of(client.id)
    client.train_step(batch, counts, step)
    after = tr.bytes_of(client.id)
    measured = {k: kind_bytes(before, after, [k]) for k in ("forward", "backward")}
    fwd_req = next(r for r in tr.received if r.kind == "forward")
    fwd_rep = next(r for r in tr.replies if r.kind == "forward")
    bwd_req = next(r for r in tr.received if r.kind == "backward")
    bwd_rep = next(r for r in tr.replies if r.kind == "backward")
    extras = naive_extras(fwd_req.tensors["hidden"], fwd_req.tensors["counts"], dtype)
    naive_req = len(encode_message({"hidden": fwd_req.tensors["hidden"], **extras}, fwd_req.meta))
    echoed_rep = len(encode_message({**fwd_rep.tensors, **extras}, {"meta": fwd_rep.meta}))
    check = {"forward": {"up": fwd_req.nbytes, "down": fwd_rep.nbytes},
             "backward": {"up": bwd_req.nbytes, "down": bwd_rep.nbytes}}
    assert check == measured, (check, measured)
    tr.record = False
    tr.clear_records()
    return {
        "counts-only (fedguard, measured)": measured,
        "naive: + 4-D mask, positions up": {"forward": {"up": naive_req, "down": fwd_rep.nbytes},
                                            "backward": measured["backward"]},
        "naive, echoed: + mask, positions both ways": {"forward": {"up": naive_req, "down": echoed_rep},
                                                       "backward": measured["backward"]},
    }


def print_training_bytes(rows, batch, length, hidden, dtype, max_pos) -> None:
    print(f"\n[1] bytes per training step (B={batch}, T={length}, H={hidden}, wire fp32, mask "
          f"{str(dtype).removeprefix('torch.')})")
    print(f"{'protocol':46s} {'fwd up':>11s} {'fwd down':>11s} {'bwd up':>11s} {'bwd down':>11s} "
          f"{'total':>11s} {'vs counts-only':>15s}")
    base = None
    for name, b in rows.items():
        total = sum(v for k in b.values() for v in k.values())
        base = base or total
        print(f"{name:46s} {fmt_bytes(b['forward']['up']):>11s} {fmt_bytes(b['forward']['down']):>11s} "
              f"{fmt_bytes(b['backward']['up']):>11s} {fmt_bytes(b['backward']['down']):>11s} {fmt_bytes(total):>11s} "
              f"{total / base:14.2f}x")
    itemsize = torch.empty((), dtype=dtype).element_size()
    print(f"    for scale (formula): a mask of max_position_embeddings^2 per sample, as transformers 4.38 builds "
          f"it and FedSEA's code sends, would be {fmt_bytes(batch * max_pos**2 * itemsize)} per forward "
          f"message here ({max_pos}^2 x {itemsize} B x {batch})")


# -- 2 + 3. decoding ----------------------------------------------------------------------------------------

@torch.no_grad()
def refeed_greedy(client, input_ids: torch.Tensor, new_tokens: int):
    """Greedy decoding without caches (FL-GLM style): every step the client runs A over the whole sequence,
    sends it as an evaluation ``forward`` (hidden states + counts), the server runs B over all of it and the
    client runs C and takes the last position's token. Returns (tokens [B,n], seconds of each step)."""
    seam, tr = client.seam, client.transport
    seq, out, times = input_ids, [], []
    for _ in range(new_tokens):
        t = time.perf_counter()
        batch, length = seq.shape
        counts = torch.full((batch,), length, dtype=torch.long)
        with client.lock:
            client.activate(train=False)
            with client.autocast():
                h = seam.front(seq, counts)
        reply, _ = tr.call("forward", client.id, {"hidden": h.to(client.wire_dtype), "counts": counts},
                           {"step": 1, "train": False})
        h = client._reply_tensor("forward", reply, "hidden", (batch, length, client.hidden_size))
        with client.lock:
            client.activate(train=False)
            with client.autocast():
                nxt = seam.logits(seam.back(h, counts)[:, -1]).argmax(-1)
        out.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        times.append(time.perf_counter() - t)
    return torch.stack(out, dim=1), times


def decode_compare(client, prompt: torch.Tensor, new_tokens: int, kv_repeats: int, refeed_repeats: int) -> dict:
    """KV collaboration vs re-feed for one prompt [1, T] through ``client``'s transport: times and bytes."""
    from fedguard.split.generate import collaborative_greedy

    tr = client.transport

    def kv(n):
        return collaborative_greedy(client, prompt, max_new_tokens=n)

    kv(2)  # warm-up
    t_first, _ = median_time(lambda: kv(1), kv_repeats)
    before = tr.bytes_of(client.id)
    msgs_before = dict(tr.messages)
    t_kv, kv_tokens = median_time(lambda: kv(new_tokens), kv_repeats)
    after = tr.bytes_of(client.id)
    decode_msgs = tr.messages.get("decode", 0) - msgs_before.get("decode", 0)
    kv_step = kind_bytes(before, after, ["decode"])
    kv_prefill = kind_bytes(before, after, ["prefill"])
    kv_step = {d: v / decode_msgs for d, v in kv_step.items()}
    kv_prefill = {d: v / kv_repeats for d, v in kv_prefill.items()}

    refeed_greedy(client, prompt, 1)  # warm-up
    totals, firsts, rf_tokens, step_bytes = [], [], None, []
    for _ in range(refeed_repeats):
        step_before = []
        orig_call = tr.call

        def counting_call(kind, cid, tensors, meta, _orig=orig_call, _log=step_before):
            _log.append(tr.bytes_of(cid))
            return _orig(kind, cid, tensors, meta)

        tr.call = counting_call
        try:
            rf_tokens, times = refeed_greedy(client, prompt, new_tokens)
        finally:
            del tr.call
        totals.append(sum(times))
        firsts.append(times[0])
        step_before.append(tr.bytes_of(client.id))
        step_bytes = [kind_bytes(step_before[i], step_before[i + 1], ["forward"]) for i in range(len(step_before) - 1)]
    t_rf, t_rf_first = statistics.median(totals), statistics.median(firsts)
    later = step_bytes[1:]  # the steps after the first token (the first is the prefill's counterpart)
    rf_step = {d: statistics.fmean(b[d] for b in later) for d in ("up", "down")}
    hidden = client.hidden_size
    itemsize = torch.empty((), dtype=client.stream_dtype).element_size()
    length = prompt.shape[1]
    mean_len = statistics.fmean(range(length + 1, length + new_tokens))  # sequence lengths of steps 2..n
    mask_extra = 2 * (statistics.fmean((s * s * itemsize + s * 8) for s in range(length + 1, length + new_tokens)))
    return {
        "T": length, "n": new_tokens, "same_tokens": bool(torch.equal(kv_tokens, rf_tokens)),
        "agree": float((kv_tokens == rf_tokens).float().mean()),
        "t_kv": t_kv, "t_kv_first": t_first, "t_rf": t_rf, "t_rf_first": t_rf_first,
        "kv_step": kv_step, "kv_prefill": kv_prefill, "rf_step": rf_step, "rf_first": step_bytes[0],
        "rf_mask_step": sum(rf_step.values()) + mask_extra, "mean_len": mean_len, "hidden": hidden,
    }


def print_decode_bytes(results, label: str) -> None:
    print(f"\n[2] bytes per decode step{label} (batch 1; re-feed: mean over the steps after the first token)")
    print(f"{'prompt T':>8s} {'KV: decode up+down':>19s} {'re-feed: forward up+down':>25s} {'ratio':>8s} "
          f"{'re-feed + 4-D mask, pos.':>25s} {'ratio':>9s} {'prefill (KV) up+down':>21s}")
    for r in results:
        kv = sum(r["kv_step"].values())
        rf = sum(r["rf_step"].values())
        prefill = sum(r["kv_prefill"].values())
        print(f"{r['T']:8d} {fmt_bytes(kv):>19s} {fmt_bytes(rf):>25s} {rf / kv:7.1f}x "
              f"{fmt_bytes(r['rf_mask_step']):>25s} {r['rf_mask_step'] / kv:8.1f}x {fmt_bytes(prefill):>21s}")


def print_decode_speed(results, label: str, target: float = 8.0) -> None:
    n = results[0]["n"]
    print(f"\n[3] greedy decode tokens/s{label}: KV-cache collaboration vs re-feeding the whole sequence each step "
          f"(batch 1, {n} new tokens)")
    print(f"{'prompt T':>8s} {'re-feed tok/s':>14s} {'KV tok/s':>10s} {'speed-up':>9s} "
          f"{'re-feed s/step':>15s} {'KV s/step':>10s} {'per-step speed-up':>18s} {'same tokens':>12s}")
    for r in results:
        rf_tps, kv_tps = n / r["t_rf"], n / r["t_kv"]
        rf_step = (r["t_rf"] - r["t_rf_first"]) / (n - 1)
        kv_step = (r["t_kv"] - r["t_kv_first"]) / (n - 1)
        same = "yes" if r["same_tokens"] else f"{r['agree']:.0%}"
        print(f"{r['T']:8d} {rf_tps:14.1f} {kv_tps:10.1f} {kv_tps / rf_tps:8.1f}x {rf_step:15.4f} {kv_step:10.4f} "
              f"{rf_step / kv_step:17.1f}x {same:>12s}")
    met = all(r["t_rf"] / r["t_kv"] >= target for r in results)
    print(f"    target >= {target:g}x end to end (prefill included) at every prompt length: "
          f"{'met' if met else 'NOT met'}; per-step: time after the first token / (n - 1), the KV first token "
          f"timed alone (max_new_tokens=1)")


# -- 4. split vs unsplit training ---------------------------------------------------------------------------

def unsplit_steps(loaded, peft_model, slot, batch, steps: int, cfg) -> None:
    from fedguard.model.loss import CompletionLoss

    params = list(slot.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = CompletionLoss(loaded, peft_model)
    peft_model.train()
    for _ in range(steps):
        loss, n = loss_fn(batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)


def split_vs_unsplit(cfg, loaded, peft_model, slot, batch, counts, steps: int, repeats: int) -> dict:
    ex = batch.input_ids.shape[0] * steps
    times = {"unsplit": [], "split": []}
    system = build(cfg, loaded, peft_model, ["t0"])
    client, step = system.clients[0], 0
    try:
        for r in range(repeats + 1):  # the first pass of each is a warm-up
            release(system)
            t = time.perf_counter()
            unsplit_steps(loaded, peft_model, slot, batch, steps if r else 1, cfg)
            if r:
                times["unsplit"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(steps if r else 1):
                step += 1
                client.train_step(batch, counts, step)
            if r:
                times["split"].append(time.perf_counter() - t)
    finally:
        release(system)
    return {k: ex / statistics.median(v) for k, v in times.items()}


def print_training_speed(res, batch, length, steps) -> None:
    print(f"\n[4] training throughput (batch {batch} x {length} tokens, {steps} steps on the same batch, "
          f"median of the repeats)")
    print(f"{'method':58s} {'examples/s':>11s} {'vs unsplit':>11s}")
    print(f"{'unsplit: CompletionLoss + AdamW, one model':58s} {res['unsplit']:11.2f} {1.0:10.2f}x")
    print(f"{'split, sequential, in-process transport (1 client)':58s} {res['split']:11.2f} "
          f"{res['split'] / res['unsplit']:10.2f}x")


# -- 5. parallel modes --------------------------------------------------------------------------------------

class TimedLock:
    """The server's view of the shared compute lock: the same lock, plus the seconds the server held it
    (its forward, backward, optimizer steps and averaging; waiting for the lock is not counted)."""

    def __init__(self, lock):
        self.lock, self.seconds, self.depth, self.since = lock, 0.0, 0, 0.0

    def __enter__(self):
        self.lock.acquire()
        if self.depth == 0:
            self.since = time.perf_counter()
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            self.seconds += time.perf_counter() - self.since
        self.lock.release()


def one_round(system, pool, batch, counts, step: int) -> None:
    """Every client one training step: one after another as the recipe runs sequential and hierarchical, or
    one thread per client (batch_parallel)."""
    if pool is None:
        for c in system.clients:
            c.train_step(batch, counts, step)
    else:
        for f in [pool.submit(c.train_step, batch, counts, step) for c in system.clients]:
            f.result()


def scaling(path, args, loaded, peft_model, batch, counts) -> list[dict]:
    out = []
    for n in args.clients:
        for mode in ("sequential", "batch_parallel", "hierarchical"):
            cfg = make_config(path, args, mode)
            system = build(cfg, loaded, peft_model, [f"c{i}" for i in range(n)])
            server, tr = system.server, system.transport
            server.compute_lock = held = TimedLock(server.compute_lock)
            fwd = {"calls": 0, "rows": 0, "seconds": 0.0}
            orig_run = server._run

            def run(owner, x, c, *, train, cache=None, _orig=orig_run, _fwd=fwd):
                t = time.perf_counter()
                try:
                    return _orig(owner, x, c, train=train, cache=cache)
                finally:
                    _fwd["seconds"] += time.perf_counter() - t
                    _fwd["calls"] += 1
                    _fwd["rows"] += x.shape[0]

            server._run = run
            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="bench-split") \
                if mode == "batch_parallel" else None
            step = 1
            try:
                one_round(system, pool, batch, counts, step)  # warm-up
                for k in fwd:
                    fwd[k] = 0
                held.seconds = 0.0
                opt_before, msgs_before, bytes_before = server.steps_done, sum(tr.messages.values()), tr.bytes_of()
                times = []
                for _ in range(args.rounds):
                    step += 1
                    t = time.perf_counter()
                    one_round(system, pool, batch, counts, step)
                    times.append(time.perf_counter() - t)
                bytes_after = tr.bytes_of()
                out.append({
                    "clients": n, "mode": mode, "round_s": statistics.median(times),
                    "b_forwards": fwd["calls"] / args.rounds, "b_rows": fwd["rows"] / args.rounds,
                    "b_fwd_s_per_client_step": fwd["seconds"] / (args.rounds * n),
                    "server_s_per_client_step": held.seconds / (args.rounds * n),
                    "opt_steps": (server.steps_done - opt_before) / args.rounds,
                    "messages": (sum(tr.messages.values()) - msgs_before) / args.rounds,
                    "bytes": sum(kind_bytes(bytes_before, bytes_after, list(bytes_after)).values()) / args.rounds,
                })
            finally:
                if pool is not None:
                    pool.shutdown()
                release(system)
    return out


def print_scaling(rows, batch, length, rounds) -> None:
    print(f"\n[5] parallel modes: one round = every client one training step (batch {batch} x {length} tokens each), "
          f"median of {rounds} rounds after a warm-up")
    print(f"{'clients':>7s} {'mode':15s} {'s/round':>8s} {'vs sequential':>14s} {'server s/client-step':>21s} "
          f"{'vs seq.':>8s} {'B fwd/round':>12s} {'rows/B fwd':>11s} {'B opt steps':>12s} {'msgs/round':>11s} "
          f"{'bytes/round':>12s}")
    base = {}
    for r in rows:
        if r["mode"] == "sequential":
            base[r["clients"]] = r
        b = base[r["clients"]]
        print(f"{r['clients']:7d} {r['mode']:15s} {r['round_s']:8.2f} {r['round_s'] / b['round_s']:13.2f}x "
              f"{r['server_s_per_client_step']:21.4f} "
              f"{r['server_s_per_client_step'] / b['server_s_per_client_step']:7.2f}x "
              f"{r['b_forwards']:12.0f} {r['b_rows'] / max(r['b_forwards'], 1):11.0f} {r['opt_steps']:12.0f} "
              f"{r['messages']:11.0f} {fmt_bytes(r['bytes']):>12s}")
    print("    server s: the time the server held the compute lock (B's forward, backward, optimizer step, "
          "hierarchical averaging).\n    All parties run in this one process on the same cores and take turns on "
          "one compute lock, so no mode can overlap\n    computation here: round-time differences come from "
          "batching (batch_parallel runs B once on every client's rows)\n    and from per-mode bookkeeping "
          "(hierarchical: one B copy and optimizer per client, averaged every step).")


# -- 6. gRPC -------------------------------------------------------------------------------------------------

def grpc_client(system, cfg, loaded, workdir: Path):
    from fedguard.pki import make_client_cert, make_credentials
    from fedguard.split.client import SplitClient
    from fedguard.split.grpc_transport import GrpcTransport, serve

    creds = make_credentials(workdir / "pki", 0)
    cert, key = make_client_cert(creds, "grpc-0")
    limit = int(cfg.split.max_message_mb * 2**20) + 2**16
    srv = serve(system.server.handle, "127.0.0.1:0", server_cert=creds.server_cert, server_key=creds.server_key,
                client_ca=creds.ca_cert, max_message_bytes=limit, max_workers=4)
    tr = GrpcTransport(f"127.0.0.1:{srv.port}", root_cert=creds.ca_cert, client_cert=cert, client_key=key,
                       max_message_bytes=limit, timeout=600)
    tr.wait_ready()
    client = SplitClient("grpc-0", system.seam, tr, system.spec, cfg, banks=system.banks, autocast=loaded.autocast,
                         compute_lock=system.lock)
    client.hello()
    return client, srv, tr


# -- main ----------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=TINY, help=f"'{TINY}' (built here) or a model name / path")
    ap.add_argument("--k-a", type=int, default=None, help="client input blocks (default: 1 for tiny4, else 2)")
    ap.add_argument("--k-c", type=int, default=None, help="client output blocks (default: 1 for tiny4, else 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, default=4, help="training batch (items 1 and 4)")
    ap.add_argument("--seq", type=int, default=256, help="training tokens per example (items 1 and 4)")
    ap.add_argument("--steps", type=int, default=3, help="item 4: steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=3, help="item 4: timed repeats (median)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--kv-repeats", type=int, default=3)
    ap.add_argument("--refeed-repeats", type=int, default=2)
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--scale-batch", type=int, default=2, help="item 5: batch per client")
    ap.add_argument("--scale-seq", type=int, default=128, help="item 5: tokens per example")
    ap.add_argument("--rounds", type=int, default=2, help="item 5: timed rounds per mode (median)")
    ap.add_argument("--grpc", action="store_true", help="also the decode comparison over gRPC (localhost, mTLS)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["1", "2", "3", "4", "5"],
                    help="items to skip (2 and 3 share one measurement)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tiny = args.model == TINY
    args.k_a = args.k_a or (1 if tiny else 2)
    args.k_c = args.k_c or (1 if tiny else 2)

    from fedguard.alignment import load_start_model

    from fedguard.model import attach_lora

    with tempfile.TemporaryDirectory(prefix="bench-split-") as d:
        workdir = Path(d)
        path = args.model
        if tiny:
            from fedguard.model.tiny import build_tiny_llama

            path = str(workdir / "tiny4")
            build_tiny_llama(Path(path), layers=4)
        cfg = make_config(path, args)
        loaded = load_start_model(cfg.model)
        peft_model, slot = attach_lora(loaded.model, cfg.lora)
        config = loaded.model.config
        tok = loaded.tokenizer
        dtype = loaded.model.dtype
        print(f"bench_split {datetime.date.today().isoformat()}: model {args.model} ({config.num_hidden_layers} "
              f"layers, H={config.hidden_size}), {args.precision}, LoRA r 8 on q/v, k_a={args.k_a}, k_c={args.k_c} "
              f"(server blocks {args.k_a}..{config.num_hidden_layers - args.k_c - 1}); wire fp32, noise off")
        print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")

        train_ex = _common.long_examples(tok, args.batch, args.seq)
        batch, counts = collate(train_ex, tok.pad_token_id)
        longest = max(args.prompts)
        prompt_src = torch.tensor(_common.long_examples(tok, 1, longest, seed=1)[0].input_ids)[None]

        system = build(cfg, loaded, peft_model, ["c0"])
        if "1" not in args.skip:
            system.clients[0].train_step(batch, counts, 1)  # warm-up (and a first step for the optimizer)
            rows = training_bytes(system, batch, counts, 2, dtype)
            print_training_bytes(rows, args.batch, args.seq, config.hidden_size, dtype, config.max_position_embeddings)

        if not {"2", "3"} <= set(args.skip):
            results = [decode_compare(system.clients[0], prompt_src[:, :t], args.new_tokens, args.kv_repeats,
                                      args.refeed_repeats) for t in args.prompts]
            if "2" not in args.skip:
                print_decode_bytes(results, "")
            if "3" not in args.skip:
                print_decode_speed(results, "")

        if args.grpc:
            client, srv, tr = grpc_client(system, cfg, loaded, workdir)
            try:
                results = [decode_compare(client, prompt_src[:, :t], args.new_tokens, args.kv_repeats,
                                          args.refeed_repeats) for t in args.prompts]
            finally:
                tr.close()
                srv.stop()
            label = " over gRPC (localhost, mutual TLS; bytes: the serialised envelopes)"
            print_decode_bytes(results, label)
            print_decode_speed(results, label)
        release(system)

        if "4" not in args.skip:
            res = split_vs_unsplit(cfg, loaded, peft_model, slot, batch, counts, args.steps, args.repeats)
            print_training_speed(res, args.batch, args.seq, args.steps)

        if "5" not in args.skip:
            ex = _common.long_examples(tok, args.scale_batch, args.scale_seq, seed=2)
            b5, c5 = collate(ex, tok.pad_token_id)
            rows5 = scaling(path, args, loaded, peft_model, b5, c5)
            print_scaling(rows5, args.scale_batch, args.scale_seq, args.rounds)

    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
