"""The split-learning recipe: ``train_split(cfg)`` runs FedSEA-style split training of every client in process.

A plain function: load the base model once, attach LoRA (``lora`` section; θ₀ from ``lora.init_seed``), cut
it at ``split.k_a`` / ``split.k_c`` (``BlockSeam``), build one ``SplitServer`` and ``federation.num_clients``
``SplitClient`` s on that one resident model, connected by an ``InProcessTransport`` (every message goes
through bytes and is metered), build each client's data with fedguard's pipeline (``build_client_data``:
chat template, completion-only targets, the ``data`` section's partition), say hello, and train
``split.steps`` steps per client with batches of ``train.batch_size`` (each client walks through its own
seeded permutations of its examples):

* ``sequential``: client 0 runs all its steps, then client 1, ... (FedSEA's released code);
* ``hierarchical``: round-robin, step 1 of every client, then step 2, ... (the server's per-client copies of
  B are averaged every ``split.average_every`` steps and once at the end);
* ``batch_parallel``: one thread per client; the server's handler joins them per step.

``split.aggregate_clients`` (simulated in process; in a deployment the clients would exchange their parts
through an aggregator): the exact weighted mean of the clients' own LoRA products,
``ΔW = Σ_i p_i · s · B_i A_i`` per module of A and C (``p_i`` ∝ each client's number of training examples,
``s = alpha / r``), merged into those layers' base weights (FedSEA's "AggregatedAvg": merge-then-average), after
which every client restarts from a fresh LoRA (A from a seed, B = 0) and fresh AdamW moments in those parts
(FLoRA-style), every ``split.aggregate_every`` steps or only at the end (0). Separate averaging of A and B is
never used for the clients' parts.

Each client measures its held-out loss (``split.eval_examples`` examples of the ``data`` source's eval split,
through the server, no noise) before and after training; with ``split.evaluate`` each client's model (once,
after aggregation) gets fedguard's safety and utility evaluation after training (``eval`` section: refusal on
harmful prompts, over-refusal, exact match), every answer decoded through the server.

The run folder (``--run-dir`` or ``OUTPUT_DIR/NAME-split-TIMESTAMP``):

* ``config.yaml``: the resolved config;
* ``metrics.ndjson``: one line per training step (client, step, loss, lr, tokens, mean|h_A|, mean|noise|,
  σ, gradient norms per part, seconds, and the bytes of that step's messages per kind and direction) and one
  per aggregation / evaluation event; each line is flushed and fsynced;
* ``final_metrics.json`` (written atomically, last): totals (bytes per kind, messages, losses, eval losses,
  noise, seconds, server optimizer steps);
* ``adapters/`` (staged and moved into place whole): ``server.safetensors`` (B's LoRA, PEFT keys of the
  middle layers), ``client-<id>.safetensors`` (each client's LoRA of A and C), with aggregation
  ``client-parts-delta.safetensors`` (ΔW merged into the client layers, keyed by base weight name:
  ``W = W_base + ΔW``), and ``adapters.json`` describing them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedguard.alignment import load_start_model
from fedguard.config import ConfigError, ExperimentConfig
from fedguard.data.federation import build_client_data, heldout_loss_examples
from fedguard.data.tokenize import Batch, TokenizedExample
from fedguard.io import NdjsonWriter, atomic_write_json, atomic_write_text, load_tensors, publish_dir, save_tensors
from fedguard.model import attach_lora
from fedguard.model.blocks import BlockSeam
from fedguard.model.keys import a_key, b_key, base_layer_key
from fedguard.model.loading import LoadedModel
from fedguard.model.lora import initial_adapter_state
from fedguard.privacy.canaries import audited_client
from fedguard.run_dir import CONFIG_FILE, FINAL_METRICS_FILE, METRICS_FILE, RunLog, new_run_dir
from fedguard.seeding import derive_seed, numpy_rng
from fedguard.split.client import SplitClient, collate_with_counts, count_batches
from fedguard.split.generate import evaluate_client
from fedguard.split.messages import split_spec
from fedguard.split.params import PartLora
from fedguard.split.server import GLOBAL, SplitServer
from fedguard.split.transport import InProcessTransport

log = logging.getLogger("fedguard")

__all__ = ["SplitRun", "SplitSystem", "aggregate_client_parts", "build_split_system", "check_adapters_manifest",
           "check_split_config", "evaluate_and_log", "load_client_parts", "load_split_adapters", "metered_step",
           "need_adapter_file",
           "prepare_run_dir", "train_split"]

ADAPTERS_DIR = "adapters"
DELTA_FILE = "client-parts-delta.safetensors"


@dataclass
class SplitSystem:
    """One resident model cut into a server and clients, wired by an in-process transport."""

    loaded: LoadedModel
    peft_model: Any
    seam: BlockSeam
    spec: dict[str, Any]
    server: SplitServer
    transport: InProcessTransport
    clients: list[SplitClient]
    banks: tuple[PartLora, PartLora]
    lock: threading.RLock


@dataclass
class SplitRun:
    run_dir: Path
    final_metrics: dict[str, Any]


def check_split_config(cfg: ExperimentConfig, num_layers: int | None = None) -> None:
    """What split learning needs beyond the section's own validation; ``ConfigError`` naming the field."""
    s = cfg.split
    if num_layers is not None and s.k_a + s.k_c >= num_layers:
        raise ConfigError(f"split.k_a + split.k_c must be < the model's {num_layers} decoder layers so the server "
                          f"holds at least one block; got split.k_a={s.k_a}, split.k_c={s.k_c}")
    if cfg.lora.variant != "standard":
        raise ConfigError(f"split learning needs lora.variant 'standard' (got '{cfg.lora.variant}')")
    tied = sorted(set(cfg.lora.target_modules) & {"embed_tokens", "lm_head"})
    if tied:
        raise ConfigError(f"lora.target_modules: {tied} not supported in split learning (the head shares the tied "
                          "embedding weight, and the seam applies LoRA to decoder blocks only)")


def build_split_system(cfg: ExperimentConfig, loaded: LoadedModel, peft_model=None, *,
                       client_ids: Sequence[str] | None = None, weights: Sequence[float] | None = None,
                       record: bool = False) -> SplitSystem:
    """Server, transport and clients on ``loaded``'s model (LoRA attached here unless ``peft_model`` is given;
    every client and the server start from the model's current LoRA values)."""
    check_split_config(cfg)
    if peft_model is None:
        peft_model, _ = attach_lora(loaded.model, cfg.lora)
    try:
        seam = BlockSeam(peft_model, cfg.split.k_a, cfg.split.k_c)
    except ValueError as exc:
        raise ConfigError(f"split: {exc}".replace("k_a", "split.k_a").replace("k_c", "split.k_c")) from None
    config = seam.config
    spec = split_spec(loaded.fingerprint(), config.num_hidden_layers, config.hidden_size, cfg.split.k_a,
                      cfg.split.k_c, cfg.split.wire_dtype, cfg.lora)
    lock = threading.RLock()
    server = SplitServer(seam, spec, cfg, autocast=loaded.autocast, compute_lock=lock)
    transport = InProcessTransport(server, max_message_bytes=int(cfg.split.max_message_mb * 2 ** 20), record=record)
    banks = (PartLora(peft_model, [seam.front]), PartLora(peft_model, [seam.back]))
    ids = [str(i) for i in range(cfg.federation.num_clients)] if client_ids is None else [str(c) for c in client_ids]
    weights = list(weights) if weights is not None else [1.0] * len(ids)
    clients = [SplitClient(cid, seam, transport, spec, cfg, banks=banks, autocast=loaded.autocast,
                           compute_lock=lock, weight=w) for cid, w in zip(ids, weights)]
    return SplitSystem(loaded, peft_model, seam, spec, server, transport, clients, banks, lock)


@torch.no_grad()
def aggregate_client_parts(clients: Sequence[SplitClient], reinit_seed: int) -> dict[str, torch.Tensor]:
    """Exact aggregation of the clients' own parts (A and C), simulated in process: per LoRA module the weighted
    mean of ``s · B_i A_i`` (float64; weights = the clients' ``weight``), merged into the base weights of those
    layers (shared by every simulated client on the resident model); then each client's LoRA of A and C
    restarts from a fresh adapter (A from ``reinit_seed``, B = 0) with fresh AdamW moments. Returns the merged
    ``{module: ΔW}`` (float64)."""
    banks = clients[0].banks
    if any(c.banks is not banks for c in clients):
        raise ValueError("aggregate_client_parts: the clients must share one resident model's banks")
    total = sum(c.weight for c in clients)
    deltas: dict[str, torch.Tensor] = {}
    for bank in banks:
        states = [bank.state(c.id) for c in clients]
        part: dict[str, torch.Tensor] = {}
        for m in bank.modules():
            s = bank.scaling(m)
            part[m] = sum((c.weight / total) * s * (st[b_key(m)].double() @ st[a_key(m)].double())
                          for c, st in zip(clients, states))
        bank.merge_into_base(part)
        fresh = initial_adapter_state({k: tuple(t.shape) for k, t in states[0].items()}, reinit_seed)
        for c in clients:
            bank.load(c.id, fresh)
        deltas.update(part)
    for c in clients:
        c.reset_optimizers()
    return deltas


class BatchStream:
    """A client's batches: its examples in a seeded permutation per pass, ``batch_size`` at a time."""

    def __init__(self, examples: list[TokenizedExample], batch_size: int, pad_id: int, seed: int, client_id: str):
        self.examples, self.size, self.pad_id = examples, min(batch_size, len(examples)), pad_id
        self.seed, self.client_id = seed, client_id
        self.order: list[int] = []
        self.passes = 0

    def next(self) -> tuple[Batch, torch.Tensor]:
        if len(self.order) < self.size:
            self.order += numpy_rng(self.seed, "split-batches", self.client_id, self.passes).permutation(
                len(self.examples)).tolist()
            self.passes += 1
        idx, self.order = self.order[:self.size], self.order[self.size:]
        return collate_with_counts([self.examples[i] for i in idx], self.pad_id)


def eval_examples(cfg: ExperimentConfig, tokenizer) -> list[TokenizedExample]:
    """The ``split.eval_examples`` held-out examples each client measures its loss on."""
    return heldout_loss_examples(cfg, tokenizer, cfg.split.eval_examples, "split-eval", "split eval set")


def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path | None, kind: str, *, marker: str = FINAL_METRICS_FILE,
                    what: str = "a finished split run") -> Path:
    """The run folder (``run_dir``, or a fresh ``OUTPUT_DIR/NAME-KIND-TIMESTAMP``) with the resolved
    ``config.yaml`` and an empty ``metrics.ndjson``; refuses a folder that holds ``marker`` (``what``)."""
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg, kind)
    if (run_dir / marker).exists():
        raise ConfigError(f"{run_dir} already holds {what}; pass another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())
    atomic_write_text(run_dir / METRICS_FILE, "")
    return run_dir


def train_split(cfg: ExperimentConfig, run_dir: Path | None = None, *, quiet: bool = False,
                loaded: LoadedModel | None = None) -> SplitRun:
    """Run split training as configured and write the run folder (see the module docstring)."""
    if loaded is None:
        loaded = load_start_model(cfg.model)
    check_split_config(cfg, loaded.model.config.num_hidden_layers)  # before anything is written
    run_dir = prepare_run_dir(cfg, run_dir, "split")
    run_log = RunLog(run_dir, console_output=not quiet)
    try:
        return _train(cfg, run_dir, loaded)
    finally:
        run_log.close()


def _train(cfg: ExperimentConfig, run_dir: Path, loaded: LoadedModel) -> SplitRun:
    t0 = time.perf_counter()
    s = cfg.split
    data = build_client_data(cfg, loaded.tokenizer, audited_client(cfg))
    system = build_split_system(cfg, loaded, weights=[float(len(d)) for d in data])
    pad_id = loaded.tokenizer.pad_token_id
    log.info("split learning: %s, k_a=%d, k_c=%d (server blocks %s), %d clients x %d steps, noise %s",
             s.mode, s.k_a, s.k_c, list(system.seam.middle.layers), len(data), s.steps,
             "off" if s.noise.mode == "off" else f"{s.noise.mode} {s.noise.scale:g}")
    clients = system.clients
    for c in clients:
        c.hello()
    streams = {c.id: BatchStream(d.examples, cfg.train.batch_size, pad_id, cfg.seed, c.id) for c, d in zip(clients, data)}
    writer = NdjsonWriter(run_dir / METRICS_FILE)
    write_lock = threading.Lock()
    eval_batches = count_batches(eval_examples(cfg, loaded.tokenizer), pad_id, cfg.eval.batch_size)
    per_client: dict[str, dict[str, Any]] = {c.id: {"losses": [], "examples": len(d)} for c, d in zip(clients, data)}

    def evaluate(when: str) -> None:
        if not eval_batches:
            return
        for c in clients:
            loss = c.evaluate(eval_batches)
            per_client[c.id][f"eval_loss_{when}"] = loss
            writer.append({"event": "eval", "when": when, "client": c.id, "eval_loss": loss})
        log.info("held-out loss %s training: %s", when,
                 ", ".join(f"client {c.id} {per_client[c.id][f'eval_loss_{when}']:.4f}" for c in clients))

    def one_step(c: SplitClient, step: int) -> None:
        record = metered_step(c, system.transport, streams[c.id], step)
        with write_lock:
            writer.append(record)
            per_client[c.id]["losses"].append(record["loss"])

    evaluate("before")
    # before training every client holds the same model: one evaluation is the baseline of all
    baseline = evaluate_and_log(cfg, loaded, clients[0], writer, "before") if s.evaluate else None
    aggregations, merged = _run_schedule(cfg, clients, one_step, writer)
    server_state = system.server.adapter_state()  # hierarchical: the final average of the copies
    evaluate("after")
    # after aggregation every client holds the same A and C: one evaluation stands for all
    evaluation = {c.id: evaluate_and_log(cfg, loaded, c, writer, "after")
                  for c in (clients[:1] if s.aggregate_clients else clients)} if s.evaluate else {}

    adapters = _write_adapters(run_dir, cfg, system, server_state, merged)
    final = {**_final_metrics(cfg, system, per_client), "client_aggregations": aggregations,
             **({"evaluation_before": baseline, "evaluation": evaluation,
                 "evaluation_shared_by_all_clients": s.aggregate_clients} if evaluation else {}),
             "adapters": adapters, "seconds": time.perf_counter() - t0}
    atomic_write_json(run_dir / FINAL_METRICS_FILE, final)
    log.info("split run finished: loss %.4f -> %.4f, %d bytes over the wire, %s", final["loss_first"],
             final["loss_last"], final["bytes_total"], run_dir)
    return SplitRun(run_dir, final)


def metered_step(client: SplitClient, transport, stream: BatchStream, step: int) -> dict[str, Any]:
    """One training step of ``client`` on its stream's next batch: the ``metrics.ndjson`` record (the step's
    metrics, its lr, and the bytes of its messages per kind and direction), also logged every 10 steps."""
    before = transport.bytes_of(client.id)
    batch, counts = stream.next()
    m = client.train_step(batch, counts, step)
    after = transport.bytes_of(client.id)
    sent = {k: {d: after[k][d] - before.get(k, {}).get(d, 0) for d in ("up", "down")} for k in after}
    steps = client.split.steps
    if step == 1 or step == steps or step % 10 == 0:
        log.info("client %s step %d/%d: loss %.4f, mean|h_A| %.4g, mean|noise| %.4g, %.2f s", client.id, step, steps,
                 m["loss"], m["mean_abs_h"], m["mean_abs_noise"], m["seconds"])
    return {"client": client.id, "step": step, "lr": client._lr(step), **m,
            "bytes": {k: v for k, v in sent.items() if v["up"] or v["down"]}}


def _run_schedule(cfg: ExperimentConfig, clients: Sequence[SplitClient], one_step, writer: NdjsonWriter
                  ) -> tuple[int, dict[str, torch.Tensor] | None]:
    """``split.steps`` steps of every client in ``split.mode``'s order, in blocks of ``split.aggregate_every``
    steps with the clients' parts aggregated after each block (when configured); returns the number of
    aggregations and the summed merged ΔW."""
    s = cfg.split
    every = s.aggregate_every if s.aggregate_clients and s.aggregate_every else s.steps
    aggregations, merged = 0, None
    for start in range(1, s.steps + 1, every):
        steps = range(start, min(start + every, s.steps + 1))
        if s.mode == "sequential":
            for c in clients:
                for step in steps:
                    one_step(c, step)
        elif s.mode == "hierarchical":
            for step in steps:
                for c in clients:
                    one_step(c, step)
        else:  # batch_parallel: one thread per client, joined per step by the server
            with ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="split-client") as pool:
                futures = [pool.submit(lambda c=c, steps=steps: [one_step(c, step) for step in steps])
                           for c in clients]
                for f in futures:
                    f.result()
        if s.aggregate_clients:
            aggregations += 1
            delta = aggregate_client_parts(clients, derive_seed(cfg.lora.init_seed, "split-aggregate", aggregations))
            merged = delta if merged is None else {m: merged[m] + delta[m] for m in merged}
            writer.append({"event": "aggregate", "after_step": steps[-1], "modules": len(delta)})
            log.info("aggregated the clients' own parts after step %d (exact mean of B·A, %d modules)",
                     steps[-1], len(delta))
    return aggregations, merged


def _final_metrics(cfg: ExperimentConfig, system: SplitSystem, per_client: dict[str, dict[str, Any]]
                   ) -> dict[str, Any]:
    s = cfg.split
    bytes_total = system.transport.bytes_of()
    trained = [v for v in per_client.values() if v["losses"]]
    return {
        "mode": s.mode, "k_a": s.k_a, "k_c": s.k_c, "server_layers": list(system.seam.middle.layers),
        "clients": len(system.clients), "steps_per_client": s.steps,
        "client_steps": sum(len(v["losses"]) for v in trained),
        "server_optimizer_steps": system.server.steps_done,
        "noise": {"mode": s.noise.mode, "scale": s.noise.scale},
        "grad_noise": {"clip": s.grad_noise.clip, "std": s.grad_noise.std},
        "loss_first": _mean([v["losses"][0] for v in trained]),
        "loss_last": _mean([v["losses"][-1] for v in trained]),
        "per_client": {cid: {"examples": v["examples"], "loss_first": v["losses"][0], "loss_last": v["losses"][-1],
                             **{k: v[k] for k in ("eval_loss_before", "eval_loss_after") if k in v}}
                       for cid, v in per_client.items()},
        "bytes": bytes_total,
        "bytes_total": sum(d["up"] + d["down"] for d in bytes_total.values()),
        "messages": dict(system.transport.messages),
    }


def evaluate_and_log(cfg: ExperimentConfig, loaded: LoadedModel, client: SplitClient, writer: NdjsonWriter,
                     when: str) -> dict[str, Any]:
    """``split.evaluate``: the safety and utility evaluation of ``client``'s model through its server, logged and
    appended to ``metrics.ndjson`` (rates only; the full result, with samples, goes to ``final_metrics.json``)."""
    result = evaluate_client(cfg, loaded, client)
    rates = {k: v for k, v in result.items() if k.endswith(("_rate", "_match", "_n")) or k == "eval_seconds"}
    writer.append({"event": "evaluation", "when": when, "client": client.id, **rates})
    log.info("client %s evaluation %s training: %s", client.id, when, ", ".join(
        f"{k} {v:.1f}" for k, v in rates.items() if isinstance(v, float) and k != "eval_seconds"))
    return result


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


SERVER_FILE_NOTE = "the server's LoRA of the middle blocks"


def client_file_note(client_id: str) -> str:
    return f"client {client_id}'s LoRA of its input and output blocks"


def adapters_manifest(cfg: ExperimentConfig, holder, files: dict[str, str], **extra) -> dict[str, Any]:
    """``adapters.json``: what the files are and what they fit (``holder``: anything with ``loaded`` and
    ``seam``, a ``SplitSystem`` or a process's role)."""
    return {"base_model": holder.loaded.fingerprint(), "k_a": cfg.split.k_a, "k_c": cfg.split.k_c,
            "server_layers": list(holder.seam.middle.layers), "lora": cfg.lora.model_dump(mode="json"),
            "files": files, **extra}


def publish_adapters(run_dir: Path, tensors: dict[str, dict[str, torch.Tensor]], manifest: dict[str, Any]) -> None:
    """``run_dir/adapters/``: ``tensors`` (file name -> state) and ``adapters.json``, staged and moved into place
    whole."""
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=f".{ADAPTERS_DIR}.", dir=run_dir))
    try:
        for name, state in tensors.items():
            save_tensors(staging / name, state)
        atomic_write_json(staging / "adapters.json", manifest)
        publish_dir(staging, run_dir / ADAPTERS_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_adapters(run_dir: Path, cfg: ExperimentConfig, system: SplitSystem, server_state, merged) -> list[str]:
    tensors, files = {"server.safetensors": server_state}, {"server.safetensors": SERVER_FILE_NOTE}
    for c in system.clients:
        name = f"client-{c.id}.safetensors"
        tensors[name], files[name] = c.adapter_state(), client_file_note(c.id)
    if merged is not None:
        tensors[DELTA_FILE] = {base_layer_key(m): d.float() for m, d in merged.items()}
        files[DELTA_FILE] = ("the exact mean of the clients' ΔW merged into the client blocks: "
                             "W = W_base + ΔW (the client LoRA files then hold what was trained after it)")
    publish_adapters(run_dir, tensors, adapters_manifest(cfg, system, files))
    return sorted(files)


def check_adapters_manifest(cfg: ExperimentConfig, adapters_dir: Path) -> None:
    """A finished run's ``adapters.json`` must name this config's partition points (when it is there)."""
    import json

    manifest = Path(adapters_dir) / "adapters.json"
    if manifest.is_file():
        made = json.loads(manifest.read_text(encoding="utf-8"))
        for name in ("k_a", "k_c"):
            if made.get(name) != getattr(cfg.split, name):
                raise ConfigError(f"{adapters_dir} was trained with split.{name}={made.get(name)}, the config has "
                                  f"split.{name}={getattr(cfg.split, name)}")


def need_adapter_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a finished `fedguard split train` run's adapters folder?)")
    return path


def load_client_parts(banks: Sequence[PartLora], client_id: str, adapters_dir: Path, owner: str) -> None:
    """``adapters_dir/client-<owner>.safetensors`` into ``client_id``'s LoRA of A and C in ``banks``, and the
    merged client delta into those layers' base weights if the run aggregated the clients' parts."""
    adapters_dir = Path(adapters_dir)
    state = load_tensors(need_adapter_file(adapters_dir / f"client-{owner}.safetensors"))
    for bank in banks:
        bank.load(str(client_id), {k: state[k] for k in bank.linears})
    delta_path = adapters_dir / DELTA_FILE
    if delta_path.is_file():
        delta = load_tensors(delta_path)
        suffix = ".base_layer.weight"
        for bank in banks:
            bank.merge_into_base({k[:-len(suffix)]: t for k, t in delta.items() if k[:-len(suffix)] in bank.layers})


def load_split_adapters(system: SplitSystem, adapters_dir: Path, client_id: str) -> None:
    """Load a finished run's adapters into ``system`` for generation: the server's LoRA, client ``client_id``'s
    LoRA of A and C, and the merged client delta if the run aggregated. Call before the clients' hello."""
    adapters_dir = Path(adapters_dir)
    check_adapters_manifest(system.server.cfg, adapters_dir)
    server = need_adapter_file(adapters_dir / "server.safetensors")
    need_adapter_file(adapters_dir / f"client-{client_id}.safetensors")  # both named before anything is loaded
    system.server.lora.load(GLOBAL, load_tensors(server))
    load_client_parts(system.banks, str(client_id), adapters_dir, str(client_id))
