"""Match a destination to a configured route. A destination that matches none is refused."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Route


@dataclass(frozen=True)
class RouteMatchResult:
    route: Route
    upstream_path: str  # the path to request on the upstream


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


class RouteTable:
    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        # Longest prefix first, so /crm/admin wins over /crm.
        self._prefixed = sorted((r for r in routes if r.match.path_prefix), key=lambda r: -len(r.match.path_prefix or ""))
        self._hosted = sorted((r for r in routes if r.match.host), key=lambda r: -len(r.match.host_path_prefix or ""))

    def by_prefix(self, path: str) -> RouteMatchResult | None:
        """Route-prefix mode: /<route prefix>/<rest> goes to the upstream's base path + /<rest>."""
        for route in self._prefixed:
            prefix = route.match.path_prefix or ""
            if _under(path, prefix):
                return RouteMatchResult(route, _join(route.upstream, path[len(prefix):] or "/"))
        return None

    def by_host(self, host: str, port: int, path: str) -> RouteMatchResult | None:
        """Forward-proxy and transparent modes: match the host (and optional path prefix); keep the path."""
        host = host.lower().rstrip(".")
        for route in self._hosted:
            wanted = route.match.host or ""
            if wanted != host and wanted != f"{host}:{port}":
                continue
            prefix = route.match.host_path_prefix
            if prefix and not _under(path, prefix):
                continue
            return RouteMatchResult(route, _join(route.upstream, path))
        return None

    def for_tunnel(self, host: str, port: int) -> Route | None:
        host = host.lower().rstrip(".")
        for route in self._hosted:
            if route.match.host in (host, f"{host}:{port}"):
                return route
        return None


def _join(upstream: str, path: str) -> str:
    """The upstream URL's own path, then the request's. Returns a path only."""
    from urllib.parse import urlsplit

    base = urlsplit(upstream).path.rstrip("/")
    return (base + path) if path.startswith("/") else f"{base}/{path}"
