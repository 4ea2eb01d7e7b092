# Credential lifetime by risk: the riskier the call, the sooner its credential
# dies. Never past the task's own expiry.
package sidecar.authz

risk_ttl := t if {
	t := cfg.ttl_seconds[risk]
	is_number(t)
} else := num(object.get(cfg, ["ttl_seconds", risk], 10))

task_ttl := (task_expires_ns - now_ns) / 1000000000 if {
	has_task
	now_ns > 0
}

ttl_seconds := clamp_int(min({risk_ttl, task_ttl}), 1, 86400) if {
	task_ttl
} else := clamp_int(risk_ttl, 1, 86400)
