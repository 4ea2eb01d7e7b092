"""The admin API: JWKS, tasks, approvals (and, later, introspection and the approver page)."""
