"""Split learning across processes: one server process, client processes, gRPC over mutual TLS.

The same roles as in process (``SplitServer``, ``SplitClient``), the same messages and the same hello
handshake; only the transport differs (``grpc_transport``: the versioned ``fedguard.split.v1`` envelope,
mutual TLS, every tensor checked before the handler sees it).

Server (``fedguard split serve CONFIG --address HOST:PORT --credentials DIR``, :func:`serve_split`)
---------------------------------------------------------------------------------------------------
* loads the base model from disk once, attaches LoRA as the config says, cuts it at ``split.k_a`` /
  ``split.k_c`` and then *releases* every module a client holds (the token embedding, blocks ``[0, k_a)``,
  blocks ``[L - k_c, L)``, the final norm and the LM head are moved to PyTorch's ``meta`` device: no
  storage), so the process keeps only the middle blocks, their LoRA and the rotary tables. It has no way to
  embed a token id or produce a logit, and no message carries one;
* answers every call with ``SplitServer.handle`` behind gRPC's thread pool (one thread per call, several
  clients at once; the server role serialises its computations itself, see ``split.server``). In
  ``batch_parallel`` and ``hierarchical`` modes with ``--clients`` the first training forward of every client
  waits until all the listed clients have said hello, so the group is the whole federation;
* TLS: it presents ``DIR/server.pem`` (``DIR/server.key``) and accepts only clients whose certificate was
  signed by ``DIR/ca.crt``; the client id a request claims must be the certificate's CN or SAN
  (``--clients`` restricts the ids further);
* the hello handshake compares the base model's fingerprint, the partition points, the wire dtype and the
  LoRA settings; a refusal names every differing field to the client and is logged as a WARNING on the server
  (``run.log``), which keeps serving;
* its run folder (``--run-dir``, default ``OUTPUT_DIR/NAME-split-server-TIMESTAMP``): ``config.yaml``,
  ``run.log``, ``metrics.ndjson`` (one line per hello, refusal, completed training step and finished
  generation), ``server_metrics.json`` (rewritten atomically every few seconds and at shutdown: envelope
  bytes per client and message kind, up = received and down = sent, steps, refusals, the calls in progress
  per client, e.g. a training forward waiting for its turn) and ``adapters/``
  (``server.safetensors``, B's LoRA, and ``adapters.json``; written when B changed and at shutdown);
* runs until SIGINT / SIGTERM, then stops accepting calls, lets running ones finish (5 s) and writes its
  final metrics and adapters (hierarchical: the average of the per-client copies, as the in-process recipe
  does at the end of training). ``--adapters RUN/adapters`` starts it from a finished run's B (to serve
  generation).

Client (``fedguard split train|generate CONFIG --server HOST:PORT --client-id ID --credentials DIR``)
----------------------------------------------------------------------------------------------------
* loads the same base model, attaches the same LoRA (θ₀ from ``lora.init_seed``), cuts it, releases the
  middle blocks (the server's), and says hello: a server with other settings refuses it and the client
  exits with the server's message before writing anything;
* ``train`` (:func:`train_remote`): its own data is partition ``--partition`` (default: the client id read
  as an integer) of the ``data`` section's federation, so ``--client-id 0`` trains on the data in-process
  client "0" trains on, with the same batches, noise and dropout streams; it runs ``split.steps`` steps
  through the server and writes a run folder like the in-process one: ``config.yaml``, ``run.log``,
  ``metrics.ndjson`` (per step: loss, noise, bytes per kind), ``final_metrics.json`` and ``adapters/``
  (``client-<ID>.safetensors`` and ``adapters.json``; B's LoRA stays on the server);
* ``generate`` (:func:`generate_remote`): loads ``client-<ID>.safetensors`` from ``--adapters`` and decodes
  greedily through the server (KV cache per party).

Credentials (``fedguard split certs DIR --clients N``, ``fedguard.pki``): ``DIR/ca.crt``, ``DIR/ca.key`` (keep
offline), ``DIR/server.pem`` / ``server.key`` and ``DIR/clients/<ID>.pem`` / ``<ID>.key`` for ids ``0 .. N-1``.
A client site needs only ``ca.crt`` and its own pair, in that layout.

Byte counts on both sides are the serialised envelopes (``grpc_transport``), so a client's bytes per kind
equal the server's bytes for that client exactly.

Limits: the server's state (B's LoRA and AdamW moments, the sequential turn, caches) lives in its memory; the
adapters on disk are what a restart can start from (``--adapters``), the moments are lost. In sequential mode a
client that dies between its forward and its backward keeps the turn: the others wait ``split.barrier_timeout``
and are refused until it comes back (the same client id, restarted, takes its turn up again). Client-part
aggregation (``split.aggregate_clients``) is simulated in process only and refused here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedguard.alignment import load_start_model
from fedguard.config import ConfigError, ExperimentConfig
from fedguard.data.federation import build_client_data
from fedguard.pki import CLIENT_ID_RULE, is_client_id
from fedguard.io import NdjsonWriter, atomic_write_json, load_tensors
from fedguard.model import attach_lora
from fedguard.model.blocks import BlockSeam
from fedguard.privacy.canaries import audited_client
from fedguard.run_dir import FINAL_METRICS_FILE, METRICS_FILE, RunLog
from fedguard.split.client import SplitClient, count_batches
from fedguard.split.generate import generate_chat
from fedguard.split.grpc_transport import GrpcTransport, SplitTransportError, serve
from fedguard.split.messages import ProtocolError, split_spec
from fedguard.split.server import GLOBAL, SplitServer
from fedguard.split.train import (SERVER_FILE_NOTE, BatchStream, SplitRun, adapters_manifest, check_adapters_manifest,
                                  check_split_config, client_file_note, eval_examples, evaluate_and_log,
                                  load_client_parts, metered_step, need_adapter_file, prepare_run_dir, publish_adapters)

log = logging.getLogger("fedguard")

__all__ = [
    "SplitService",
    "client_credentials",
    "connect",
    "generate_remote",
    "release_parts",
    "serve_split",
    "server_credentials",
    "train_remote",
]

SERVER_METRICS_FILE = "server_metrics.json"
CONNECT_TIMEOUT = 60.0  # seconds a client retries while the server's port refuses connections


# ----------------------------------------------------------------------------------------------- credentials

def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found ({what}; `fedguard split certs DIR --clients N` makes them)")
    return path


def server_credentials(directory: str | Path) -> tuple[Path, Path, Path]:
    """(ca.crt, server.pem, server.key) of a credentials folder."""
    d = Path(directory)
    return (_need(d / "ca.crt", "the federation's CA certificate"), _need(d / "server.pem", "the server's certificate"),
            _need(d / "server.key", "the server's private key"))


def client_credentials(directory: str | Path, client_id: str) -> tuple[Path, Path, Path]:
    """(ca.crt, clients/<id>.pem, clients/<id>.key) of a credentials folder."""
    d = Path(directory)
    return (_need(d / "ca.crt", "the federation's CA certificate"),
            _need(d / "clients" / f"{client_id}.pem", f"client {client_id}'s certificate"),
            _need(d / "clients" / f"{client_id}.key", f"client {client_id}'s private key"))


def message_limit(cfg: ExperimentConfig) -> int:
    """gRPC's message limit: ``split.max_message_mb`` of tensors plus 1 MiB for the envelope (the server's
    handler refuses more than ``max_message_mb`` of tensors with a message naming the setting)."""
    return int(cfg.split.max_message_mb * 2 ** 20) + 2 ** 20


# ----------------------------------------------------------------------------------------------- the model

@dataclass
class Role:
    """One process's share of the model: the loaded base model with LoRA, cut at the partition points."""

    loaded: Any
    peft_model: Any
    seam: Any
    spec: dict[str, Any]


def load_role(cfg: ExperimentConfig, side: str, loaded=None) -> Role:
    """Load (or take) the base model, attach LoRA, cut it and release what ``side`` ("server" or "client")
    does not hold."""
    if loaded is None:
        loaded = load_start_model(cfg.model)
    check_split_config(cfg, loaded.model.config.num_hidden_layers)
    fingerprint = loaded.fingerprint()  # from the files on disk, before anything is released
    peft_model, _ = attach_lora(loaded.model, cfg.lora)
    seam = BlockSeam(peft_model, cfg.split.k_a, cfg.split.k_c)
    config = seam.config
    spec = split_spec(fingerprint, config.num_hidden_layers, config.hidden_size, cfg.split.k_a, cfg.split.k_c,
                      cfg.split.wire_dtype, cfg.lora)
    release_parts(seam, side)
    return Role(loaded, peft_model, seam, spec)


def release_parts(seam, side: str) -> None:
    """Free the base weights (and LoRA) of the modules ``side`` does not hold by moving them to the ``meta``
    device (shapes and dtypes stay, storage goes; running them raises). The server keeps the middle blocks and
    the rotary tables; a client everything but the middle blocks."""
    decoder = seam.decoder
    if side == "server":
        drop = [decoder.embed_tokens, *(decoder.layers[i] for i in (*seam.front.layers, *seam.back.layers)),
                decoder.norm, seam.head]
    elif side == "client":
        drop = [decoder.layers[i] for i in seam.middle.layers]
    else:
        raise ValueError(f"side must be 'server' or 'client', got {side!r}")
    with torch.no_grad():
        for module in drop:
            module.to("meta")


def resident_parameter_bytes(model) -> int:
    """Bytes of parameters and buffers with storage (not on ``meta``), each tensor once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------- server

class SplitService:
    """The server process's handler: ``SplitServer.handle`` plus what the process logs and writes (see the
    module docstring). ``grpc`` is the running gRPC server once :func:`serve_split` started it."""

    def __init__(self, cfg: ExperimentConfig, role: Role, server, run_dir: Path, *,
                 expected: Collection[str] | None = None):
        self.cfg = cfg
        self.role = role
        self.server = server
        self.run_dir = run_dir
        self.expected = sorted(expected) if expected else None
        self.writer = NdjsonWriter(run_dir / "metrics.ndjson")
        self.grpc = None
        self.address = ""
        self.started = time.time()
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._joined = threading.Condition()
        self.clients: dict[str, dict[str, Any]] = {}
        self.refusals = 0
        self.in_flight: dict[str, str] = {}  # client -> the kind of its call in progress (e.g. waiting its turn)
        self._forward_seconds: dict[str, float] = {}
        self._generation: dict[str, tuple[float, int]] = {}  # client -> (start, decode steps)
        self._saved_steps = -1
        self._flush_lock = threading.Lock()

    # -- the handler ---------------------------------------------------------------------------------------
    def handle(self, kind: str, client_id: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        with self._lock:
            self.in_flight[client_id] = kind
        try:
            if (kind == "forward" and meta.get("train", True) is True and self.expected
                    and self.server.mode != "sequential"):
                self._wait_for_everyone(client_id)
            t0 = time.perf_counter()
            try:
                out = self.server.handle(kind, client_id, tensors, meta)
            except ProtocolError as exc:
                self._refused(kind, client_id, exc)
                raise
            self._served(kind, client_id, meta, time.perf_counter() - t0)
            return out
        finally:
            with self._lock:
                self.in_flight.pop(client_id, None)

    def _wait_for_everyone(self, cid: str) -> None:
        def ready() -> bool:
            return set(self.expected) <= set(self.server.clients)

        with self._joined:
            if not self._joined.wait_for(ready, timeout=self.cfg.split.barrier_timeout):
                missing = sorted(set(self.expected) - set(self.server.clients))
                raise ProtocolError(f"forward from {cid!r}: clients {missing} have not said hello within "
                                    f"{self.cfg.split.barrier_timeout:g} s ({self.server.mode} mode waits for every "
                                    "client given by --clients)")

    def _entry(self, cid: str) -> dict[str, Any]:
        return self.clients.setdefault(cid, {"weight": None, "steps": 0, "last_step": None, "generations": 0,
                                             "decode_steps": 0, "refusals": 0, "server_seconds": 0.0})

    def _refused(self, kind: str, cid: str, exc: Exception) -> None:
        with self._lock:
            self.refusals += 1
            self._entry(cid)["refusals"] += 1
            self.writer.append({"event": "refused", "client": cid, "kind": kind, "message": str(exc),
                                "time": time.time()})
        log.warning("split server refused %s from client %r: %s", kind, cid, exc)

    def _served(self, kind: str, cid: str, meta: dict[str, Any], seconds: float) -> None:
        with self._lock:
            e = self._entry(cid)
            e["server_seconds"] += seconds
            if kind == "hello":
                e["weight"] = self.server.clients.get(cid)
                self.writer.append({"event": "hello", "client": cid, "weight": e["weight"], "time": time.time()})
            elif kind == "forward" and meta.get("train", True) is True:
                self._forward_seconds[cid] = seconds
            elif kind == "backward":
                e["steps"] += 1
                e["last_step"] = meta.get("step")
                self.writer.append({"event": "step", "client": cid, "step": meta.get("step"),
                                    "forward_seconds": self._forward_seconds.pop(cid, None),
                                    "backward_seconds": seconds, "server_optimizer_steps": self.server.steps_done})
            elif kind == "prefill":
                self._generation[cid] = (time.perf_counter() - seconds, 0)
            elif kind == "decode" and cid in self._generation:
                start, n = self._generation[cid]
                self._generation[cid] = (start, n + 1)
            elif kind == "end" and cid in self._generation:
                start, n = self._generation.pop(cid)
                e["generations"] += 1
                e["decode_steps"] += n
                self.writer.append({"event": "generation", "client": cid, "decode_steps": n,
                                    "seconds": time.perf_counter() - start})
        if kind == "hello":
            log.info("split server: client %r joined (weight %s)", cid, self.clients[cid]["weight"])
            with self._joined:
                self._joined.notify_all()
        elif kind == "backward":
            step = meta.get("step")
            if step == 1 or step == self.cfg.split.steps or (isinstance(step, int) and step % 10 == 0):
                log.info("split server: client %r finished step %s (%d optimizer steps of B so far)", cid, step,
                         self.server.steps_done)
        elif kind == "end":
            log.info("split server: client %r finished a generation", cid)

    # -- what the process writes -----------------------------------------------------------------------------
    def snapshot(self, *, running: bool = True) -> dict[str, Any]:
        s = self.cfg.split
        g = self.grpc
        with self._lock:
            clients = {cid: dict(e) for cid, e in sorted(self.clients.items())}
            refusals = self.refusals
            in_flight = dict(sorted(self.in_flight.items()))
        for cid, e in clients.items():
            b = g.bytes_of(cid) if g is not None else {}
            e["bytes"] = b
            e["bytes_total"] = sum(v["up"] + v["down"] for v in b.values())
        total = g.bytes if g is not None else {}
        return {
            "running": running, "address": self.address, "mode": s.mode, "k_a": s.k_a, "k_c": s.k_c,
            "server_layers": list(self.role.seam.middle.layers), "spec": self.role.spec,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "seconds": time.perf_counter() - self._t0, "clients": clients,
            "bytes": total, "bytes_total": sum(v["up"] + v["down"] for v in total.values()),
            "messages": g.messages if g is not None else {}, "refusals": refusals, "in_flight": in_flight,
            "server_optimizer_steps": self.server.steps_done,
            "resident_parameter_bytes": resident_parameter_bytes(self.role.peft_model),
            "transport": "grpc, mutual TLS (client id bound to the certificate's CN/SAN)",
        }

    def flush(self, *, final: bool = False) -> None:
        """Write ``server_metrics.json``; and ``adapters/`` when B changed since the last write (and at the end).
        Hierarchical mode writes adapters only at the end (the average of the copies)."""
        with self._flush_lock:
            steps = self.server.steps_done
            if final or (steps != self._saved_steps and self.server.mode != "hierarchical"):
                self.save_adapters(final=final)
                self._saved_steps = steps
            atomic_write_json(self.run_dir / SERVER_METRICS_FILE, self.snapshot(running=not final))

    def save_adapters(self, *, final: bool = False) -> None:
        srv = self.server
        with srv.cond, srv.compute_lock:  # no optimizer step half-way through the copy
            # at the end, hierarchical: the final average of the copies (as the in-process recipe does)
            state = srv.adapter_state() if final else srv.lora.state(GLOBAL)
        manifest = adapters_manifest(self.cfg, self.role, {"server.safetensors": SERVER_FILE_NOTE}, role="server",
                                     server_optimizer_steps=srv.steps_done)
        publish_adapters(self.run_dir, {"server.safetensors": state}, manifest)


def serve_split(cfg: ExperimentConfig, address: str, credentials: str | Path, run_dir: Path | None = None, *,
                clients: Sequence[str] | None = None, adapters: Path | None = None, quiet: bool = False,
                stop: threading.Event | None = None, on_ready: Callable[[str, Path], None] | None = None,
                flush_seconds: float = 5.0, loaded=None) -> Path:
    """Run the split server until ``stop`` is set (the CLI sets it on SIGINT / SIGTERM); returns its run
    folder. ``on_ready(address, run_dir)`` is called once it accepts connections."""
    ca, cert, key = server_credentials(credentials)
    if adapters is not None:
        adapters = Path(adapters)
        check_adapters_manifest(cfg, adapters)
        need_adapter_file(adapters / "server.safetensors")
    if clients is not None:
        bad = [c for c in clients if not is_client_id(c)]
        if bad:
            raise ConfigError(f"--clients: {bad} are not client ids ({CLIENT_ID_RULE})")
    role = load_role(cfg, "server", loaded)
    run_dir = prepare_run_dir(cfg, run_dir, "split-server", marker=SERVER_METRICS_FILE, what="a split server's run")
    run_log = RunLog(run_dir, console_output=not quiet)
    stop = stop or threading.Event()
    try:
        server = SplitServer(role.seam, role.spec, cfg, autocast=role.loaded.autocast)
        if adapters is not None:
            server.lora.load(GLOBAL, load_tensors(adapters / "server.safetensors"))
            log.info("split server: B's LoRA from %s", adapters)
        service = SplitService(cfg, role, server, run_dir, expected=clients)
        workers = max(16, 2 * len(clients or ()) + 4)  # a waiting call holds a thread
        service.grpc = serve(service.handle, address, server_cert=cert, server_key=key, client_ca=ca,
                             max_message_bytes=message_limit(cfg), max_workers=workers, allowed_clients=clients)
        service.address = service.grpc.address
        try:
            s = cfg.split
            if s.mode != "sequential" and not clients:
                log.warning("split server: %s mode without --clients: a client that says hello after a step began "
                            "is not in that step's group", s.mode)
            log.info("split server: %s, k_a=%d, k_c=%d, holding blocks %s (%.1f MB of weights resident), listening "
                     "on %s (mutual TLS; clients: %s)", s.mode, s.k_a, s.k_c, list(role.seam.middle.layers),
                     resident_parameter_bytes(role.peft_model) / 1e6, service.address,
                     ", ".join(clients) if clients else "any with a certificate from the CA")
            service.flush()
            if on_ready is not None:
                on_ready(service.address, run_dir)
            while not stop.wait(flush_seconds):
                service.flush()
        finally:
            service.grpc.stop(grace=5.0)
            service.flush(final=True)
            log.info("split server stopped: %d optimizer steps of B, %d bytes; %s", server.steps_done,
                     service.snapshot()["bytes_total"], run_dir)
    finally:
        run_log.close()
    return run_dir


# ----------------------------------------------------------------------------------------------- client

def connect(cfg: ExperimentConfig, server: str, client_id: str, credentials: str | Path, *,
            server_name: str | None = None):
    """A ``GrpcTransport`` to ``server`` as ``client_id`` (its certificate from ``credentials``); a call may
    wait up to ``split.barrier_timeout`` for other clients, so its timeout is longer."""
    ca, cert, key = client_credentials(credentials, client_id)
    return GrpcTransport(server, root_cert=ca, client_cert=cert, client_key=key, max_message_bytes=message_limit(cfg),
                         timeout=cfg.split.barrier_timeout + 60.0, server_name=server_name)


def hello(client, connect_timeout: float = CONNECT_TIMEOUT) -> dict[str, Any]:
    """The client's hello; while the server's port refuses connections (not started yet) it retries for up to
    ``connect_timeout`` seconds. A TLS refusal or a handshake mismatch raises at once."""
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            return client.hello()
        except SplitTransportError as exc:
            if "Connection refused" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def remote_client(cfg: ExperimentConfig, transport, client_id: str, *, weight: float = 1.0, loaded=None):
    """(Role, SplitClient) of this process: the client's parts on a loaded model, connected by ``transport``."""
    role = load_role(cfg, "client", loaded)
    client = SplitClient(client_id, role.seam, transport, role.spec, cfg, autocast=role.loaded.autocast,
                         weight=weight)
    return role, client


def _partition(cfg: ExperimentConfig, client_id: str, partition: int | None) -> int:
    n = cfg.federation.num_clients
    if partition is None:
        try:
            partition = int(client_id)
        except ValueError:
            raise ConfigError(f"client id {client_id!r} is not a number: give --partition K (which of the "
                              f"federation's {n} data partitions is this client's)") from None
    if not 0 <= partition < n:
        raise ConfigError(f"--partition {partition}: the data section makes federation.num_clients={n} partitions "
                          f"(0 .. {n - 1})")
    return partition


def train_remote(cfg: ExperimentConfig, transport, client_id: str, run_dir: Path | None = None, *,
                 partition: int | None = None, quiet: bool = False, loaded=None,
                 connect_timeout: float = CONNECT_TIMEOUT):
    """One client's split training against a remote server (see the module docstring); a ``SplitRun``."""
    s = cfg.split
    if s.aggregate_clients:
        raise ConfigError("split.aggregate_clients is simulated in process only (the clients' own parts would need "
                          "an aggregator between the client processes); run with --set split.aggregate_clients=false")
    index = _partition(cfg, client_id, partition)
    if loaded is None:
        loaded = load_start_model(cfg.model)
    data = build_client_data(cfg, loaded.tokenizer, audited_client(cfg))[index]
    role, client = remote_client(cfg, transport, client_id, weight=float(len(data)), loaded=loaded)
    t0 = time.perf_counter()
    reply = hello(client, connect_timeout)  # a refusal ends the client before it writes anything
    run_dir = prepare_run_dir(cfg, run_dir, f"split-client-{client_id}")
    run_log = RunLog(run_dir, console_output=not quiet)
    try:
        log.info("split client %s: partition %d (%d examples), %s at %s, k_a=%d, k_c=%d, %d steps, noise %s",
                 client_id, index, len(data), reply.get("mode"), transport.target, s.k_a, s.k_c, s.steps,
                 "off" if s.noise.mode == "off" else f"{s.noise.mode} {s.noise.scale:g}")
        pad_id = loaded.tokenizer.pad_token_id
        stream = BatchStream(data.examples, cfg.train.batch_size, pad_id, cfg.seed, client.id)
        writer = NdjsonWriter(run_dir / METRICS_FILE)
        eval_batches = count_batches(eval_examples(cfg, loaded.tokenizer), pad_id, cfg.eval.batch_size)
        evals: dict[str, Any] = {}

        def evaluate(when: str) -> None:
            if eval_batches:
                evals[f"eval_loss_{when}"] = loss = client.evaluate(eval_batches)
                writer.append({"event": "eval", "when": when, "client": client.id, "eval_loss": loss})
                log.info("held-out loss %s training: %.4f", when, loss)

        evaluate("before")
        if s.evaluate:
            evals["evaluation_before"] = evaluate_and_log(cfg, loaded, client, writer, "before")
        records = []
        for step in range(1, s.steps + 1):
            records.append(metered_step(client, transport, stream, step))
            writer.append(records[-1])  # fsynced per step, as it happens
        evaluate("after")
        if s.evaluate:
            evals["evaluation"] = evaluate_and_log(cfg, loaded, client, writer, "after")
        name = f"client-{client.id}.safetensors"
        publish_adapters(run_dir, {name: client.adapter_state()}, adapters_manifest(
            cfg, role, {name: client_file_note(client.id)}, role="client",
            server=transport.target, server_adapters="held by the split server (its run folder's "
                                                     "adapters/server.safetensors)"))
        final = {"mode": reply.get("mode"), "partition": index, "examples": len(data),
                 **_remote_final_metrics(cfg, role, client, transport, records), **evals,
                 "adapters": [name], "seconds": time.perf_counter() - t0}
        atomic_write_json(run_dir / FINAL_METRICS_FILE, final)
        log.info("split client %s finished: loss %.4f -> %.4f, %.2f s per step, %d bytes over the wire, %s",
                 client.id, final["loss_first"], final["loss_last"], final["seconds_per_step"], final["bytes_total"],
                 run_dir)
        return SplitRun(run_dir, final)
    finally:
        run_log.close()


def _remote_final_metrics(cfg: ExperimentConfig, role, client, transport, records: list[dict]) -> dict[str, Any]:
    """What a remote client's final metrics say of its split, its steps' losses, bytes and times."""
    s = cfg.split
    losses = [r["loss"] for r in records]
    seconds = [r["seconds"] for r in records]
    step_bytes = [sum(v["up"] + v["down"] for v in r["bytes"].values()) for r in records]
    total = transport.bytes_of(client.id)
    return {
        "k_a": s.k_a, "k_c": s.k_c, "server_layers": list(role.seam.middle.layers),
        "client": client.id, "server": transport.target,
        "transport": "grpc, mutual TLS", "steps": s.steps, "client_steps": len(losses),
        "noise": {"mode": s.noise.mode, "scale": s.noise.scale},
        "grad_noise": {"clip": s.grad_noise.clip, "std": s.grad_noise.std},
        "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
        "bytes": total, "bytes_total": sum(v["up"] + v["down"] for v in total.values()),
        "bytes_per_step": sum(step_bytes) / len(step_bytes), "messages": transport.messages,
        "seconds_per_step": sum(seconds) / len(seconds),
        "resident_parameter_bytes": resident_parameter_bytes(role.peft_model),
    }


def generate_remote(cfg: ExperimentConfig, transport, client_id: str, prompts: Sequence[str], *,
                    max_new_tokens: int, adapters: Path | None = None, adapters_client: str | None = None,
                    loaded=None, connect_timeout: float = CONNECT_TIMEOUT) -> dict[str, Any]:
    """Greedy chat answers through a remote server: {"answers", "tokens", "bytes", "decode_steps",
    "seconds", "seconds_per_decode_step"}."""
    if adapters is not None:
        check_adapters_manifest(cfg, Path(adapters))
    role, client = remote_client(cfg, transport, client_id, loaded=loaded)
    if adapters is not None:
        load_client_parts(client.banks, client.id, adapters, adapters_client or client_id)
    before = transport.bytes_of(client_id)
    hello(client, connect_timeout)
    t0 = time.perf_counter()
    answers, tokens = generate_chat(client, role.loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                    system_prompt=cfg.data.system_prompt)
    seconds = time.perf_counter() - t0
    after = transport.bytes_of(client_id)
    sent = {k: {d: after[k][d] - before.get(k, {}).get(d, 0) for d in ("up", "down")} for k in after}
    decode = transport.messages.get("decode", 0)
    return {"prompts": list(prompts), "answers": answers, "tokens": tokens.tolist(),
            "bytes": {k: v for k, v in sent.items() if v["up"] or v["down"]}, "decode_steps": decode,
            "seconds": seconds}
