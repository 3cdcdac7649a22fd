"""The authentication guard against real gRPC servers on 127.0.0.1 with real mutual TLS.

A tiny generic service (raw bytes, no protos) stands in for the coordinator's: each method reports the
node name the guard bound to the call, so the tests see exactly what a handler would see.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from fedharness import health_stub
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pluralfed import auth, tls
from pluralfed.auth import AllowList, AuthInterceptor
from pluralfed.errors import InputError
from pluralfed.pki import _issue_leaf, create_ca, issue_node_cert, issue_server_cert

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 5.0
NOW = dt.datetime.now(dt.UTC)
ALLOWED = {"node-a": "Nigeria", "node-b": "Egypt", "node-old": "Germany", "node-cn": "Canada"}


class Calls:
    """Counts servicer invocations, to prove refused calls never reach one."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def hit(self) -> None:
        with self.lock:
            self.count += 1


def _tag(context: grpc.ServicerContext) -> bytes:
    # what the handler sees: authenticated_node(context) and the context variable
    return f"{auth.authenticated_node(context)}|{auth.current_node.get()}".encode()


def make_handler(calls: Calls) -> grpc.GenericRpcHandler:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.hit()
        return _tag(context)

    def act_as(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.hit()
        return b"acting as " + auth.require_self(context, request.decode()).encode()

    def who_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        calls.hit()
        for _ in range(3):
            yield _tag(context)

    def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        calls.hit()
        return b"%d from " % sum(len(r) for r in requests) + _tag(context)

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        calls.hit()
        for r in requests:
            yield r + b"@" + _tag(context)

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Who": grpc.unary_unary_rpc_method_handler(who),
            "ActAs": grpc.unary_unary_rpc_method_handler(act_as),
            "WhoStream": grpc.unary_stream_rpc_method_handler(who_stream),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    ca = root / "ca"
    create_ca(ca)
    issue_server_cert(ca, root / "server", "coordinator", ["localhost", "127.0.0.1"])
    issue_server_cert(ca, root / "server-elsewhere", "coordinator", ["coord.example.org"])
    for node_id in ("node-a", "node-b", "node-x"):
        issue_node_cert(ca, root / node_id, node_id)
    issue_node_cert(
        ca,
        root / "node-old",
        "node-old",
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW - dt.timedelta(days=1),
    )
    # a clientAuth certificate of our CA with only a CN (as an external tool might issue it)
    _issue_leaf(
        ca,
        root / "node-cn",
        common_name="node-cn",
        sans=[x509.DNSName("node-cn.example.org")],
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        days=30,
        not_before=None,
        not_after=None,
        force=False,
    )
    # another federation, with a node claiming the same identity as ours
    create_ca(root / "other-ca", common_name="other CA")
    issue_node_cert(root / "other-ca", root / "other-node-a", "node-a")
    return root


def start_server(
    interceptor: AuthInterceptor | None, server_dir: Path | None, calls: Calls
) -> tuple[grpc.Server, int]:
    interceptors: list[grpc.ServerInterceptor] = [interceptor] if interceptor is not None else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    server.add_generic_rpc_handlers([make_handler(calls)])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    if server_dir is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port(
            "127.0.0.1:0", tls.TlsFiles.from_dir(server_dir).server_credentials()
        )
    assert port
    server.start()
    return server, port


@pytest.fixture(scope="module")
def calls() -> Calls:
    return Calls()


@pytest.fixture(scope="module")
def secure_port(pki: Path, calls: Calls) -> Iterator[int]:
    server, port = start_server(AuthInterceptor(AllowList(ALLOWED)), pki / "server", calls)
    yield port
    server.stop(None)


def raw_credentials(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Credentials without our validation, to present bad certificates to the server."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def node_channel(
    pki: Path, port: int, node_dir: str, server_name_override: str | None = None
) -> grpc.Channel:
    return tls.secure_channel(
        f"127.0.0.1:{port}",
        tls.TlsFiles.from_dir(pki / node_dir),
        server_name_override=server_name_override,
    )


def raw_channel(port: int, creds: grpc.ChannelCredentials) -> grpc.Channel:
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def who(channel: grpc.Channel) -> bytes:
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Echo/Who")
    return call(b"", timeout=TIMEOUT)


def rpc_error(fn: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args)  # type: ignore[operator]
        if not isinstance(result, bytes):
            list(result)  # drain a response stream
    return info.value


# --------------------------------------------------------------------------------------------------
# admitted


def test_allowed_node_gets_through_and_handler_sees_its_name(pki: Path, secure_port: int) -> None:
    with node_channel(pki, secure_port, "node-a") as channel:
        assert who(channel) == b"Nigeria|Nigeria"
    with node_channel(pki, secure_port, "node-b") as channel:
        assert who(channel) == b"Egypt|Egypt"


def test_every_rpc_shape_is_guarded_and_bound(pki: Path, secure_port: int) -> None:
    with node_channel(pki, secure_port, "node-a") as channel:
        who_stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/test.Echo/WhoStream"
        )
        assert list(who_stream(b"", timeout=TIMEOUT)) == [b"Nigeria|Nigeria"] * 3
        upload: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
            "/test.Echo/Upload"
        )
        assert upload(iter([b"ab", b"cde"]), timeout=TIMEOUT) == b"5 from Nigeria|Nigeria"
        chat: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            "/test.Echo/Chat"
        )
        assert list(chat(iter([b"1", b"2"]), timeout=TIMEOUT)) == [
            b"1@Nigeria|Nigeria",
            b"2@Nigeria|Nigeria",
        ]
    with node_channel(pki, secure_port, "node-x") as channel:
        for call, arg in (
            (channel.unary_stream("/test.Echo/WhoStream"), b""),
            (channel.stream_unary("/test.Echo/Upload"), iter([b"x"])),
            (channel.stream_stream("/test.Echo/Chat"), iter([b"x"])),
        ):
            err = rpc_error(lambda c=call, a=arg: c(a, timeout=TIMEOUT))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_require_self(pki: Path, secure_port: int, caplog: pytest.LogCaptureFixture) -> None:
    with node_channel(pki, secure_port, "node-a") as channel:
        act_as: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Echo/ActAs")
        assert act_as(b"Nigeria", timeout=TIMEOUT) == b"acting as Nigeria"
        with caplog.at_level(logging.WARNING, logger="pluralfed.auth"):
            err = rpc_error(act_as, b"Egypt")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "authenticated as node 'Nigeria'; may not act as 'Egypt'"
    assert any(
        "identity=node-a" in r.getMessage() and "'Nigeria' claimed to be 'Egypt'" in r.getMessage()
        for r in caplog.records
    )


def test_exempt_health_check(pki: Path, secure_port: int) -> None:
    # a valid certificate that is not allow-listed may still ask whether the server is up
    with node_channel(pki, secure_port, "node-x") as channel:
        response = health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert rpc_error(who, channel).code() == grpc.StatusCode.PERMISSION_DENIED
        # but not Watch, a stream that holds a thread while open: exempt, a few of them from
        # any certificate of the CA held every thread (review, session 17)
        watch = health_stub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as err:
            next(watch)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("response_streaming", [True, False])
def test_an_exempt_request_stream_refuses_a_message_that_does_not_decode(
    pki: Path, response_streaming: bool
) -> None:
    """Diff review (session 20): an exempt request-streaming method was served as registered,
    so its handler read the `Undecodable` stand-in as if it were a request."""
    seen: list[object] = []

    def strict(data: bytes) -> bytes:
        if data == b"bad":
            raise ValueError("not a message")
        return data

    def chat(requests: Iterator[object], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            seen.append(r)
            yield b"ok"

    def count(requests: Iterator[object], context: grpc.ServicerContext) -> bytes:
        seen.extend(requests)
        return b"%d" % len(seen)

    method: grpc.RpcMethodHandler[bytes, bytes] = (
        grpc.stream_stream_rpc_method_handler(chat, request_deserializer=strict)
        if response_streaming
        else grpc.stream_unary_rpc_method_handler(count, request_deserializer=strict)
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[AuthInterceptor(AllowList(ALLOWED), exempt_methods=["/test.Open/Send"])],
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Open", {"Send": method})]
    )
    port = server.add_secure_port(
        "127.0.0.1:0", tls.TlsFiles.from_dir(pki / "server").server_credentials()
    )
    server.start()
    try:
        with node_channel(pki, port, "node-x") as channel:  # exempt: any certificate of the CA
            messages = iter([b"fine", b"bad", b"after"])
            send_chat: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
                "/test.Open/Send"
            )
            send_count: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
                "/test.Open/Send"
            )
            with pytest.raises(grpc.RpcError) as err:
                if response_streaming:
                    list(send_chat(messages, timeout=TIMEOUT))
                else:
                    send_count(messages, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message: ValueError: not a message" in str(err.value.details())
        assert seen == [b"fine"]
    finally:
        server.stop(None)


@pytest.mark.parametrize("exempt", [False, True])
def test_a_request_that_does_not_decode_is_refused_and_logged_with_its_caller(
    pki: Path, exempt: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A one-request method whose request does not decode is refused before its handler runs,
    and the refusal names the caller the guard established (nobody, where the method is open
    to any certificate)."""
    seen: list[object] = []

    def strict(data: bytes) -> bytes:
        if data == b"bad":
            raise ValueError("not a message")
        return data

    def one(request: object, context: grpc.ServicerContext) -> bytes:
        seen.append(request)
        return b"ok"

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[
            AuthInterceptor(
                AllowList(ALLOWED), exempt_methods=["/test.Strict/One"] if exempt else []
            )
        ],
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Strict",
                {"One": grpc.unary_unary_rpc_method_handler(one, request_deserializer=strict)},
            )
        ]
    )
    port = server.add_secure_port(
        "127.0.0.1:0", tls.TlsFiles.from_dir(pki / "server").server_credentials()
    )
    server.start()
    try:
        with (
            node_channel(pki, port, "node-a") as channel,
            caplog.at_level(logging.WARNING, logger="pluralfed.auth"),
        ):
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/test.Strict/One"
            )
            assert call(b"fine", timeout=TIMEOUT) == b"ok"
            err = rpc_error(call, b"bad")
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message: ValueError: not a message" in str(err.details())
        assert seen == [b"fine"]
        (line,) = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert "/test.Strict/One" in line and "reason=undecodable message" in line
        assert ("identity=-" if exempt else "identity=node-a") in line, line
    finally:
        server.stop(None)


def test_server_name_override(pki: Path, calls: Calls) -> None:
    # the certificate names only coord.example.org; the client dials 127.0.0.1
    server, port = start_server(
        AuthInterceptor(AllowList(ALLOWED)), pki / "server-elsewhere", calls
    )
    try:
        with node_channel(pki, port, "node-a") as channel:
            assert rpc_error(who, channel).code() == grpc.StatusCode.UNAVAILABLE
        with node_channel(pki, port, "node-a", server_name_override="coord.example.org") as ch:
            assert who(ch) == b"Nigeria|Nigeria"
    finally:
        server.stop(None)


# --------------------------------------------------------------------------------------------------
# refused by the guard


def test_not_in_allow_list(
    pki: Path, secure_port: int, calls: Calls, caplog: pytest.LogCaptureFixture
) -> None:
    before = calls.count
    with (
        node_channel(pki, secure_port, "node-x") as channel,
        caplog.at_level(logging.WARNING, logger="pluralfed.auth"),
    ):
        err = rpc_error(who, channel)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "certificate identity 'node-x' is not in this server's allow-list"
    assert calls.count == before, "the servicer ran for a refused call"
    (record,) = [r for r in caplog.records if r.name == "pluralfed.auth"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "/test.Echo/Who" in message and "identity=node-x" in message
    assert "not in allow-list" in message and "127.0.0.1" in message


def test_certificate_without_node_identity(pki: Path, secure_port: int, calls: Calls) -> None:
    before = calls.count
    creds = raw_credentials(
        pki / "ca" / "ca.pem", pki / "node-cn" / "cert.pem", pki / "node-cn" / "key.pem"
    )
    with raw_channel(secure_port, creds) as channel:
        err = rpc_error(who, channel)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no node identity" in (err.details() or "")
    assert calls.count == before


def test_allow_common_name(pki: Path, calls: Calls) -> None:
    interceptor = AuthInterceptor(AllowList(ALLOWED), allow_common_name=True)
    server, port = start_server(interceptor, pki / "server", calls)
    try:
        creds = raw_credentials(
            pki / "ca" / "ca.pem", pki / "node-cn" / "cert.pem", pki / "node-cn" / "key.pem"
        )
        with raw_channel(port, creds) as channel:
            assert who(channel) == b"Canada|Canada"
    finally:
        server.stop(None)


def test_secure_guard_on_insecure_port(calls: Calls) -> None:
    server, port = start_server(AuthInterceptor(AllowList(ALLOWED)), None, calls)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            err = rpc_error(who, channel)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == "mutual TLS required: connect with a pluralfed node certificate"
    finally:
        server.stop(None)


def test_unguarded_handler_fails_closed(calls: Calls) -> None:
    server, port = start_server(None, None, calls)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert rpc_error(who, channel).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)


# --------------------------------------------------------------------------------------------------
# refused in the TLS handshake: the client sees UNAVAILABLE and no handler runs


def test_no_client_certificate(pki: Path, secure_port: int, calls: Calls) -> None:
    before = calls.count
    with raw_channel(secure_port, raw_credentials(pki / "ca" / "ca.pem")) as channel:
        assert rpc_error(who, channel).code() == grpc.StatusCode.UNAVAILABLE
    assert calls.count == before


def test_certificate_from_another_ca(pki: Path, secure_port: int, calls: Calls) -> None:
    # same identity "node-a" as an allowed node, but signed by another CA
    before = calls.count
    other = pki / "other-node-a"
    creds = raw_credentials(pki / "ca" / "ca.pem", other / "cert.pem", other / "key.pem")
    with raw_channel(secure_port, creds) as channel:
        assert rpc_error(who, channel).code() == grpc.StatusCode.UNAVAILABLE
    assert calls.count == before


def test_expired_certificate(pki: Path, secure_port: int, calls: Calls) -> None:
    before = calls.count
    old = pki / "node-old"
    with pytest.raises(InputError, match="has expired"):  # our loader refuses it up front
        tls.TlsFiles.from_dir(old).channel_credentials()
    creds = raw_credentials(pki / "ca" / "ca.pem", old / "cert.pem", old / "key.pem")
    with raw_channel(secure_port, creds) as channel:
        assert rpc_error(who, channel).code() == grpc.StatusCode.UNAVAILABLE
    assert calls.count == before


def test_server_certificate_as_client_certificate(
    pki: Path, secure_port: int, calls: Calls
) -> None:
    before = calls.count
    server = pki / "server"
    creds = raw_credentials(pki / "ca" / "ca.pem", server / "cert.pem", server / "key.pem")
    with raw_channel(secure_port, creds) as channel:
        assert rpc_error(who, channel).code() == grpc.StatusCode.UNAVAILABLE
    assert calls.count == before


def test_client_does_not_trust_server_ca(pki: Path, secure_port: int, calls: Calls) -> None:
    before = calls.count
    node = pki / "node-a"
    creds = raw_credentials(pki / "other-ca" / "ca.pem", node / "cert.pem", node / "key.pem")
    with raw_channel(secure_port, creds) as channel:
        assert rpc_error(who, channel).code() == grpc.StatusCode.UNAVAILABLE
    assert calls.count == before


def test_server_certificate_with_wrong_san(pki: Path, secure_port: int) -> None:
    # the server's certificate names localhost and 127.0.0.1, not this name
    with node_channel(pki, secure_port, "node-a", server_name_override="evil.example.org") as ch:
        assert rpc_error(who, ch).code() == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------------------------------
# insecure mode


def test_insecure_mode(calls: Calls, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pluralfed.auth"):
        interceptor = AuthInterceptor(AllowList(ALLOWED), insecure=True)
    assert any("INSECURE MODE" in r.getMessage() for r in caplog.records)
    server, port = start_server(interceptor, None, calls)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert who(channel) == b"None|None"  # nothing is proved without a certificate
            act_as: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/test.Echo/ActAs"
            )
            assert act_as(b"Egypt", timeout=TIMEOUT) == b"acting as Egypt"
            err = rpc_error(act_as, b"Atlantis")
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.details() == "unknown node 'Atlantis'"
    finally:
        server.stop(None)


# --------------------------------------------------------------------------------------------------
# the allow-list


def test_allow_list_basics() -> None:
    allow = AllowList({"node-a": "India (Current national sample)"})
    assert allow.node_for("node-a") == "India (Current national sample)"
    assert allow.node_for("node-b") is None
    assert "node-a" in allow and len(allow) == 1
    assert "node-b" not in allow and "India (Current national sample)" not in allow
    assert allow.node_names == frozenset({"India (Current national sample)"})
    longest = "X" * auth.MAX_NODE_NAME  # the longest name allowed
    assert AllowList({"node-a": longest}).node_for("node-a") == longest


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({}, "empty"),
        (["node-a"], "must be a table"),
        ({"bad id": "X"}, "identity 'bad id' is not a valid node id"),
        ({"node-a": ""}, "identity 'node-a': node name must be a non-empty string"),
        ({"node-a": 3}, "node name must be a non-empty string"),
        ({"node-a": " X"}, "without surrounding spaces"),
        ({"node-a": "X" * 201}, "at most 200 characters"),
        ({"node-a": "Nige\nria"}, "must be printable"),
        ({"node-a": "Nigeria\u200b"}, "must be printable"),  # an invisible character
        ({"node-a": "X", "node-b": "X"}, "node name 'X' is given to two identities"),
        (  # NFC "ô" and NFD "o" + U+0302: they look alike and would be two groups
            {"node-a": "C\u00f4te d'Ivoire", "node-b": "Co\u0302te d'Ivoire"},
            r"node names .* \(identity 'node-a', escaped \"C\\xf4te d'Ivoire\"\) and .* "
            r"\(identity 'node-b', escaped \"Co\\u0302te d'Ivoire\"\) differ only in Unicode "
            "normalisation",
        ),
    ],
)
def test_allow_list_validation(entries: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        AllowList(entries, source="coordinator.toml")  # type: ignore[arg-type]


def test_allow_list_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text('[allow_list]\n"node-a" = "Nigeria"\nnode-b = "Egypt"\n')
    assert AllowList.from_toml(path).as_dict() == {"node-a": "Nigeria", "node-b": "Egypt"}
    path.write_text('[coordinator.allow_list]\n"node-a" = "Nigeria"\n')
    assert AllowList.from_toml(path, "coordinator.allow_list").as_dict() == {"node-a": "Nigeria"}
    with pytest.raises(InputError, match=r"no \[allow_list\] table"):
        AllowList.from_toml(path)
    # a key on the way that is a string, not a table (one containing the next key's name)
    path.write_text('coordinator = "allow_list"\n')
    with pytest.raises(InputError, match=r"no \[coordinator.allow_list\] table"):
        AllowList.from_toml(path, "coordinator.allow_list")
    path.write_text('[allow_list]\n"node a" = "Nigeria"\n')
    with pytest.raises(InputError, match=rf"{path} \[allow_list\]: identity 'node a'"):
        AllowList.from_toml(path)
    path.write_text("[allow_list\n")
    with pytest.raises(InputError, match="invalid TOML"):
        AllowList.from_toml(path)
    with pytest.raises(InputError, match="not found"):
        AllowList.from_toml(tmp_path / "missing.toml")
