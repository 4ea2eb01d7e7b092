"""The audit chain: JSON lines where each event carries the hash of the previous one."""

from .chain import AuditError, AuditSink, HashChainLog, VerifyResult, chain_files, expand, verify_files
from .writer import AuditWriter

__all__ = ["AuditError", "AuditSink", "AuditWriter", "HashChainLog", "VerifyResult", "chain_files", "expand",
           "verify_files"]
