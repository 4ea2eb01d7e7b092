"""The pod-local CA and its leaves (issue 18 item 1): generated or loaded, key permissions enforced,
leaves issued only for intercepting routes' hosts, short-lived, in a bounded cache, never on disk."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from harness import sidecar_config
from sidecar.app import build_tls
from sidecar.cli import main
from sidecar.config import ConfigError, parse_config
from sidecar.proxy.tls import LeafContext, LeafIssuer, LeafRefused
from sidecar.tls_ca import CaError, development_ca, generate_ca, load_ca


def config_with(tmp_path: Path, **overrides: Any) -> Any:
    data = sidecar_config(tmp_path, "https://127.0.0.1:9")
    data.update(overrides)
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_config(data, path)


def intercepting(host: str = "crm.example.com") -> list[dict[str, Any]]:
    return [{"name": "crm", "match": {"host": host}, "upstream": "https://127.0.0.1:9", "intercept_tls": True}]


def test_ca_generate_command_writes_an_owner_only_key_and_never_overwrites(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "generate", str(tmp_path / "ca")]) == 0
    cert, key = tmp_path / "ca" / "ca.pem", tmp_path / "ca" / "ca-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in capsys.readouterr().out
    ca = load_ca(cert, key)
    constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True and constraints.path_length == 0
    before = key.read_bytes()
    assert main(["ca", "generate", str(tmp_path / "ca")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert key.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_ca_key_others_can_read_is_refused_naming_the_file(tmp_path: Path, mode: int) -> None:
    cert, key = generate_ca(tmp_path / "ca")
    os.chmod(key, mode)
    with pytest.raises(CaError, match=str(key)):
        load_ca(cert, key)
    config = config_with(tmp_path, routes=intercepting(), tls_interception={"ca_cert": str(cert), "ca_key": str(key)})
    with pytest.raises(ConfigError) as refused:
        build_tls(config)
    assert str(key) in str(refused.value) and f"{mode:04o}" in str(refused.value)


def test_ca_install_copies_a_secret_volume_owner_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What the agent-sidecar-tls-ca init container does: the kubelet's 0440 copy becomes 0600."""
    cert, key = generate_ca(tmp_path / "secret")
    os.chmod(key, 0o440)  # a Secret volume file under the pod's fsGroup
    with pytest.raises(CaError):
        load_ca(cert, key)
    assert main(["ca", "install", str(tmp_path / "secret"), str(tmp_path / "tls-ca")]) == 0
    installed = tmp_path / "tls-ca" / "ca-key.pem"
    assert installed.stat().st_mode & 0o777 == 0o600
    assert load_ca(tmp_path / "tls-ca" / "ca.pem", installed).cert_pem == cert.read_bytes()
    assert "PRIVATE KEY" not in capsys.readouterr().out
    os.chmod(key, 0o444)
    assert main(["ca", "install", str(tmp_path / "secret"), str(tmp_path / "again")]) == 2
    assert "readable by others" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path: Path) -> None:
    cert, _ = generate_ca(tmp_path / "one")
    _, other_key = generate_ca(tmp_path / "two")
    with pytest.raises(CaError, match="does not belong"):
        load_ca(cert, other_key)


def test_the_development_ca_is_generated_once_in_state_dir_and_reused(tmp_path: Path) -> None:
    config = config_with(tmp_path, routes=intercepting())
    first = build_tls(config)
    second = build_tls(config)
    assert first is not None and second is not None
    assert first.ca.cert_pem == second.ca.cert_pem
    assert first.ca.cert_path == config.state_dir / "tls-ca" / "ca.pem"
    assert "PRIVATE KEY" not in repr(first.ca) and "PRIVATE KEY" not in repr(first.ca.issue("crm.example.com"))


def test_no_ca_without_an_intercepting_route(tmp_path: Path) -> None:
    assert build_tls(config_with(tmp_path)) is None
    assert not (tmp_path / "state" / "tls-ca").exists()


@pytest.mark.parametrize("routes, tls, message", [
    ([{"name": "x", "match": {"path_prefix": "/x"}, "upstream": "https://a.example", "intercept_tls": True}], None,
     "routes[0].intercept_tls: needs match.host"),
    (intercepting(), {"ca_cert": "ca.pem"}, "tls_interception.ca_key: is required"),
    ([{**intercepting()[0], "tls": {"verify": False}}], None, "routes[0].tls.verify: cannot be false with intercept_tls"),
    (intercepting(), {"ca_cert": "missing.pem", "ca_key": "missing-key.pem"}, "tls_interception.ca_cert: no such file"),
])
def test_config_errors(tmp_path: Path, routes: Any, tls: Any, message: str) -> None:
    overrides: dict[str, Any] = {"routes": routes}
    if tls is not None:
        overrides["tls_interception"] = tls
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_with(tmp_path, **overrides)


def test_a_leaf_is_p256_for_exactly_its_host_short_lived_and_chains_to_the_ca(tmp_path: Path) -> None:
    ca = development_ca(tmp_path)
    now = datetime.datetime.now(datetime.timezone.utc)
    for host, san in (("crm.example.com", x509.DNSName("crm.example.com")),
                      ("10.1.2.3", x509.IPAddress(ipaddress.ip_address("10.1.2.3")))):
        leaf = ca.issue(host)
        certificate = x509.load_pem_x509_certificates(leaf.cert_pem)[0]
        public = certificate.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
        assert list(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [san]
        assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        assert certificate.not_valid_after_utc - now <= datetime.timedelta(hours=24, minutes=1)
        certificate.verify_directly_issued_by(ca.certificate)


def test_a_leaf_is_never_issued_for_a_host_without_an_intercepting_route(tmp_path: Path) -> None:
    issuer = LeafIssuer(development_ca(tmp_path), frozenset({"crm.example.com"}))
    for host in ("evil.example.com", "crm.example.com.evil.example", "example.com", "*.example.com", ""):
        with pytest.raises(LeafRefused):
            issuer.context_for(host)
    assert issuer.issued == 0 and len(issuer) == 0
    assert issuer.context_for("CRM.example.com.").host == "crm.example.com"
    assert issuer.issued == 1


def test_leaves_live_in_memory_only(tmp_path: Path) -> None:
    ca = development_ca(tmp_path / "state")
    issuer = LeafIssuer(ca, frozenset(f"h{i}.example.com" for i in range(20)))
    before = sorted(p for p in tmp_path.rglob("*"))
    for i in range(20):
        issuer.context_for(f"h{i}.example.com")
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not [f for f in os.listdir(f"/proc/{os.getpid()}/fd") if "sidecar-leaf" in os.path.realpath(f"/proc/self/fd/{f}")]


def test_the_leaf_cache_stays_bounded_under_10000_distinct_host_names(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = [f"tool-{i}.example.com" for i in range(10_000)]
    issuer = LeafIssuer(development_ca(tmp_path), frozenset(hosts), max_entries=256)
    # Real issuance costs milliseconds (OpenSSL parses each leaf); the bound is the cache's, so part of the
    # run issues for real and the rest through a stand-in context of the same type.
    for host in hosts[:300]:
        issuer.context_for(host)
        assert len(issuer) <= 256
    real_issued = issuer.issued

    def stand_in(host: str, now: datetime.datetime) -> LeafContext:
        context = LeafContext(ssl.PROTOCOL_TLS_SERVER)
        context.host, context.not_after = host, now + datetime.timedelta(hours=24)
        context.renew_at = now + datetime.timedelta(hours=12)
        issuer.issued += 1
        return context

    monkeypatch.setattr(issuer, "_new_context", stand_in)
    for host in hosts[300:]:
        issuer.context_for(host)
        assert len(issuer) <= 256
    assert issuer.issued == 10_000 and real_issued == 300
    # Least recently used first out: the newest names are cached, an old one is issued again.
    assert issuer.context_for(hosts[-1]).host == hosts[-1] and issuer.issued == 10_000
    issuer.context_for(hosts[0])
    assert issuer.issued == 10_001 and len(issuer) == 256


def test_a_cached_leaf_is_renewed_half_way_through_its_life(tmp_path: Path) -> None:
    issuer = LeafIssuer(development_ca(tmp_path), frozenset({"crm.example.com"}))
    first = issuer.context_for("crm.example.com")
    assert issuer.context_for("crm.example.com") is first and issuer.issued == 1
    assert first.renew_at - datetime.datetime.now(datetime.timezone.utc) <= datetime.timedelta(hours=12)
    first.renew_at = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    second = issuer.context_for("crm.example.com")
    assert second is not first and issuer.issued == 2 and len(issuer) == 1
