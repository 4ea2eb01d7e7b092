"""The pod-local certificate authority used to intercept TLS (issue 18).

The agent trusts this CA (and only the pod's agent should: it is generated per pod or
per deployment, never shared with anything else). The sidecar signs short-lived leaf
certificates with it for the hosts of routes that ask for interception
(``intercept_tls: true``); leaves live in memory only (sidecar/proxy/tls.py).

The CA key is read once at start-up. It is never logged and never served: only the
certificate is (``GET /ca.pem`` on the admin listener). A key file that its group or
anybody else can read is refused, naming the file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca-key.pem"
DEFAULT_CA_DAYS = 365
CA_COMMON_NAME = "agent-sidecar pod-local CA"
# Leaves are re-issued well before they expire; a client clock a few minutes behind still accepts them.
LEAF_LIFETIME = datetime.timedelta(hours=24)
LEAF_BACKDATE = datetime.timedelta(minutes=5)

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CaError(Exception):
    """A CA that cannot be used; the message names the file."""


@dataclass(frozen=True)
class IssuedLeaf:
    host: str
    cert_pem: bytes  # the leaf, then the CA: the chain the agent is sent
    key_pem: bytes  # the leaf's own key, in memory only
    not_after: datetime.datetime

    def __repr__(self) -> str:
        return f"IssuedLeaf(host={self.host!r}, not_after={self.not_after.isoformat()})"


class CertificateAuthority:
    def __init__(self, certificate: x509.Certificate, key: CaKey, cert_path: Path) -> None:
        self.certificate = certificate
        self._key = key
        self.cert_path = cert_path
        self.cert_pem = certificate.public_bytes(serialization.Encoding.PEM)

    def __repr__(self) -> str:
        return f"CertificateAuthority(subject={self.certificate.subject.rfc4514_string()!r}, cert={str(self.cert_path)!r})"

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc

    def issue(self, host: str, now: datetime.datetime | None = None) -> IssuedLeaf:
        """A leaf for ``host`` (a DNS name or an IP literal): ECDSA P-256, the host as its only SAN."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        not_after = min(now + LEAF_LIFETIME, self.not_after)
        if not_after <= now:
            raise CaError(f"{self.cert_path}: the CA certificate has expired")
        key = ec.generate_private_key(ec.SECP256R1())
        san: x509.GeneralName
        try:
            san = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        common_name = host if len(host) <= 64 else host[:64]
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - LEAF_BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_pem = certificate.public_bytes(serialization.Encoding.PEM) + self.cert_pem
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return IssuedLeaf(host, cert_pem, key_pem, not_after)


def check_key_permissions(key_path: Path) -> None:
    """Refuse a CA key file that its group or others can read (or write)."""
    try:
        mode = os.stat(key_path).st_mode
    except OSError as exc:
        raise CaError(f"{key_path}: cannot read the CA key: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise CaError(f"{key_path}: the CA key is not a regular file")
    if mode & 0o077:
        raise CaError(f"{key_path}: the CA key is readable by its group or by others (mode {stat.S_IMODE(mode):04o});"
                      " it must be readable by the sidecar's user only (chmod 600, or defaultMode 0400 on a Secret)")


def load_ca(cert_path: Path, key_path: Path) -> CertificateAuthority:
    check_key_permissions(key_path)
    return _read_ca(cert_path, key_path)


def _read_ca(cert_path: Path, key_path: Path) -> CertificateAuthority:
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        raise CaError(f"{cert_path}: cannot read the CA certificate: {exc.strerror}") from None
    except ValueError:
        raise CaError(f"{cert_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise CaError(f"{key_path}: cannot read the CA key: {exc.strerror}") from None
    except (ValueError, TypeError):
        # Never echo the parser's message: it could quote the key.
        raise CaError(f"{key_path}: not an unencrypted PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CaError(f"{key_path}: the CA key must be ECDSA or RSA")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise CaError(f"{key_path}: the key does not belong to {cert_path}")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CaError(f"{cert_path}: not a CA certificate (basicConstraints CA:TRUE is missing)")
    now = datetime.datetime.now(datetime.timezone.utc)
    if certificate.not_valid_after_utc <= now:
        raise CaError(f"{cert_path}: the CA certificate expired on {certificate.not_valid_after_utc.date()}")
    return CertificateAuthority(certificate, key, cert_path)


def generate_ca(directory: Path, *, common_name: str = CA_COMMON_NAME, days: int = DEFAULT_CA_DAYS) -> tuple[Path, Path]:
    """Write ca.pem (public) and ca-key.pem (owner-only) into ``directory``; never overwrites."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    for path in (cert_path, key_path):
        if path.exists():
            raise CaError(f"{path}: already exists; remove it first or choose another directory")
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - LEAF_BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def install_ca(source: Path, destination: Path) -> tuple[Path, Path]:
    """Copy a CA from a Kubernetes Secret volume to where the sidecar reads it, the key owner-only.

    A Secret volume in a pod with an fsGroup is group-readable (the kubelet turns 0400 into 0440
    root:<fsGroup>), which load_ca refuses. An init container running as the sidecar's user copies
    it into a memory-backed emptyDir as 0600 (deploy/k8s, docs/kubernetes.md). A source key that
    everybody can read is refused here too."""
    cert_src, key_src = source / CA_CERT_NAME, source / CA_KEY_NAME
    try:
        mode = os.stat(key_src).st_mode
    except OSError as exc:
        raise CaError(f"{key_src}: cannot read the CA key: {exc.strerror}") from None
    if mode & 0o007:
        raise CaError(f"{key_src}: the CA key is readable by others (mode {stat.S_IMODE(mode):04o})")
    ca = _read_ca(cert_src, key_src)  # validated before anything is written
    destination.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = destination / CA_CERT_NAME, destination / CA_KEY_NAME
    for path, data, file_mode in ((key_path, key_src.read_bytes(), 0o600), (cert_path, ca.cert_pem, 0o644)):
        temporary = path.with_name(f".{path.name}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode)
            handle.write(data)
        os.replace(temporary, path)
    return cert_path, key_path


def development_ca(state_dir: Path) -> CertificateAuthority:
    """Local runs: a CA generated into ``<state_dir>/tls-ca`` at first start, then reused."""
    directory = state_dir / "tls-ca"
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    if not (cert_path.exists() and key_path.exists()):
        generate_ca(directory, common_name=f"{CA_COMMON_NAME} (development)")
    return load_ca(cert_path, key_path)
