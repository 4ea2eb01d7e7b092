"""Per-call credentials: signing keys, the minter protocol, the JWT minter."""

from .keys import KeyRing, SigningKey, generate_key
from .minter import CredentialMinter, JwtMinter, NoCredentialMinter

__all__ = ["CredentialMinter", "JwtMinter", "KeyRing", "NoCredentialMinter", "SigningKey", "generate_key"]
