"""Intercepted HTTPS beside direct HTTPS (issue 18): what TLS interception adds to a call.

    .venv/bin/python -m bench.tls_intercept [--calls 1000] [--new-connections 200]

Separate processes: the HTTPS upstream (its own test CA), the sidecar (``agent-sidecar run``, embedded
engine, tests/policies/fixture so that the policy's cost stays small and the same for both sidecar
variants), and this client (httpx, one call at a time). Variants:

- ``direct https``: the client to the upstream, TLS kept alive;
- ``sidecar, route prefix``: plain HTTP to the sidecar, which forwards over verified TLS (the reference:
  everything the sidecar does except terminating the agent's TLS);
- ``sidecar, intercepted https``: ``proxy=`` the sidecar and ``https://crm.example.com``: CONNECT once, a
  leaf from the pod CA, every request decided inside the kept-alive TLS connection;
- the same two HTTPS variants with a new connection per call (TCP + TLS handshake each time; through the
  sidecar also the CONNECT, with the host's leaf already cached);
- issuing a leaf for a host seen for the first time (in process: key, signature, OpenSSL context).

Prints a markdown table (docs/performance.md, "Intercepted HTTPS").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from aiohttp import web

from . import procstat
from .procs import ROOT, VENV_BIN, Proc, free_port, spawn, wait_for_port, wait_ready
from .stats import latency_summary_ms
from .upstream import Upstream

FIXTURE_POLICY = ROOT / "tests" / "policies" / "fixture"
HOST = "crm.example.com"
ROUND = 100  # calls per variant per round


async def serve_upstream(port: int, cert: str, key: str) -> None:
    upstream = Upstream(0.0)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.ServerRunner(web.Server(upstream.handle), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context, reuse_address=True).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def timed(client: httpx.Client, url: str, calls: int, warmup: int = 50) -> list[int]:
    for _ in range(warmup):
        client.get(url).raise_for_status()
    samples: list[int] = []
    for _ in range(calls):
        started = time.perf_counter()
        response = client.get(url)
        samples.append(round((time.perf_counter() - started) * 1e6))
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
    return samples


def timed_new_connections(url: str, calls: int, **options: object) -> list[int]:
    samples: list[int] = []
    for _ in range(calls):
        started = time.perf_counter()
        with httpx.Client(trust_env=False, **options) as client:  # type: ignore[arg-type]
            response = client.get(url)
            if response.status_code != 200:
                raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
        samples.append(round((time.perf_counter() - started) * 1e6))
    return samples


def leaf_issuance(hosts: int) -> list[int]:
    sys.path.insert(0, str(ROOT))
    from sidecar.proxy.tls import LeafIssuer
    from sidecar.tls_ca import development_ca

    with tempfile.TemporaryDirectory() as directory:
        names = [f"tool-{i}.example.com" for i in range(hosts)]
        issuer = LeafIssuer(development_ca(Path(directory)), frozenset(names))
        samples: list[int] = []
        for name in names:
            started = time.perf_counter()
            issuer.context_for(name)
            samples.append(round((time.perf_counter() - started) * 1e6))
        return samples


def row(name: str, samples: list[int], reference: dict[str, float] | None = None) -> str:
    summary = latency_summary_ms(samples)
    p50, p99 = summary["p50"], summary["p99"]
    added = f"{p50 - reference['p50']:.3f} | {p99 - reference['p99']:.3f}" if reference else "- | -"
    return f"| {name} | {p50:.3f} | {p99:.3f} | {added} | {len(samples)} |"


async def main_async(calls: int, new_connections: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from tls_certs import make_ca_and_server

    work = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    upstream_ca, cert, key = make_ca_and_server(work / "upstream-pki")
    upstream_port = free_port()
    procs: list[Proc] = []
    cpu: dict[str, float] = {}  # sidecar CPU-ms per 1,000 calls: robust where latency is not (a shared machine)
    try:
        upstream = spawn("tls-upstream", [sys.executable, "-m", "bench.tls_intercept", "--serve-upstream",
                                          str(upstream_port), str(cert), str(key)], work)
        procs.append(upstream)
        await wait_for_port(upstream, upstream_port)
        config: dict[str, Any] = {
            "listeners": {"proxy": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}",
                          "metrics": f"127.0.0.1:{free_port()}"},
            "state_dir": str(work / "state"),
            "policy": {"engine": "embedded", "rego_dir": str(FIXTURE_POLICY), "timeout_ms": 1000},
            "identity": {"static": "spiffe://bench/ns/agents/sa/bench-agent"},
            "routes": [{"name": "crm", "match": {"path_prefix": "/crm", "host": HOST}, "intercept_tls": True,
                        "upstream": f"https://127.0.0.1:{upstream_port}", "tls": {"ca_bundle": str(upstream_ca)}}],
        }
        config_path = work / "sidecar.yaml"
        config_path.write_text(yaml.safe_dump(config))
        sidecar = spawn("sidecar", [str(VENV_BIN / "agent-sidecar"), "run", "--config", str(config_path)], work)
        procs.append(sidecar)
        listeners: dict[str, str] = config["listeners"]
        metrics, admin, proxy = (listeners[k] for k in ("metrics", "admin", "proxy"))
        await wait_ready(sidecar, f"http://{metrics}/readyz")
        pod_ca = work / "pod-ca.pem"
        pod_ca.write_bytes(httpx.get(f"http://{admin}/ca.pem").content)

        direct_url = f"https://127.0.0.1:{upstream_port}/crm/customers/42"

        def sidecar_cpu() -> float:
            return procstat.group_cpu_ms([sidecar.pid, *procstat.children(sidecar.pid)])

        # Kept-alive variants interleaved in rounds, so that a busy machine weighs on each alike.
        direct: list[int] = []
        prefix: list[int] = []
        intercepted: list[int] = []
        cpu["prefix"] = cpu["intercepted"] = 0.0
        rounds = max(1, calls // ROUND)
        with httpx.Client(verify=str(upstream_ca), trust_env=False) as direct_client, \
                httpx.Client(trust_env=False) as prefix_client, \
                httpx.Client(proxy=f"http://{proxy}", verify=ssl.create_default_context(cafile=str(pod_ca)),
                             trust_env=False) as intercepting_client:
            for number in range(rounds):
                warmup = 50 if number == 0 else 0
                direct += timed(direct_client, direct_url, ROUND, warmup)
                before = sidecar_cpu()
                prefix += timed(prefix_client, f"http://{proxy}/crm/customers/42", ROUND, warmup)
                cpu["prefix"] += sidecar_cpu() - before
                before = sidecar_cpu()
                intercepted += timed(intercepting_client, f"https://{HOST}/customers/42", ROUND, warmup)
                cpu["intercepted"] += sidecar_cpu() - before
        for name in ("prefix", "intercepted"):
            cpu[name] = cpu[name] / (rounds * ROUND + 50) * 1000
        direct_new: list[int] = []
        intercepted_new: list[int] = []
        cpu["intercepted_new"] = 0.0
        for _ in range(max(1, new_connections // 10)):  # interleaved too, ten at a time
            direct_new += timed_new_connections(direct_url, 10, verify=str(upstream_ca))
            before = sidecar_cpu()
            intercepted_new += timed_new_connections(f"https://{HOST}/customers/42", 10, proxy=f"http://{proxy}",
                                                     verify=ssl.create_default_context(cafile=str(pod_ca)))
            cpu["intercepted_new"] += sidecar_cpu() - before
        cpu["intercepted_new"] = cpu["intercepted_new"] / len(intercepted_new) * 1000
        issuance = leaf_issuance(100)
    finally:
        for proc in reversed(procs):
            proc.stop()

    reference = latency_summary_ms(direct)
    reference_new = latency_summary_ms(direct_new)
    print(f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, one call at a time; "
          f"ms; added = minus the direct HTTPS call's same percentile.\n")
    print("| variant | p50 | p99 | added p50 | added p99 | calls |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(row("direct https (kept alive)", direct))
    print(row("sidecar, route prefix (plain HTTP in, verified TLS out)", prefix, reference))
    print(row("sidecar, intercepted https (CONNECT once, kept alive)", intercepted, reference))
    print(row("direct https, new connection per call", direct_new))
    print(row("sidecar, intercepted https, new connection per call", intercepted_new, reference_new))
    print(row("leaf issued for a host seen for the first time (in process)", issuance))
    print("\n| sidecar process CPU-ms per 1,000 calls (utime + stime) | |\n| --- | --- |")
    print(f"| route prefix (plain HTTP in, verified TLS out) | {cpu['prefix']:.0f} |")
    print(f"| intercepted https, kept alive | {cpu['intercepted']:.0f} |")
    print(f"| intercepted https, new connection per call (CONNECT + handshake each time) | {cpu['intercepted_new']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--new-connections", type=int, default=200)
    parser.add_argument("--serve-upstream", nargs=3, metavar=("PORT", "CERT", "KEY"))
    args = parser.parse_args()
    if args.serve_upstream:
        port, cert, key = args.serve_upstream
        asyncio.run(serve_upstream(int(port), cert, key))
        return
    asyncio.run(main_async(args.calls, args.new_connections))


if __name__ == "__main__":
    main()
