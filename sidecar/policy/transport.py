"""httpx's transport seam, carried by aiohttp's client.

The OPA REST client keeps httpx's API, but httpx's default transport (httpcore with the
pure-Python h11 parser) spends about 0.7 ms of CPU per decision request on loopback, more than
the whole in-process evaluation; aiohttp's client, with its C parser, spends about 0.2 ms
(docs/performance.md). aiohttp is already the sidecar's upstream client.

Errors are mapped to httpx's exception types, so callers catch exactly what they would with
httpx's own transport. Response bodies are passed through undecoded: httpx decodes them from
their Content-Encoding as usual.
"""

from __future__ import annotations

import aiohttp
import httpx

# Headers aiohttp would otherwise add or compute itself; httpx has already set the ones it wants.
_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
_NOT_FORWARDED = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One pooled aiohttp session (keep-alive), opened on the first request inside the running loop."""

    def __init__(self, *, max_connections: int = 64) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                                  skip_auto_headers=_SKIP_AUTO_HEADERS, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._open()
        body = await request.aread()
        headers = [(name, value) for name, value in request.headers.multi_items() if name.lower() not in _NOT_FORWARDED]
        try:
            async with session.request(request.method, str(request.url), data=body or None, headers=headers,
                                       timeout=_timeout(request), allow_redirects=False) as response:
                content = await response.read()
                return httpx.Response(response.status, headers=[(k.decode("latin-1"), v.decode("latin-1"))
                                                                for k, v in response.raw_headers],
                                      content=content, request=request)
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timeout", request=request) from exc
        except aiohttp.ServerTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "read timeout", request=request) from exc
        except TimeoutError as exc:
            raise httpx.ReadTimeout("timed out", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _timeout(request: httpx.Request) -> aiohttp.ClientTimeout:
    """httpx's four timeouts as aiohttp's: waiting for a pooled connection counts toward connect."""
    limits = request.extensions.get("timeout", {})
    pool, connect, read = limits.get("pool"), limits.get("connect"), limits.get("read")
    waiting = None if pool is None and connect is None else (pool or 0.0) + (connect or 0.0)
    return aiohttp.ClientTimeout(total=None, connect=waiting, sock_connect=connect, sock_read=read)
