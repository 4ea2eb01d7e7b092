"""OPA/Rego-backed authorization sidecar for AI agents."""
