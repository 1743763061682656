"""The split-learning transport over a real network: gRPC, the versioned ``fedguard.split.v1`` protobuf schema
(``split/proto/split.proto``) and mutual TLS.

Client side, :class:`GrpcTransport`, has the one method every split role talks through::

    call(kind, client_id, tensors, meta) -> (tensors, meta)

Server side, :func:`serve` runs a role's handler ``handle(kind, client_id, tensors, meta) -> (tensors, meta)``
behind a thread pool, so one server answers several clients at once (the handler must be thread-safe, or pass
``serialize_handler=True``). Before the handler sees a request the server checks, and answers a refusal
otherwise (it never crashes and keeps serving everyone else):

* the envelope parses, its protocol version is :data:`PROTOCOL_VERSION`, ``client_id`` is a short plain string;
* identity: with TLS the client presented a certificate signed by the federation's CA (the TLS handshake fails
  otherwise) whose CN or a SAN equals the ``client_id`` it claims, and, if ``allowed_clients`` is given, the id
  is in it;
* ``kind`` is one of :data:`KINDS`; every tensor has an allowed dtype (:data:`DTYPES`), a shape of at most
  :data:`MAX_DIMS` non-negative entries and exactly prod(shape) * itemsize bytes; names are unique;
  ``meta_json`` is a JSON object;
* the message is within ``max_message_bytes`` (gRPC's own receive limit is set to it too, so a larger message
  is cut off before it is read).

A handler's ``ValueError`` (``messages.ProtocolError`` or any other subclass) goes back as a ``rejected`` reply
carrying its message, which the client raises as :class:`SplitRequestError`, a ``ProtocolError`` like the
in-process transport raises; any other handler exception goes back as ``internal`` with the class name only
(details in the server's log). The envelope's version is ``messages.PROTOCOL_VERSION``, checked on every
message (the hello handshake compares the rest of the spec).

Byte accounting, in the in-process transport's shape: ``bytes[kind]["up" | "down"]`` (up: client -> server),
``bytes_of(client_id)``, ``messages[kind]``, on both sides (``transport.bytes``, ``server.bytes``). The counts
are the serialised envelopes, exactly what gRPC carries as the message, without HTTP/2 framing, TLS records or
headers; only completed exchanges count.

TLS is always on outside tests; :meth:`GrpcTransport.insecure_for_tests` and :func:`serve_insecure_for_tests`
are plaintext, loopback only, with no identity binding. Certificates come from
:mod:`fedguard.pki` (``make_credentials`` for the CA and the server's certificate,
``make_client_cert`` for each client).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import logging
import math
import re
import sys
import threading
from collections.abc import Callable, Collection, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any, Self

import grpc
import torch
from google.protobuf.message import DecodeError

from fedguard.pki import CLIENT_ID_RULE, is_client_id
from fedguard.split.messages import KINDS, PROTOCOL_VERSION, ProtocolError
from fedguard.split.transport import ByteMeter
from fedguard.split.proto import split_pb2

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES", "DTYPES", "KINDS", "MAX_DIMS", "PROTOCOL_VERSION", "GrpcTransport", "SplitAuthError",
    "SplitRemoteError", "SplitRequestError", "SplitServer", "SplitTooLargeError", "SplitTransportError",
    "decode_tensor", "encode_tensor", "serve", "serve_insecure_for_tests",
]

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16, "int64": torch.int64}
_DTYPE_NAME = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
MAX_DIMS = 16
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
_PROTOBUF_MAX = 2**31 - 1  # a protobuf message cannot be larger
_SERVICE = split_pb2.DESCRIPTOR.services_by_name["SplitLearning"].full_name  # fedguard.split.v1.SplitLearning
_METHOD = f"/{_SERVICE}/Call"
_TENSOR_NAME = re.compile(r"[!-~]{1,256}")  # printable ASCII, no spaces
_LITTLE_ENDIAN = sys.byteorder == "little"

Handler = Callable[[str, str, dict[str, torch.Tensor], dict], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]]


# ----------------------------------------------------------------------------------------------- errors

class SplitTransportError(RuntimeError):
    """The exchange itself failed: the server is unreachable or refused the TLS handshake (no client
    certificate, or one from another CA), no reply within the timeout, a message over a size limit, a malformed
    reply. ``status`` is gRPC's status code name when gRPC reported it."""

    def __init__(self, message: str, *, status: str | None = None):
        super().__init__(message)
        self.status = status


class SplitTooLargeError(SplitTransportError, ProtocolError):
    """A message over a size limit: this transport's (nothing was sent) or gRPC's on either side."""


class SplitRemoteError(RuntimeError):
    """The server answered with an error reply. ``code`` is the Error.code of the schema, ``message`` its text."""

    def __init__(self, code: str, message: str, *, kind: str = "", client_id: str = ""):
        super().__init__(f"split server refused {kind or 'a request'} from {client_id or '?'}: [{code}] {message}")
        self.code = code
        self.message = message
        self.kind = kind
        self.client_id = client_id


class SplitRequestError(SplitRemoteError, ProtocolError):
    """The request was malformed (``invalid_request``), too large (``too_large``) or refused by the server's
    handler with a ValueError (``rejected``). A ``messages.ProtocolError`` (so a ``ValueError``)."""


class SplitAuthError(SplitRemoteError, PermissionError):
    """The client's identity did not check out: its certificate is not for the client id it claims
    (``unauthenticated``) or the id is not allowed on this server (``forbidden``)."""


_REMOTE_ERRORS = {"invalid_request": SplitRequestError, "rejected": SplitRequestError, "too_large": SplitRequestError,
                  "unauthenticated": SplitAuthError, "forbidden": SplitAuthError}


class _Refusal(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ----------------------------------------------------------------------------------------------- tensors

def encode_tensor(name: str, tensor: torch.Tensor) -> split_pb2.Tensor:
    """One tensor as the schema's Tensor: dtype name, shape and C-order little-endian bytes (a copy)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    if not isinstance(name, str) or not _TENSOR_NAME.fullmatch(name):
        raise ProtocolError(f"tensor name {name!r}: use 1-256 printable ASCII characters without spaces")
    dtype = _DTYPE_NAME.get(tensor.dtype)
    if dtype is None:
        raise ProtocolError(f"tensor {name!r} has dtype {tensor.dtype}; the wire carries only {sorted(DTYPES)}")
    if not _LITTLE_ENDIAN:
        raise NotImplementedError("the split wire format is little-endian; big-endian hosts are not supported")
    t = tensor.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return split_pb2.Tensor(name=name, dtype=dtype, shape=list(t.shape), data=data)


def decode_tensor(msg: split_pb2.Tensor) -> torch.Tensor:
    """A checked Tensor message back as a (writable, CPU) torch tensor. Call :func:`_check_tensor` first."""
    if not _LITTLE_ENDIAN:
        raise NotImplementedError("the split wire format is little-endian; big-endian hosts are not supported")
    dtype, shape = DTYPES[msg.dtype], tuple(msg.shape)
    if not msg.data:  # numel == 0 (frombuffer refuses an empty buffer)
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)


def _check_tensor(msg: split_pb2.Tensor) -> None:
    name = msg.name
    if not _TENSOR_NAME.fullmatch(name):
        raise _Refusal("invalid_request", f"tensor name {name[:64]!r}: use 1-256 printable ASCII characters")
    if msg.dtype not in DTYPES:
        raise _Refusal("invalid_request", f"tensor {name!r}: dtype {msg.dtype[:32]!r} is not allowed "
                                          f"(allowed: {', '.join(sorted(DTYPES))})")
    if len(msg.shape) > MAX_DIMS:
        raise _Refusal("invalid_request", f"tensor {name!r}: {len(msg.shape)} dimensions (at most {MAX_DIMS})")
    if any(d < 0 for d in msg.shape):
        raise _Refusal("invalid_request", f"tensor {name!r}: negative entry in shape {list(msg.shape)}")
    expected = math.prod(msg.shape) * _ITEMSIZE[msg.dtype]
    if len(msg.data) != expected:
        raise _Refusal("invalid_request", f"tensor {name!r}: {len(msg.data)} bytes of data, but shape "
                                          f"{list(msg.shape)} of {msg.dtype} needs {expected}")


def _check_body(env: split_pb2.Envelope) -> dict:
    """Kind, tensors and meta of a request or reply; returns the meta. Raises _Refusal."""
    if env.kind not in KINDS:
        raise _Refusal("invalid_request", f"unknown kind {env.kind[:32]!r} (known: {', '.join(KINDS)})")
    seen: set[str] = set()
    for t in env.tensors:
        _check_tensor(t)
        if t.name in seen:
            raise _Refusal("invalid_request", f"tensor {t.name!r} appears twice")
        seen.add(t.name)
    if not env.meta_json:
        return {}
    try:
        meta = json.loads(env.meta_json, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise _Refusal("invalid_request", f"meta_json is not JSON: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise _Refusal("invalid_request", f"meta_json is a JSON {type(meta).__name__}, not an object")
    return meta


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _check_header(env: split_pb2.Envelope) -> None:
    if env.version != PROTOCOL_VERSION:
        raise _Refusal("invalid_request", f"protocol version {env.version}; this server speaks {PROTOCOL_VERSION}")
    if not is_client_id(env.client_id):
        raise _Refusal("invalid_request", f"client_id {env.client_id[:64]!r}: use {CLIENT_ID_RULE}"
                                          "starting with a letter or digit")
    if env.HasField("error"):
        raise _Refusal("invalid_request", "a request carries no error field")


def _step(meta: Mapping[str, Any]) -> int:
    """meta["step"] for the envelope's tracing field; 0 (not serialised) when there is none."""
    s = meta.get("step", 0)
    return s if isinstance(s, int) and not isinstance(s, bool) and -2**63 <= s < 2**63 else 0


# ----------------------------------------------------------------------------------------------- helpers

def _pem(x: str | Path | bytes) -> bytes:
    """PEM bytes from bytes, PEM text, or a path."""
    if isinstance(x, bytes):
        return x
    if isinstance(x, str) and x.lstrip().startswith("-----BEGIN"):
        return x.encode()
    return Path(x).read_bytes()


def _check_limit(max_message_bytes: int) -> int:
    if not isinstance(max_message_bytes, int) or not 0 < max_message_bytes <= _PROTOBUF_MAX:
        raise ValueError(f"max_message_bytes={max_message_bytes!r}: must be 1 .. {_PROTOBUF_MAX}")
    return max_message_bytes


def _grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _peer_identities(context: grpc.ServicerContext) -> set[str]:
    """The CN and SAN entries of the verified client certificate (empty without one)."""
    auth = context.auth_context()
    return {v.decode("utf-8", "replace") for key in ("x509_common_name", "x509_subject_alternative_name")
            for v in auth.get(key, ())}


# ----------------------------------------------------------------------------------------------- server

class SplitServer(ByteMeter):
    """A running split-learning gRPC server (made by :func:`serve`). ``port`` is the bound port, ``bytes`` the
    envelope bytes per kind (up: received, down: sent; a request with an invalid kind counts as "invalid");
    ``stop()`` ends it (also as a context manager)."""

    def __init__(self, handler: Handler, *, max_message_bytes: int, max_workers: int,
                 allowed_clients: Collection[str] | None, bind_identity: bool, serialize_handler: bool):
        if not callable(handler):
            raise TypeError("handler must be callable")
        self.handler = handler
        self.max_message_bytes = _check_limit(max_message_bytes)
        self.allowed_clients = None if allowed_clients is None else frozenset(allowed_clients)
        self.bind_identity = bind_identity
        super().__init__()
        self._handler_lock = threading.Lock() if serialize_handler else contextlib.nullcontext()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="split-grpc"),
            options=_grpc_options(self.max_message_bytes))
        # raw bytes in and out (no (de)serializer): a request that is not an Envelope gets a refusal, not a
        # gRPC-internal error, and the counted sizes are exactly the wire messages
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            _SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(self._call)}),))
        self.port = 0
        self.address = ""

    def _bind(self, address: str, credentials: grpc.ServerCredentials | None) -> SplitServer:
        port = (self._server.add_secure_port(address, credentials) if credentials is not None
                else self._server.add_insecure_port(address))
        if not port:
            raise RuntimeError(f"could not bind the split server to {address}")
        self.port = port
        self.address = f"{address.rsplit(':', 1)[0]}:{port}"
        self._server.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace).wait()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- one request

    def _call(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        env = split_pb2.Envelope()
        try:
            reply = self._answer(request, context, env)
        except Exception as e:  # never let a request take the server down
            log.exception("split server: internal error on %s from %s", env.kind, env.client_id)
            reply = self._error(env, "internal", f"{type(e).__name__} in the split server (details in its log)")
        data = reply.SerializeToString()
        if len(data) > self.max_message_bytes:
            reply = self._error(env, "too_large", f"the reply is {len(data)} bytes, over the server's limit of "
                                                  f"{self.max_message_bytes}")
            data = reply.SerializeToString()
        self._count(env.client_id if is_client_id(env.client_id) else "",
                    env.kind if env.kind in KINDS else "invalid", len(request), len(data))
        return data

    @staticmethod
    def _reply_header(env: split_pb2.Envelope) -> split_pb2.Envelope:
        return split_pb2.Envelope(version=PROTOCOL_VERSION, kind=env.kind if env.kind in KINDS else "",
                                  client_id=env.client_id if is_client_id(env.client_id) else "",
                                  request_id=env.request_id, step=env.step)

    def _error(self, env: split_pb2.Envelope, code: str, message: str) -> split_pb2.Envelope:
        reply = self._reply_header(env)
        reply.error.code, reply.error.message = code, message
        return reply

    def _answer(self, request: bytes, context: grpc.ServicerContext, env: split_pb2.Envelope) -> split_pb2.Envelope:
        if len(request) > self.max_message_bytes:  # gRPC's receive limit already holds; kept explicit
            return self._error(env, "too_large", f"the request is {len(request)} bytes, over the server's limit "
                                                 f"of {self.max_message_bytes}")
        try:
            env.ParseFromString(request)
        except DecodeError:
            env.Clear()
            return self._error(env, "invalid_request", f"the request is not a {split_pb2.Envelope.DESCRIPTOR.full_name}")
        try:
            _check_header(env)
            self._authenticate(env, context)
            meta = _check_body(env)
        except _Refusal as r:
            (log.warning if r.code in ("unauthenticated", "forbidden") else log.info)(
                "split server: refused %s from %r (%s): %s", env.kind[:32], env.client_id[:64], r.code, r.message)
            return self._error(env, r.code, r.message)
        tensors = {t.name: decode_tensor(t) for t in env.tensors}
        try:
            with self._handler_lock:
                out_tensors, out_meta = self.handler(env.kind, env.client_id, tensors, meta)
        except ValueError as e:
            log.info("split server: handler rejected %s from %s: %s", env.kind, env.client_id, e)
            return self._error(env, "rejected", f"{type(e).__name__}: {e}")
        reply = self._reply_header(env)
        try:
            reply.tensors.extend(encode_tensor(k, v) for k, v in out_tensors.items())
            reply.meta_json = json.dumps(dict(out_meta), allow_nan=False) if out_meta else ""
        except (TypeError, ValueError) as e:
            log.error("split server: the handler's reply to %s from %s cannot be sent: %s", env.kind,
                      env.client_id, e)
            return self._error(env, "internal", f"the server's reply cannot be encoded ({type(e).__name__})")
        return reply

    def _authenticate(self, env: split_pb2.Envelope, context: grpc.ServicerContext) -> None:
        if self.bind_identity:
            ids = _peer_identities(context)
            if not ids:
                raise _Refusal("unauthenticated", "no verified client certificate")
            if env.client_id not in ids:
                raise _Refusal("unauthenticated", f"the client certificate is for {', '.join(sorted(ids))}, "
                                                  f"not {env.client_id!r}")
        if self.allowed_clients is not None and env.client_id not in self.allowed_clients:
            raise _Refusal("forbidden", f"client {env.client_id!r} is not allowed on this server")


def serve(handler: Handler, address: str, *, server_cert: str | Path | bytes, server_key: str | Path | bytes,
          client_ca: str | Path | bytes, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_workers: int = 8,
          allowed_clients: Collection[str] | None = None, bind_identity: bool = True,
          serialize_handler: bool = False) -> SplitServer:
    """Serve ``handler`` on ``address`` ("host:port"; port 0 picks one, see ``.port``) over mutual TLS: the
    server presents ``server_cert``/``server_key`` and requires a client certificate signed by ``client_ca``.
    ``bind_identity``: a request's client_id must be the certificate's CN or a SAN. ``allowed_clients``: if
    given, only these client ids are served. ``max_workers`` threads answer concurrently; ``serialize_handler``
    runs the handler one call at a time (checks and (de)serialisation stay parallel)."""
    credentials = grpc.ssl_server_credentials([(_pem(server_key), _pem(server_cert))],
                                              root_certificates=_pem(client_ca), require_client_auth=True)
    server = SplitServer(handler, max_message_bytes=max_message_bytes, max_workers=max_workers,
                         allowed_clients=allowed_clients, bind_identity=bind_identity,
                         serialize_handler=serialize_handler)
    return server._bind(address, credentials)


def serve_insecure_for_tests(handler: Handler, address: str = "127.0.0.1:0", *,
                             max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_workers: int = 8,
                             allowed_clients: Collection[str] | None = None,
                             serialize_handler: bool = False) -> SplitServer:
    """Plaintext, no client authentication, loopback addresses only: for tests."""
    if not _is_loopback(address):
        raise ValueError(f"serve_insecure_for_tests binds loopback addresses only, not {address!r}")
    server = SplitServer(handler, max_message_bytes=max_message_bytes, max_workers=max_workers,
                         allowed_clients=allowed_clients, bind_identity=False, serialize_handler=serialize_handler)
    return server._bind(address, None)


# ----------------------------------------------------------------------------------------------- client

class GrpcTransport(ByteMeter):
    """A split client's connection to the server over mutual TLS.

    ``root_cert``: the CA that signed the server's certificate (the federation's ca.crt);
    ``client_cert``/``client_key``: this client's certificate (CN/SAN = its client id) and key. PEM bytes, PEM
    text or paths. ``server_name`` overrides the name checked against the server's certificate (default: the
    host of ``target``). ``timeout``: seconds per call. Thread-safe; ``bytes[kind]["up" | "down"]``,
    ``bytes_of(client_id)`` and ``messages`` meter the envelopes.
    """

    def __init__(self, target: str, *, root_cert: str | Path | bytes, client_cert: str | Path | bytes,
                 client_key: str | Path | bytes, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float = 120.0, server_name: str | None = None):
        credentials = grpc.ssl_channel_credentials(root_certificates=_pem(root_cert), private_key=_pem(client_key),
                                                   certificate_chain=_pem(client_cert))
        options = _grpc_options(_check_limit(max_message_bytes))
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._setup(target, grpc.secure_channel(target, credentials, options=options), max_message_bytes, timeout)

    @classmethod
    def insecure_for_tests(cls, target: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                           timeout: float = 120.0) -> GrpcTransport:
        """Plaintext to a loopback address: for tests against :func:`serve_insecure_for_tests`."""
        if not _is_loopback(target):
            raise ValueError(f"insecure_for_tests connects to loopback addresses only, not {target!r}")
        self = cls.__new__(cls)
        channel = grpc.insecure_channel(target, options=_grpc_options(_check_limit(max_message_bytes)))
        self._setup(target, channel, max_message_bytes, timeout)
        return self

    def _setup(self, target: str, channel: grpc.Channel, max_message_bytes: int, timeout: float) -> None:
        self.target = target
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout
        self._channel = channel
        self._rpc = channel.unary_unary(_METHOD)  # bytes in, bytes out
        self._ids = itertools.count(1)
        ByteMeter.__init__(self)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel is connected (e.g. the server is still starting)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise SplitTransportError(f"split server at {self.target} not reachable within {timeout} s") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, kind: str, client_id: str, tensors: Mapping[str, torch.Tensor],
             meta: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
        """One request/reply. Raises ``ProtocolError`` (a ValueError) or TypeError for what this side can see is
        wrong before sending, :class:`SplitRequestError` (a ``ProtocolError``) / :class:`SplitAuthError` /
        :class:`SplitRemoteError` for the server's refusals and :class:`SplitTransportError` when the exchange
        fails (:class:`SplitTooLargeError`, also a ``ProtocolError``, for a message over a size limit)."""
        if kind not in KINDS:
            raise ProtocolError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
        if not is_client_id(client_id):
            raise ProtocolError(f"client_id {client_id!r}: use {CLIENT_ID_RULE}")
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta is a {type(meta).__name__}, not a mapping")
        try:
            meta_json = json.dumps(dict(meta), allow_nan=False) if meta else ""
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"meta is not JSON-serialisable: {e}") from None
        request_id = next(self._ids)
        env = split_pb2.Envelope(version=PROTOCOL_VERSION, kind=kind, client_id=client_id, request_id=request_id,
                                 step=_step(meta), tensors=[encode_tensor(k, v) for k, v in tensors.items()],
                                 meta_json=meta_json)
        reply = self.exchange(env)
        if reply.HasField("error"):
            cls = _REMOTE_ERRORS.get(reply.error.code, SplitRemoteError)
            raise cls(reply.error.code, reply.error.message, kind=kind, client_id=client_id)
        if (reply.version, reply.kind, reply.client_id, reply.request_id) != (PROTOCOL_VERSION, kind, client_id,
                                                                              request_id):
            raise SplitTransportError(f"reply to {kind} request {request_id} does not match it (version "
                                      f"{reply.version}, kind {reply.kind!r}, request {reply.request_id})")
        try:
            out_meta = _check_body(reply)
        except _Refusal as r:
            raise SplitTransportError(f"malformed reply to {kind}: {r.message}") from None
        return {t.name: decode_tensor(t) for t in reply.tensors}, out_meta

    def exchange(self, envelope: split_pb2.Envelope) -> split_pb2.Envelope:
        """Send one envelope as it is and return the reply envelope as it is (error field included, not
        raised). Counts both serialised sizes under its client id and kind once the exchange completed. The
        building block of :meth:`call`; tests use it to send malformed envelopes."""
        data = envelope.SerializeToString()
        kind = envelope.kind
        if len(data) > self.max_message_bytes:
            raise SplitTooLargeError(f"the {kind} message is {len(data)} bytes, over this transport's limit of "
                                     f"{self.max_message_bytes}", status="RESOURCE_EXHAUSTED")
        try:
            raw = self._rpc(data, timeout=self.timeout)
        except grpc.RpcError as e:
            cls = SplitTooLargeError if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else SplitTransportError
            raise cls(self._describe(e, kind, len(data)), status=e.code().name) from None
        self._count(envelope.client_id, kind, len(data), len(raw))
        try:
            return split_pb2.Envelope.FromString(raw)
        except DecodeError:
            raise SplitTransportError(f"the reply to {kind} is not a {split_pb2.Envelope.DESCRIPTOR.full_name}") from None

    def _describe(self, e: grpc.RpcError, kind: str, size: int) -> str:
        code, details = e.code(), e.details()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return (f"the {kind} exchange ({size} bytes sent) exceeds a message size limit (the server's, or this "
                    f"transport's {self.max_message_bytes} for the reply): {details}")
        if code == grpc.StatusCode.UNAVAILABLE:
            return (f"split server at {self.target} unavailable for {kind}: it is down or refused the connection "
                    f"(TLS: no client certificate, one not signed by the federation's CA, or a server certificate "
                    f"not signed by root_cert): {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"no reply to {kind} from {self.target} within {self.timeout} s"
        return f"{kind} to {self.target} failed: {code.name}: {details}"
