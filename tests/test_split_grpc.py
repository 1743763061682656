"""The split-learning gRPC transport (fedguard.split.grpc_transport): mutual TLS bound to client ids, the
versioned envelope's checks, handler errors, concurrency and exact byte counts. Plain tensors, a toy handler,
servers on 127.0.0.1 with an ephemeral port."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
import torch

from fedguard.pki import make_client_cert, make_credentials
from fedguard.split import grpc_transport as gt
from fedguard.split.grpc_transport import (
    GrpcTransport,
    SplitAuthError,
    SplitRemoteError,
    SplitRequestError,
    SplitTooLargeError,
    SplitTransportError,
    serve,
    serve_insecure_for_tests,
)
from fedguard.split.messages import PROTOCOL_VERSION, ProtocolError
from fedguard.split.proto import split_pb2

CLIENTS = ["client-0", "client-1", "client-2", "client-3"]
SERVER_LIMIT = 1 << 20  # the shared server's max message size
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
SHAPES = [(), (0,), (5,), (2, 3, 4), (1, 0, 3), (1, 1, 7)]


class Mismatch(ProtocolError):
    """What a role's handler raises for bad input."""


class ToyHandler:
    """Echoes tensors; meta adds who/what it saw. Test hooks in meta: raise / crash / barrier / reply_bytes /
    bad_reply."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.barrier: threading.Barrier | None = None
        self._lock = threading.Lock()

    def __call__(self, kind, client_id, tensors, meta):
        with self._lock:
            self.calls.append((kind, client_id))
        if "raise" in meta:
            raise Mismatch(meta["raise"])
        if "crash" in meta:
            raise RuntimeError("secret server detail")
        if meta.get("barrier"):
            self.barrier.wait(timeout=10)  # all clients inside the handler at once, or BrokenBarrierError
        if "reply_bytes" in meta:
            return {"big": torch.zeros(meta["reply_bytes"] // 8, dtype=torch.int64)}, {}
        if meta.get("bad_reply"):
            return {"mask": torch.ones(2, dtype=torch.bool)}, {}
        return tensors, {**meta, "seen_by": client_id, "kind": kind}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("split-pki")
    creds = make_credentials(root / "federation", 0)
    for cid in [*CLIENTS, "mallory"]:
        make_client_cert(creds, cid)
    other = make_credentials(root / "other", 0)  # another federation's CA
    make_client_cert(other, "client-0")
    return creds, other


@pytest.fixture(scope="module")
def handler():
    return ToyHandler()


@pytest.fixture(scope="module")
def server(pki, handler):
    creds, _ = pki
    srv = serve(handler, "127.0.0.1:0", server_cert=creds.server_cert, server_key=creds.server_key,
                client_ca=creds.ca_cert, max_message_bytes=SERVER_LIMIT, max_workers=8, allowed_clients=CLIENTS)
    yield srv
    srv.stop()


def connect(pki, port, cid, *, ca=None, cert_from=None, **kw) -> GrpcTransport:
    creds, _ = pki
    issuer = cert_from or creds
    kw.setdefault("timeout", 20)
    return GrpcTransport(f"127.0.0.1:{port}", root_cert=(ca or creds).ca_cert, client_cert=issuer.client_cert(cid),
                         client_key=issuer.client_key(cid), **kw)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample(dtype, shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        t = torch.randint(-2**62, 2**62, shape, generator=g, dtype=torch.int64)
        if t.numel() >= 2:
            t.view(-1)[:2] = torch.tensor([2**63 - 1, -2**63])
        return t
    t = torch.randn(shape, generator=g).to(dtype)
    if t.numel() >= 4:
        t.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0]).to(dtype)
    return t


def assert_identical(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)


def good_call(tr: GrpcTransport, cid: str, seed: int = 0):
    x = sample(torch.float32, (2, 3), seed)
    out, meta = tr.call("forward", cid, {"h": x}, {"step": seed})
    assert_identical(out["h"], x)
    assert meta == {"step": seed, "seen_by": cid, "kind": "forward"}


def valid_envelope(cid="client-0") -> split_pb2.Envelope:
    return split_pb2.Envelope(version=PROTOCOL_VERSION, kind="forward", client_id=cid, request_id=1, step=0,
                              tensors=[gt.encode_tensor("h", torch.ones(2, 3))], meta_json="{}")


# ------------------------------------------------------------------------------------------ 1. round trip

def test_round_trip_every_dtype_and_shape_over_mutual_tls(pki, server):
    tensors = {f"{str(d).removeprefix('torch.')}/{'x'.join(map(str, s)) or 'scalar'}": sample(d, s, i)
               for i, (d, s) in enumerate((d, s) for d in DTYPES for s in SHAPES)}
    base = torch.randn(4, 6, requires_grad=True)
    tensors["non_contiguous"] = base.t()  # a transposed view of a tensor that requires grad
    meta = {"step": 3, "nested": {"list": [1, 2.5, None, True, "é"]}, "loss": 0.125}
    with connect(pki, server.port, "client-0") as tr:
        out, out_meta = tr.call("prefill", "client-0", tensors, meta)
        assert list(out) == list(tensors)
        for k, t in tensors.items():
            assert_identical(out[k], t)
        assert out_meta == {**meta, "seen_by": "client-0", "kind": "prefill"}
        out["float32/5"] += 1  # the decoded tensors are writable, not views of the message
        empty, empty_meta = tr.call("end", "client-0", {}, {})
        assert empty == {} and empty_meta == {"seen_by": "client-0", "kind": "end"}


def test_several_clients_are_served_concurrently(pki, server, handler):
    handler.barrier = threading.Barrier(len(CLIENTS))  # each client's hello waits inside the handler for all
    errors, done = [], []

    def client(cid, k):
        try:
            with connect(pki, server.port, cid) as tr:
                tr.call("hello", cid, {}, {"barrier": True})
                for step in range(5):
                    good_call(tr, cid, seed=100 * k + step)
                done.append(cid)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((cid, e))

    threads = [threading.Thread(target=client, args=(cid, k)) for k, cid in enumerate(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and sorted(done) == CLIENTS


def test_insecure_mode_is_loopback_only(handler):
    with pytest.raises(ValueError, match="loopback"):
        serve_insecure_for_tests(handler, "0.0.0.0:0")
    with pytest.raises(ValueError, match="loopback"):
        GrpcTransport.insecure_for_tests("fl.example.org:443")
    srv = serve_insecure_for_tests(handler, "127.0.0.1:0")
    try:
        with GrpcTransport.insecure_for_tests(f"127.0.0.1:{srv.port}", timeout=20) as tr:
            good_call(tr, "anyone")
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ 2. authentication

def test_clients_without_a_valid_certificate_or_identity_are_refused(pki, server, handler):
    creds, other = pki
    port = server.port
    n_calls = len(handler.calls)
    # no client certificate at all: the TLS handshake fails
    channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(creds.ca_cert.read_bytes()))
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(gt._METHOD)(valid_envelope().SerializeToString(), timeout=20)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    # a certificate from another federation's CA; the server's certificate used as a client certificate
    # (serverAuth only); a client that does not trust the server's CA
    for tr in (connect(pki, port, "client-0", cert_from=other),
               GrpcTransport(f"127.0.0.1:{port}", root_cert=creds.ca_cert, client_cert=creds.server_cert,
                             client_key=creds.server_key, timeout=20),
               connect(pki, port, "client-0", ca=other)):
        with tr, pytest.raises(SplitTransportError, match="unavailable") as e:
            tr.call("forward", "client-0", {}, {})
        assert e.value.status == "UNAVAILABLE"
    # a valid certificate for client-1 claiming to be client-0
    with connect(pki, port, "client-1") as tr, pytest.raises(SplitAuthError, match="client-1") as e:
        tr.call("forward", "client-0", {}, {})
    assert e.value.code == "unauthenticated" and isinstance(e.value, PermissionError)
    # a valid certificate, but not on this server's list
    with connect(pki, port, "mallory") as tr, pytest.raises(SplitAuthError, match="not allowed") as e:
        tr.call("forward", "mallory", {}, {})
    assert e.value.code == "forbidden"
    assert len(handler.calls) == n_calls  # the handler saw none of them
    with connect(pki, port, "client-0") as tr:  # still serving
        good_call(tr, "client-0")


# ------------------------------------------------------------------------------------------ 3. malformed input

def _set(field, value):
    def mutate(env):
        setattr(env, field, value)
    return mutate


def _tensor(**kw):
    def mutate(env):
        t = env.tensors[0]
        for k, v in kw.items():
            if k == "shape":
                del t.shape[:]
                t.shape.extend(v)
            else:
                setattr(t, k, v)
    return mutate


def _duplicate(env):
    env.tensors.append(env.tensors[0])


def _error_field(env):
    env.error.code = "internal"


MALFORMED = {
    "wrong version": (_set("version", PROTOCOL_VERSION + 1), "protocol version 2"),
    "version 0 (unset)": (_set("version", 0), "protocol version 0"),
    "unknown kind": (_set("kind", "steal_weights"), "unknown kind 'steal_weights'"),
    "empty kind": (_set("kind", ""), "unknown kind"),
    "bytes short of the shape": (_tensor(data=b"\0" * 23), "23 bytes of data, but shape [2, 3] of float32 needs 24"),
    "bytes beyond the shape": (_tensor(shape=[2, 2]), "24 bytes of data, but shape [2, 2] of float32 needs 16"),
    "dtype float64": (_tensor(dtype="float64"), "dtype 'float64' is not allowed"),
    "dtype bool": (_tensor(dtype="bool"), "dtype 'bool' is not allowed"),
    "negative shape": (_tensor(shape=[-2, -3]), "negative entry in shape [-2, -3]"),
    "too many dimensions": (_tensor(shape=[1] * 17, data=b"\0" * 4), "17 dimensions"),
    "bad tensor name": (_tensor(name="has space"), "tensor name"),
    "duplicate tensor": (_duplicate, "appears twice"),
    "meta not JSON": (_set("meta_json", "{not json"), "meta_json is not JSON"),
    "meta not an object": (_set("meta_json", "[1, 2]"), "not an object"),
    "meta with NaN": (_set("meta_json", '{"loss": NaN}'), "NaN is not JSON"),
    "client_id with a path": (_set("client_id", "../client-0"), "client_id '../client-0'"),
    "request with an error field": (_error_field, "no error field"),
}


def test_malformed_envelopes_get_clear_errors_and_the_server_keeps_serving(pki, server, handler):
    n_calls = len(handler.calls)
    with connect(pki, server.port, "client-0") as tr:
        for case, (mutate, expected) in MALFORMED.items():
            env = valid_envelope()
            mutate(env)
            reply = tr.exchange(env)
            assert reply.HasField("error"), case
            assert reply.error.code == "invalid_request", case
            assert expected in reply.error.message, (case, reply.error.message)
            assert not reply.tensors and reply.request_id == 1, case
        assert len(handler.calls) == n_calls  # the handler saw none of them
        # bytes that are not an Envelope at all
        raw = tr._rpc(b"\xff\xff\xff\xff not protobuf", timeout=20)
        reply = split_pb2.Envelope.FromString(raw)
        assert reply.error.code == "invalid_request" and "not a fedguard.split.v1.Envelope" in reply.error.message
        good_call(tr, "client-0")


def test_wrong_input_is_refused_before_sending(pki, server):
    with connect(pki, server.port, "client-0") as tr:
        with pytest.raises(ValueError, match="unknown kind"):
            tr.call("steal", "client-0", {}, {})
        with pytest.raises(ValueError, match="dtype torch.bool"):
            tr.call("forward", "client-0", {"mask": torch.ones(2, 2, dtype=torch.bool)}, {})
        with pytest.raises(ValueError, match="client_id"):
            tr.call("forward", "client 0", {}, {})
        with pytest.raises(TypeError):
            tr.call("forward", "client-0", {"h": [1.0]}, {})
        with pytest.raises(ProtocolError, match="not JSON-serialisable"):
            tr.call("forward", "client-0", {}, {"loss": float("nan")})  # strict JSON
        assert tr.messages == {} and tr.bytes == {}  # nothing went out


def test_oversize_messages_are_refused_and_the_server_keeps_serving(pki, server):
    big = {"h": torch.zeros(SERVER_LIMIT // 4 + 1)}  # just over the server's limit
    with connect(pki, server.port, "client-0", max_message_bytes=4 * SERVER_LIMIT) as tr:
        with pytest.raises(SplitTooLargeError, match="exceeds a message size limit") as e:  # cut off by gRPC
            tr.call("forward", "client-0", big, {})
        assert e.value.status == "RESOURCE_EXHAUSTED" and isinstance(e.value, (SplitTransportError, ProtocolError))
        with pytest.raises(SplitRequestError, match="reply is .* over the server's limit") as e:
            tr.call("aggregate", "client-0", {}, {"reply_bytes": 2 * SERVER_LIMIT})  # a reply too large to send
        assert e.value.code == "too_large"
        good_call(tr, "client-0")
    with connect(pki, server.port, "client-0", max_message_bytes=1024) as tr:  # this side's own limit
        with pytest.raises(SplitTransportError, match="over this transport's limit of 1024"):
            tr.call("forward", "client-0", {"h": torch.zeros(300)}, {})
        assert tr.messages == {}
        with pytest.raises(SplitTransportError, match="exceeds a message size limit"):  # the reply's size
            tr.call("aggregate", "client-0", {}, {"reply_bytes": 4096})


# ------------------------------------------------------------------------------------------ 4. handler errors

def test_handler_errors_reach_the_client_and_other_clients_are_unaffected(pki, server):
    errors, stop = [], threading.Event()

    def bystander(cid, k):
        try:
            with connect(pki, server.port, cid) as tr:
                step = 0
                while not stop.is_set() or step < 5:
                    good_call(tr, cid, seed=1000 * k + step)
                    step += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((cid, e))

    threads = [threading.Thread(target=bystander, args=(cid, k)) for k, cid in enumerate(CLIENTS[1:])]
    for t in threads:
        t.start()
    try:
        with connect(pki, server.port, "client-0") as tr:
            for i in range(10):
                with pytest.raises(SplitRequestError, match=f"Mismatch: kA is 2 here, 3 there #{i}") as e:
                    tr.call("hello", "client-0", {}, {"raise": f"kA is 2 here, 3 there #{i}"})
                assert e.value.code == "rejected" and isinstance(e.value, ProtocolError)
            with pytest.raises(SplitRemoteError, match="RuntimeError") as e:
                tr.call("forward", "client-0", {}, {"crash": True})
            assert e.value.code == "internal" and not isinstance(e.value, ValueError)
            assert "secret server detail" not in str(e.value)
            with pytest.raises(SplitRemoteError, match="reply cannot be encoded") as e:
                tr.call("forward", "client-0", {}, {"bad_reply": True})
            assert e.value.code == "internal"
            good_call(tr, "client-0")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert errors == []


# ------------------------------------------------------------------------------------------ 5. byte counts

def test_byte_counts_equal_the_serialised_envelopes(pki, handler):
    creds, _ = pki
    srv = serve(handler, "127.0.0.1:0", server_cert=creds.server_cert, server_key=creds.server_key,
                client_ca=creds.ca_cert)
    try:
        tr = connect(pki, srv.port, "client-2")
        decode = {"h": torch.randn(1, 1, 576).to(torch.float16), "pos": torch.tensor([[17]])}
        forward = {"h": torch.randn(2, 8, 576).to(torch.bfloat16), "n": torch.tensor([8, 5])}
        calls = [("hello", {}, {"model": "toy", "kA": 2}), ("forward", forward, {"step": 1}),
                 ("decode", decode, {"step": 40}), ("decode", decode, {"step": 41}), ("end", {}, {})]
        expected: dict[str, dict[str, int]] = {}
        for rid, (kind, tensors, meta) in enumerate(calls, start=1):
            tr.call(kind, "client-2", tensors, meta)
            # what the envelopes must be, built here from the schema alone
            def env(m, rid=rid, kind=kind, tensors=tensors):
                return split_pb2.Envelope(
                    version=1, kind=kind, client_id="client-2", request_id=rid, step=m.get("step", 0),
                    tensors=[split_pb2.Tensor(name=k, dtype=str(v.dtype).removeprefix("torch."), shape=v.shape,
                                              data=raw_bytes(v)) for k, v in tensors.items()],
                    meta_json=json.dumps(m) if m else "")
            e = expected.setdefault(kind, {"up": 0, "down": 0})
            e["up"] += env(meta).ByteSize()
            e["down"] += env({**meta, "seen_by": "client-2", "kind": kind}).ByteSize()
        # an error reply is counted too
        with pytest.raises(SplitRequestError):
            tr.call("backward", "client-2", {}, {"raise": "no"})
        request = split_pb2.Envelope(version=1, kind="backward", client_id="client-2", request_id=6,
                                     meta_json=json.dumps({"raise": "no"}))
        error = split_pb2.Envelope(version=1, kind="backward", client_id="client-2", request_id=6,
                                   error=split_pb2.Error(code="rejected", message="Mismatch: no"))
        expected["backward"] = {"up": request.ByteSize(), "down": error.ByteSize()}

        assert tr.bytes == expected and tr.bytes_of("client-2") == expected and tr.bytes_of("client-0") == {}
        assert tr.messages == {"hello": 1, "forward": 1, "decode": 2, "end": 1, "backward": 1}
        assert srv.bytes == expected and srv.bytes_of("client-2") == expected  # the server counts the same
        assert srv.messages == tr.messages
        assert tr.total_bytes() == {d: sum(v[d] for v in expected.values()) for d in ("up", "down")}
        # a decode step: one [1,1,576] fp16 activation + one int64 position, plus a small, fixed overhead
        payload = 576 * 2 + 8
        assert payload < tr.bytes["decode"]["up"] / 2 < payload + 120
        tr.reset_bytes()
        assert tr.messages == {} and tr.bytes == {}
        tr.close()
    finally:
        srv.stop()
