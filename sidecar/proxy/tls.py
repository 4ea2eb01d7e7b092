"""TLS interception (issue 18): leaf certificates on the fly, and TLS on a connection the proxy already holds.

Two ways in, one way through:

- CONNECT host:port to a route with ``intercept_tls: true``: the proxy answers 200 and
  terminates TLS itself with a leaf for ``host`` (the client's SNI must be that host);
- transparent: a connection redirected by the iptables overlay whose first byte is a TLS
  handshake record (0x16): the route is chosen by the ClientHello's SNI; no SNI, or an SNI
  matching no intercepting route, is refused with an ``unrecognized_name`` alert and a
  refusal event, before any certificate is issued.

Either way the decrypted connection is served by a fresh connection handler of the same
proxy listener, so each request on it takes the same request path as plain HTTP: parsed,
decided on its own, credential injected, forwarded over verified TLS to the route's
upstream. Refusals are problem+json inside the TLS connection.

Leaves are ECDSA P-256 with the host as their only SAN, valid 24 hours, issued only for
hosts of intercepting routes, kept in a bounded LRU of SSL contexts and never written to
disk: the PEM is handed to OpenSSL through an anonymous in-memory file (memfd).
ALPN offers http/1.1 only.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import ssl
import struct
from asyncio import sslproto
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from ..config import Route
from ..problems import Refusal
from ..tls_ca import CertificateAuthority, IssuedLeaf

log = logging.getLogger("sidecar.proxy.tls")

TLS_HANDSHAKE_RECORD = 0x16
DEFAULT_LEAF_CACHE = 1024
ALPN = ["http/1.1"]
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h

Via = Literal["connect", "transparent"]
RefusalSink = Callable[[Refusal], None]


class LeafRefused(Exception):
    """No leaf for this host: no route intercepts it."""


def host_of(route: Route) -> str:
    """The host name of a route's ``match.host`` (without a port)."""
    host = route.match.host or ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class LeafContext(ssl.SSLContext):
    """A server context holding one leaf; knows the host it was issued for."""

    host: str
    not_after: datetime.datetime
    renew_at: datetime.datetime  # half-way through the leaf's life (a CA close to expiry gives shorter leaves)


def _server_context(cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    context = cls(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    return context


def _load_in_memory(context: ssl.SSLContext, leaf: IssuedLeaf) -> None:
    """load_cert_chain reads files only: give it an anonymous in-memory file, never one on disk."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        raise RuntimeError("TLS interception needs os.memfd_create (Linux): leaf keys are never written to disk")
    fd = memfd_create("sidecar-leaf", getattr(os, "MFD_CLOEXEC", 0))
    try:
        data = leaf.cert_pem + leaf.key_pem
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class LeafIssuer:
    """Leaf contexts for the hosts of intercepting routes, in a bounded LRU; nothing else is ever signed."""

    def __init__(self, ca: CertificateAuthority, hosts: frozenset[str], *, max_entries: int = DEFAULT_LEAF_CACHE,
                 on_refusal: RefusalSink | None = None) -> None:
        self.ca = ca
        self.hosts = hosts
        self.max_entries = max_entries
        self.on_refusal = on_refusal
        self.issued = 0  # leaves signed since start (cache misses and renewals)
        self._cache: OrderedDict[str, LeafContext] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def context_for(self, host: str) -> LeafContext:
        host = host.lower().rstrip(".")
        if host not in self.hosts:
            raise LeafRefused(f"no route intercepts TLS for {host[:255]}")
        return self._cached(host)

    def _cached(self, host: str) -> LeafContext:
        now = datetime.datetime.now(datetime.timezone.utc)
        context = self._cache.get(host)
        if context is not None and now < context.renew_at:
            self._cache.move_to_end(host)
            return context
        context = self._new_context(host, now)
        self._cache[host] = context
        self._cache.move_to_end(host)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return context

    def _new_context(self, host: str, now: datetime.datetime) -> LeafContext:
        leaf = self.ca.issue(host, now)
        self.issued += 1
        context = _server_context(LeafContext)
        assert isinstance(context, LeafContext)
        _load_in_memory(context, leaf)
        context.host = host
        context.not_after = leaf.not_after
        context.renew_at = now + (leaf.not_after - now) / 2
        context.sni_callback = self._connect_sni_check
        return context

    def _connect_sni_check(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> int | None:
        """After a CONNECT the leaf is the CONNECT host's: an SNI naming another host is refused."""
        host = getattr(context, "host", None)
        if server_name is None or server_name.lower().rstrip(".") == host:
            return None
        self._refused(Refusal("tls_sni_mismatch", f"TLS server name {server_name[:255]!r} differs from the CONNECT host {host}"))
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    def transparent_context(self, describe: str) -> ssl.SSLContext:
        """The context a redirected TLS connection starts with: it has no certificate of its own; the SNI
        callback swaps in the leaf of an intercepting route, or refuses the handshake."""
        context = _server_context()

        def choose(connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> int | None:
            if not server_name:
                self._refused(Refusal("tls_no_sni", f"redirected TLS connection{describe} sent no server name (SNI)"))
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            try:
                connection.context = self.context_for(server_name)
            except LeafRefused:
                self._refused(Refusal("tls_unknown_sni",
                                      f"no route intercepts TLS for server name {server_name[:255]!r}{describe}"))
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            except Exception as exc:  # noqa: BLE001 - a failure inside OpenSSL's callback must refuse, never pass
                log.warning("issuing a leaf for %r failed: %s", server_name[:255], type(exc).__name__)
                self._refused(Refusal("internal_error", f"no certificate could be issued ({type(exc).__name__})"))
                return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
            return None

        context.sni_callback = choose
        return context

    def _refused(self, refusal: Refusal) -> None:
        if self.on_refusal is not None:
            self.on_refusal(refusal)


@dataclass(frozen=True)
class TlsSession:
    """What a decrypted connection knows about how it arrived; read by the interceptor for each request."""

    via: Via
    connect_host: str | None = None  # CONNECT: the authority the agent asked for
    connect_port: int | None = None
    original_destination: tuple[str, int] | None = None  # transparent: SO_ORIGINAL_DST, when the kernel has it

    def port(self) -> int:
        if self.connect_port is not None:
            return self.connect_port
        if self.original_destination is not None:
            return self.original_destination[1]
        return 443


def served_host(transport: asyncio.BaseTransport) -> str | None:
    """The host whose leaf the handshake ended with (after SNI routing), or None if not intercepted."""
    ssl_object = transport.get_extra_info("ssl_object")
    context = getattr(ssl_object, "context", None)
    return context.host if isinstance(context, LeafContext) else None


class _InterceptedTls(sslproto.SSLProtocol):
    """asyncio's TLS protocol, except that a refused handshake sends its alert before the socket closes.

    (asyncio aborts the connection on a failed handshake and drops what OpenSSL queued: the client
    would see a reset instead of ``unrecognized_name``.) Relies on SSLProtocol internals present in
    CPython 3.11-3.13; tests/test_tls_intercept.py checks the alert arrives."""

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            try:
                self._process_outgoing()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - the connection is being dropped either way
                pass
        super()._on_handshake_complete(handshake_exc)


def adopt(transport: asyncio.Transport, app_protocol: asyncio.BaseProtocol, context: ssl.SSLContext, initial: bytes,
          handshake_timeout: float) -> asyncio.Future[None]:
    """Terminate TLS on a connection the proxy holds; ``app_protocol`` gets the decrypted stream.

    This is ``loop.start_tls(server_side=True)`` with two differences it needs: bytes already read
    from the socket (the ClientHello a redirected connection started with) are handed to TLS first,
    and the application protocol is told about the connection only once the handshake is done.
    The returned future is the handshake's outcome.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    tls = _InterceptedTls(loop, app_protocol, context, waiter, server_side=True, call_connection_made=True,
                               ssl_handshake_timeout=handshake_timeout)  # type: ignore[arg-type]  # a float works (loop.call_later)
    transport.pause_reading()
    transport.set_protocol(tls)
    tls.connection_made(transport)
    view = memoryview(initial)
    while view:
        buffer = tls.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        tls.buffer_updated(size)
        view = view[size:]
    transport.resume_reading()
    return waiter


def original_destination(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    """Where a connection redirected by iptables REDIRECT was going (SO_ORIGINAL_DST); None when it was not redirected."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    local = transport.get_extra_info("sockname")
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack("!H", raw[2:4])[0]
            address = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack("!H", raw[2:4])[0]
            address = socket.inet_ntoa(raw[4:8])
    except OSError:
        return None  # no conntrack entry: a direct connection
    if local is not None and (address, port) == tuple(local[:2]):
        return None  # not redirected: the kernel answers with the local address itself
    return address, port


def ca_pem_handler(cert_pem: bytes) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /ca.pem`` on the admin listener: the public certificate agents must trust."""

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=cert_pem, content_type="application/x-pem-file", headers={"Cache-Control": "max-age=60"})

    return serve
