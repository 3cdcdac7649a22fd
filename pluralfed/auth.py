"""Authentication of callers, in one place: a gRPC server interceptor that guards every method of
the coordinator (callers are group nodes) and of the reward service (callers are its clients).

Layers, outermost first:

1. TLS handshake (`pluralfed.tls.load_server_credentials`, require_client_auth): a client with no
   certificate, a certificate from another CA, an expired one, or one without clientAuth never gets a
   connection; it sees UNAVAILABLE and no handler runs.
2. `AuthInterceptor`: maps the verified certificate identity (``pluralfed://node/<id>``) to a node name
   through the `AllowList`. No identity -> UNAUTHENTICATED; identity not listed -> PERMISSION_DENIED.
   Otherwise the node name is bound to the call: `authenticated_node(context)` / `current_node`.
3. Handlers: a node may act only as itself -> `require_self(context, claimed_name)` whenever a
   message names the node it speaks for.

grpc's Python server interceptors see only the method name, not the peer, so the interceptor wraps the
returned handler's behaviour (all four arities) and checks ``context.auth_context()`` before the servicer
runs. This module guards the synchronous ``grpc.server``; a ``grpc.aio`` server would need an async twin.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import tomllib
import unicodedata
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc

from pluralfed.config import MAX_TOML_BYTES
from pluralfed.errors import InputError, quoted
from pluralfed.fsutil import InputTooLarge, read_input_bytes, size_text
from pluralfed.logthrottle import LogThrottle
from pluralfed.protocol import MAX_GROUP_NAME
from pluralfed.tls import (
    NODE_ID_PATTERN,
    RevocationList,
    identity_from_auth_context,
    load_revocation_list,
    peer_certificate,
    peer_serial,
)
from pluralfed.transport import StreamDeadlines, Undecodable, decoded_requests, never_raising

log = logging.getLogger(__name__)

# How long a call may take to send its one request (Join, GetTask, Heartbeat, ...): a client sends
# it with the call, so this only ever cuts a peer holding a thread with a call it never completes.
REQUEST_TIMEOUT_S = 10.0

# Methods any TLS peer may call without an allow-listed identity: serving status reveals nothing.
# Only Check, a one-shot call: Watch is a stream that holds an RPC thread for as long as the
# peer keeps it open, so exempt Watches from any certificate of the CA (even a revoked one) could
# hold every thread (review, session 17); Watch goes through the guard and the per-caller limit.
HEALTH_METHODS: frozenset[str] = frozenset({"/grpc.health.v1.Health/Check"})
DEFAULT_EXEMPT_METHODS = HEALTH_METHODS
# Calls of exempt methods in flight at once, server-wide. A Check holds an RPC thread until its
# request arrives (up to REQUEST_TIMEOUT_S), and any certificate of the CA may send one, even one
# the allow-list does not name or the CA revoked, and from as many connections as it likes: a few
# connections of held Checks held every thread, and nodes' heartbeats waited 10 s (review,
# session 22). Past this bound they are refused at once; a health checker sends one at a time,
# and under such a flood it is the health check that fails, not the nodes.
MAX_EXEMPT_CALLS = 4
_EXEMPT = "(methods open to any certificate)"  # their key in the call limit
MAX_NODE_NAME = MAX_GROUP_NAME  # node names are group names

# The node name of the call being handled on this thread (None outside a guarded call or in insecure
# mode): for code below the handler that has no `context` at hand, e.g. logging.
current_node: ContextVar[str | None] = ContextVar("pluralfed_current_node", default=None)


@dataclass(frozen=True)
class Principal:
    """Who a call is from, as the guard established it."""

    node: str | None  # the node name the certificate proved; None in insecure mode
    identity: str | None  # the certificate identity (node id); None in insecure mode
    insecure: bool
    known_nodes: frozenset[str]


class AllowList:
    """Certificate identity (the node id in ``pluralfed://node/<id>``) -> node name (e.g. a group).

    One node name per identity and one identity per node name, so "acting as yourself" is unambiguous.
    """

    def __init__(self, entries: Mapping[str, str], *, source: str = "allow-list") -> None:
        if not isinstance(entries, Mapping):
            raise InputError(
                f"{source}: the allow-list must be a table of identity = node name, "
                f"got {type(entries).__name__}"
            )
        if not entries:
            raise InputError(f"{source}: the allow-list is empty; no node could ever connect")
        by_name: dict[str, str] = {}
        by_nfc: dict[str, str] = {}  # NFC form of each node name -> the name as written
        clean: dict[str, str] = {}
        for identity, name in entries.items():
            if not isinstance(identity, str) or NODE_ID_PATTERN.fullmatch(identity) is None:
                raise InputError(
                    f"{source}: identity {identity!r} is not a valid node id (1-64 characters "
                    "from A-Z a-z 0-9 . _ -, starting with a letter or digit)"
                )
            if not isinstance(name, str) or not name.strip():
                raise InputError(
                    f"{source}: identity {identity!r}: node name must be a non-empty string, "
                    f"got {name!r}"
                )
            if name != name.strip() or len(name) > MAX_NODE_NAME or not name.isprintable():
                raise InputError(
                    f"{source}: identity {identity!r}: node name {name!r} must be printable, at most "
                    f"{MAX_NODE_NAME} characters, without surrounding spaces"
                )
            if name in by_name:
                raise InputError(
                    f"{source}: node name {name!r} is given to two identities, {by_name[name]!r} "
                    f"and {identity!r}; each node needs its own certificate"
                )
            nfc = unicodedata.normalize("NFC", name)
            if nfc in by_nfc and by_nfc[nfc] != name:  # two groups that look the same
                other = by_nfc[nfc]
                raise InputError(
                    f"{source}: node names {other!r} (identity {by_name[other]!r}, escaped "
                    f"{other!a}) and {name!r} (identity {identity!r}, escaped {name!a}) "
                    "differ only in Unicode normalisation (equal in NFC); spell them the same"
                )
            by_nfc[nfc] = name
            by_name[name] = identity
            clean[identity] = name
        self._entries = clean
        self.source = source

    @classmethod
    def from_toml(cls, path: str | Path, table: str | None = "allow_list") -> AllowList:
        """Load from a TOML file; `table` is the dotted key of the table (None: the whole file).

        Example::

            [allow_list]
            "node-nigeria" = "Nigeria"
            "node-egypt" = "Egypt"
        """
        p = Path(path)
        try:
            document: Any = tomllib.loads(read_input_bytes(p, MAX_TOML_BYTES).decode("utf-8"))
        except InputTooLarge:
            raise InputError(
                f"allow-list file {p}: more than {size_text(MAX_TOML_BYTES)}, too large for an "
                "allow-list"
            ) from None
        except FileNotFoundError:
            raise InputError(f"allow-list file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"allow-list file {p} could not be read: {err}") from None
        except tomllib.TOMLDecodeError as err:
            raise InputError(f"allow-list file {p}: invalid TOML: {err}") from None
        except RecursionError:  # tomllib recurses into nested arrays and inline tables
            raise InputError(f"allow-list file {p}: invalid TOML: nested too deeply") from None
        return cls.from_document(document, p, table)

    @classmethod
    def from_document(
        cls, document: Mapping[str, Any], path: str | Path, table: str | None = "allow_list"
    ) -> AllowList:
        """The list in the TOML `document` already read from `path` (named in messages)."""
        p = Path(path)
        data: Any = document
        where = str(p)
        if table:
            for part in table.split("."):
                if not isinstance(data, dict) or part not in data:
                    raise InputError(f"{p}: no [{table}] table (identity = node name)")
                data = data[part]
            where = f"{p} [{table}]"
        return cls(data, source=where)

    def node_for(self, identity: str) -> str | None:
        return self._entries.get(identity)

    @property
    def node_names(self) -> frozenset[str]:
        return frozenset(self._entries.values())

    def as_dict(self) -> dict[str, str]:
        return dict(self._entries)

    def __contains__(self, identity: object) -> bool:
        return identity in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"AllowList({self._entries!r})"


# Principal of each call in flight, keyed by its ServicerContext (weakly: a context that is never
# cleaned up explicitly still goes away with its call).
_calls: weakref.WeakKeyDictionary[Any, Principal] = weakref.WeakKeyDictionary()
_calls_lock = threading.Lock()


def _bind(context: grpc.ServicerContext, principal: Principal) -> None:
    with _calls_lock:
        _calls[context] = principal


def _unbind(context: grpc.ServicerContext) -> None:
    with _calls_lock:
        _calls.pop(context, None)


class RefusalLog:
    """Logs the first refusal of each (caller, reason) and then at most one a minute, with a count
    of those left out: a client refused in a loop (a revoked certificate, say) must not be able to
    fill the coordinator's disk with log lines."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self._throttle = LogThrottle(interval_s)

    def log(self, method: str, identity: str | None, peer: str, reason: str) -> None:
        caller = identity or peer.rsplit(":", 1)[0]  # a peer's port changes with each connection
        more = self._throttle.admit((caller, reason))
        if more is not None:
            log.warning(
                "refused %s: identity=%s peer=%s reason=%s%s",
                method,
                identity or "-",
                peer,
                reason,
                more,
            )

    def forget(self) -> None:
        """Log the next refusal of every caller again (tests that look for one)."""
        self._throttle.forget()


_refusals = RefusalLog()


def present(behaviour: Callable[..., Any] | None, method: str) -> Callable[..., Any]:
    """The behaviour of a handler's kind (gRPC fills exactly the one its streaming flags name)."""
    if behaviour is None:
        raise RuntimeError(f"the handler of {method} has no behaviour for its kind")
    return behaviour


def _refuse(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    *,
    method: str,
    identity: str | None,
    reason: str,
) -> NoReturn:
    _refusals.log(method, identity, context.peer(), reason)
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # grpc's abort always raises


def principal(context: grpc.ServicerContext) -> Principal:
    """The guard's record for this call; aborts (fail closed) if the call never passed the guard."""
    with _calls_lock:
        found = _calls.get(context)
    if found is None:
        log.error(
            "handler asked for the caller of a call the auth guard never saw: misconfiguration"
        )
        _refuse(
            context,
            grpc.StatusCode.UNAUTHENTICATED,
            "caller not authenticated",
            method="(unguarded handler)",
            identity=None,
            reason="call did not pass the AuthInterceptor (is it installed on the server?)",
        )
    return found


def authenticated_node(context: grpc.ServicerContext) -> str | None:
    """The node name the caller's certificate proved (None in insecure mode, where nothing is proved)."""
    return principal(context).node


def require_self(context: grpc.ServicerContext, claimed_name: str) -> str:
    """Abort PERMISSION_DENIED unless the caller is `claimed_name`: a node may act only as itself.

    In insecure mode there is no certificate, so the claim is trusted if it names a known node.
    Returns the node name to act as.
    """
    who = principal(context)
    if who.insecure:
        if claimed_name not in who.known_nodes:
            _refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"unknown node {quoted(claimed_name)}",
                method="(require_self)",
                identity=None,
                reason=f"insecure mode: claimed node {quoted(claimed_name)} is not in the "
                "allow-list",
            )
        return claimed_name
    if claimed_name != who.node:
        _refuse(
            context,
            grpc.StatusCode.PERMISSION_DENIED,
            f"authenticated as node {who.node!r}; may not act as {quoted(claimed_name)}",
            method="(require_self)",
            identity=who.identity,
            reason=f"node {who.node!r} claimed to be {quoted(claimed_name)}",
        )
    return claimed_name


class RevocationWatch:
    """A server's view of its CA's revocation list (``crl.pem`` from `pluralfed certs revoke`).

    Loaded and verified at start, where a bad file is an error. Then re-read when the file changes
    (checked at most every `interval` seconds, on the calls themselves), so a revocation takes
    effect without a restart, on connections already open too. A changed file that does not load
    (half-copied, from another CA, deleted, or signed before the list in force) is logged and the
    list in force stays: revocations never lapse through a bad edit.
    """

    def __init__(self, crl_path: str | Path, ca_path: str | Path, interval: float = 1.0) -> None:
        self.path, self.ca_path, self.interval = Path(crl_path), Path(ca_path), interval
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._current = load_revocation_list(self.path, self.ca_path)
        self._checked = time.monotonic()
        log.info("revocation list %s: %d revoked certificates", self.path, len(self))

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> RevocationList:
        now = time.monotonic()
        if now - self._checked < self.interval:
            return self._current
        with self._lock:
            if now - self._checked < self.interval:
                return self._current
            self._checked = now
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._current = load_revocation_list(
                        self.path, self.ca_path, in_force=self._current
                    )
                    log.info("revocation list %s reloaded: %d revoked", self.path, len(self))
                except InputError as err:
                    log.error("%s; the previous list (%d revoked) stays in force", err, len(self))
            return self._current

    def __len__(self) -> int:
        return len(self._current.serials)


class CallLimit:
    """At most `limit` calls in flight per caller (a node, or a reward-service client), so one
    caller (hostile or broken) cannot take every RPC thread: a call that would pass the limit is
    refused at once, holding no thread.

    A call counts while its context is active, so a call whose end this guard never saw (a response
    stream gRPC dropped before its first message) stops counting when gRPC ends it.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the calls allowed per node must be at least 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._calls: dict[str, weakref.WeakSet[Any]] = {}

    def enter(self, node: str, context: Any) -> bool:
        """Count this call for `node`; False (nothing counted) if the node is at its limit."""
        with self._lock:
            calls = self._calls.setdefault(node, weakref.WeakSet())
            for ended in [c for c in calls if not c.is_active()]:
                calls.discard(ended)
            if len(calls) >= self.limit:
                return False
            calls.add(context)
            return True

    def leave(self, node: str, context: Any) -> None:
        with self._lock:
            calls = self._calls.get(node)
            if calls is not None:
                calls.discard(context)

    def in_flight(self, node: str) -> int:
        with self._lock:
            return sum(1 for c in self._calls.get(node, ()) if c.is_active())


class AuthInterceptor(grpc.ServerInterceptor):
    """Install on a server (the coordinator's, the reward service's):
    ``grpc.server(pool, interceptors=[AuthInterceptor(al)])``.

    `exempt_methods` (full names like ``/grpc.health.v1.Health/Check``) run without an allow-listed
    identity; they still need the TLS handshake. `allow_common_name` also accepts the subject CN of a
    certificate without a pluralfed node URI (externally issued certificates). With `revocations`,
    a certificate whose serial the CA has revoked is refused (PERMISSION_DENIED) even though its
    identity is allow-listed. With `max_calls_per_node`, a node with that many calls in flight has
    the next refused (RESOURCE_EXHAUSTED) before any handler runs. `insecure=True` is for demos
    without certificates only: nothing is checked and `require_self` trusts claimed names.
    """

    def __init__(
        self,
        allow_list: AllowList,
        *,
        exempt_methods: Iterable[str] = DEFAULT_EXEMPT_METHODS,
        allow_common_name: bool = False,
        insecure: bool = False,
        revocations: RevocationWatch | None = None,
        max_calls_per_node: int | None = None,
    ) -> None:
        self.allow_list = allow_list
        self.call_limit = CallLimit(max_calls_per_node) if max_calls_per_node else None
        self.exempt_calls = CallLimit(MAX_EXEMPT_CALLS)
        self.request_deadlines = StreamDeadlines(
            f"a call sent no request within {REQUEST_TIMEOUT_S:g} s: cancelled"
        )
        self.revocations = revocations
        self.exempt_methods = frozenset(exempt_methods)
        self.allow_common_name = allow_common_name
        self.insecure = insecure
        if insecure:
            log.warning(
                "\n" + "!" * 78 + "\n"
                "!!! INSECURE MODE: no TLS, no client certificates. Any client that can reach this\n"
                "!!! port can claim to be any node in the allow-list. Use only for local demos.\n"
                + "!"
                * 78
            )

    def authenticate(self, context: grpc.ServicerContext, method: str) -> Principal:
        """The caller's `Principal`, or abort UNAUTHENTICATED / PERMISSION_DENIED."""
        known = self.allow_list.node_names
        if self.insecure:
            return Principal(node=None, identity=None, insecure=True, known_nodes=known)
        # gRPC gives each property as a list of bytes (its type stubs say bytes)
        auth_context = cast(Mapping[str, Iterable[bytes]], context.auth_context())
        identity = identity_from_auth_context(
            auth_context, allow_common_name=self.allow_common_name
        )
        if identity is None:
            transport = b"".join(auth_context.get("transport_security_type", [])).decode(
                errors="replace"
            )
            if transport != "ssl":
                _refuse(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "mutual TLS required: connect with a pluralfed node certificate",
                    method=method,
                    identity=None,
                    reason=f"transport {transport or 'unknown'!r} is not TLS",
                )
            _refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "no node identity in the client certificate: use a certificate from "
                "`pluralfed certs node`",
                method=method,
                identity=None,
                reason="verified certificate carries no pluralfed node identity",
            )
        self._check_not_expired(context, auth_context, method, identity)
        if self.revocations is not None:
            self._check_not_revoked(context, auth_context, method, identity)
        node = self.allow_list.node_for(identity)
        if node is None:
            _refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate identity {identity!r} is not in this server's allow-list",
                method=method,
                identity=identity,
                reason="identity not in allow-list",
            )
        return Principal(node=node, identity=identity, insecure=False, known_nodes=known)

    def _check_not_expired(
        self, context: grpc.ServicerContext, auth_context: Any, method: str, identity: str
    ) -> None:
        """TLS checks validity at the handshake only; a connection kept open (keepalive) must not
        outlive its certificate."""
        cert = peer_certificate(auth_context)
        if cert is not None and cert.not_valid_after_utc < dt.datetime.now(dt.UTC):
            expired = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
            _refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"the certificate of {identity!r} expired at {expired}: renew it "
                "(`pluralfed certs node`) and connect again",
                method=method,
                identity=identity,
                reason=f"certificate expired at {expired}",
            )

    def _check_not_revoked(
        self, context: grpc.ServicerContext, auth_context: Any, method: str, identity: str
    ) -> None:
        assert self.revocations is not None
        serial = peer_serial(auth_context)
        if serial is None:
            _refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate could not be read to check it against the revocation list",
                method=method,
                identity=identity,
                reason="no readable peer certificate",
            )
        revoked = self.revocations.current()
        if revoked.is_revoked(serial):
            _refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the certificate of {identity!r} (serial {serial:x}) has been revoked",
                method=method,
                identity=identity,
                reason=f"certificate revoked in {revoked.path}",
            )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None:
            return handler
        return self._guard(handler, method, exempt=method in self.exempt_methods)

    def _guard(
        self, handler: grpc.RpcMethodHandler, method: str, *, exempt: bool
    ) -> grpc.RpcMethodHandler:
        """The handler with the caller checked (unless `exempt`) before its behaviour runs.

        A method with one request is served as a request stream (the same bytes on the wire):
        gRPC's own unary handling holds a thread until the request arrives, before any check,
        so a peer that never sent it held the thread for good (and enough such calls, every
        thread). Served so, the caller is checked and counted first, and the request is read
        under a deadline (REQUEST_TIMEOUT_S)."""
        kwargs = {
            # a request that does not decode reaches the handler as `Undecodable`: a raising
            # deserializer costs the server memory for good in gRPC (see `Undecodable`)
            "request_deserializer": never_raising(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming and exempt:  # nobody checked, but nothing undecodable read
            if handler.response_streaming:
                streaming = self._exempt(present(handler.stream_stream, method), method, True)
                return grpc.stream_stream_rpc_method_handler(
                    lambda requests, ctx: streaming(self._refusing(requests, ctx, method), ctx),
                    **kwargs,
                )
            unary = self._exempt(present(handler.stream_unary, method), method, False)
            return grpc.stream_unary_rpc_method_handler(
                lambda requests, ctx: unary(self._refusing(requests, ctx, method), ctx), **kwargs
            )
        if handler.request_streaming and handler.response_streaming:
            behaviour = present(handler.stream_stream, method)
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, ctx: self._stream(
                    behaviour, decoded_requests(requests), ctx, method
                ),
                **kwargs,
            )
        if handler.request_streaming:
            behaviour = present(handler.stream_unary, method)
            return grpc.stream_unary_rpc_method_handler(
                lambda requests, ctx: self._unary(
                    behaviour, decoded_requests(requests), ctx, method
                ),
                **kwargs,
            )
        if handler.response_streaming:
            one = self._one_request(present(handler.unary_stream, method), method)
            if exempt:
                return grpc.stream_stream_rpc_method_handler(
                    self._exempt(one, method, True), **kwargs
                )
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, ctx: self._stream(one, requests, ctx, method), **kwargs
            )
        one = self._one_request(present(handler.unary_unary, method), method)
        if exempt:
            return grpc.stream_unary_rpc_method_handler(self._exempt(one, method, False), **kwargs)
        return grpc.stream_unary_rpc_method_handler(
            lambda requests, ctx: self._unary(one, requests, ctx, method), **kwargs
        )

    def _exempt(
        self, behaviour: Callable[[Any, Any], Any], method: str, streaming: bool
    ) -> Callable[[Any, Any], Any]:
        """`behaviour` of an exempt method, counted against MAX_EXEMPT_CALLS before it waits
        for anything (a call past the bound is refused RESOURCE_EXHAUSTED at once); a response
        stream counts until it ends."""

        def call(requests: Any, context: grpc.ServicerContext) -> Any:
            if not self.exempt_calls.enter(_EXEMPT, context):
                _refuse(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{MAX_EXEMPT_CALLS} calls of methods open to any certificate are already "
                    "in flight: try again shortly",
                    method=method,
                    identity=None,
                    reason=f"more than {MAX_EXEMPT_CALLS} exempt calls in flight",
                )

            def leave() -> None:
                self.exempt_calls.leave(_EXEMPT, context)

            try:
                result = behaviour(requests, context)
                if streaming:
                    return _counted(iter(result), leave)
            except BaseException:
                leave()
                raise
            leave()
            return result

        return call

    @staticmethod
    def _refusing(
        requests: Iterator[Any], context: grpc.ServicerContext, method: str
    ) -> Iterator[Any]:
        """An exempt method's request stream, the call refused where a message did not decode
        (as the guard's own methods refuse one; the handler never sees an `Undecodable`)."""
        for request in requests:
            if isinstance(request, Undecodable):
                _refuse(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    request.describe(),
                    method=method,
                    identity=None,
                    reason=f"undecodable {request.message_type}",
                )
            yield request

    def _one_request(
        self, behaviour: Callable[[Any, Any], Any], method: str
    ) -> Callable[[Any, Any], Any]:
        """`behaviour` of a one-request method, fed from a request stream: the request is read
        under REQUEST_TIMEOUT_S (the call is cancelled past it); a stream without one, or with
        one that does not decode, is refused."""

        def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            with self.request_deadlines.watch(context, REQUEST_TIMEOUT_S):
                try:
                    request = next(requests)
                except StopIteration:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carries no request")
                except grpc.RpcError:  # cancelled: no request within REQUEST_TIMEOUT_S
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no request within {REQUEST_TIMEOUT_S:g} s",
                    )
            if isinstance(request, Undecodable):
                with _calls_lock:
                    caller = _calls.get(context)  # None for an exempt method
                _refuse(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    request.describe(),
                    method=method,
                    identity=caller.identity if caller else None,
                    reason=f"undecodable {request.message_type}",
                )
            return behaviour(request, context)

        return call

    def _unary(
        self, behaviour: Callable[[Any, Any], Any], arg: Any, context: Any, method: str
    ) -> Any:
        who = self.authenticate(context, method)
        self._enter(who, context, method)
        _bind(context, who)
        token = current_node.set(who.node)
        try:
            return behaviour(arg, context)
        finally:
            current_node.reset(token)
            _unbind(context)
            self._leave(who, context)

    def _stream(
        self, behaviour: Callable[[Any, Any], Iterable[Any]], arg: Any, context: Any, method: str
    ) -> Iterator[Any]:
        # Authenticate before the servicer is even called, not lazily on the first response.
        who = self.authenticate(context, method)
        self._enter(who, context, method)
        _bind(context, who)
        token = current_node.set(who.node)
        try:
            responses = iter(behaviour(arg, context))
        except BaseException:
            _unbind(context)
            self._leave(who, context)
            raise
        finally:
            current_node.reset(token)
        return _bound_iterator(responses, who, context, lambda: self._leave(who, context))

    def _enter(self, who: Principal, context: Any, method: str) -> None:
        if self.call_limit is None or who.node is None:
            return
        if not self.call_limit.enter(who.node, context):
            _refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.call_limit.limit} calls with this certificate are already in flight: "
                "finish or cancel one first",
                method=method,
                identity=who.identity,
                reason=f"more than {self.call_limit.limit} calls in flight",
            )

    def _leave(self, who: Principal, context: Any) -> None:
        if self.call_limit is not None and who.node is not None:
            self.call_limit.leave(who.node, context)


def _counted(responses: Iterator[Any], done: Callable[[], None]) -> Iterator[Any]:
    """`responses`, with `done` run when the stream ends."""
    try:
        yield from responses
    finally:
        close = getattr(responses, "close", None)
        if close is not None:
            close()
        done()


def _bound_iterator(
    responses: Iterator[Any], who: Principal, context: Any, done: Callable[[], None]
) -> Iterator[Any]:
    """Run each step of a response stream with `current_node` set (set and reset per step, so the
    variable never leaks into the server thread between responses); `done` runs when it ends."""
    try:
        while True:
            token = current_node.set(who.node)
            try:
                item = next(responses)
            except StopIteration:
                return
            finally:
                current_node.reset(token)
            yield item
    finally:
        close = getattr(responses, "close", None)
        if close is not None:
            close()
        _unbind(context)
        done()
