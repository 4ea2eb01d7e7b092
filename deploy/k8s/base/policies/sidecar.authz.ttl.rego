# Credential lifetime by risk: the riskier the call, the sooner its credential
# dies. Never past the task's own expiry.
package sidecar.authz

risk_ttl := num(object.get(cfg, ["ttl_seconds", risk], 10))

ttl_candidates contains risk_ttl

ttl_candidates contains (task_expires_ns - now_ns) / 1000000000 if {
	has_task
	now_ns > 0
}

ttl_seconds := clamp_int(min(ttl_candidates), 1, 86400)
