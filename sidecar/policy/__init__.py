"""Policy decisions: one small engine protocol, two engines, one validator.

``PolicyEngine`` is the seam: the embedded OPA engine (opa_bindings) and the
OPA REST Data API client both implement it, and tests can swap either in.
"""

from .engine import PolicyEngine, PolicyError
from .decide import Decider

__all__ = ["Decider", "PolicyEngine", "PolicyError"]
