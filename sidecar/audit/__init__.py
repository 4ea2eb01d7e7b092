"""The audit chain: JSON lines where each event carries the hash of the previous one."""

from .chain import AuditError, AuditSink, HashChainLog, VerifyResult, verify_files

__all__ = ["AuditError", "AuditSink", "HashChainLog", "VerifyResult", "verify_files"]
