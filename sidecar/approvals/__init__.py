"""Human approval of held calls."""

from .store import Approval, ApprovalStore, MemoryApprovalStore, RequestBinding

__all__ = ["Approval", "ApprovalStore", "MemoryApprovalStore", "RequestBinding"]
