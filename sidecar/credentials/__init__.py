"""Per-call credentials: signing keys, the minter protocol, the JWT minter, and the one JWT verifier."""

from .keys import KeyRing, SigningKey, generate_key
from .minter import CredentialMinter, JwtMinter, NoCredentialMinter
from .verify import TokenError, verify_jwt, verify_with_source

__all__ = ["CredentialMinter", "JwtMinter", "KeyRing", "NoCredentialMinter", "SigningKey", "TokenError",
           "generate_key", "verify_jwt", "verify_with_source"]
