# Credential lifetime by risk: the riskier the call, the sooner its credential
# dies. Never past the task's own expiry.
package sidecar.authz

risk_ttl_at(r) := t if {
	t := cfg.ttl_seconds[r]
	is_number(t)
} else := num(object.get(cfg, ["ttl_seconds", r], 10))

task_ttl := (task_expires_ns - n) / 1000000000 if {
	has_task
	n := now_ns
	n > 0
}

# clamp_int is monotonic, so clamp_int(min({a, b})) is min({clamp_int(a), clamp_int(b)}):
# with the risk's TTL clamped at load (derived.rego), a task that outlives it
# costs one comparison.
ttl_seconds := t if {
	t := data.sidecar.runtime.derived.ttl_seconds[risk]
	not task_ttl < t
} else := clamp_int(task_ttl, 1, 86400) if {
	data.sidecar.runtime.derived.ttl_seconds[risk]
} else := clamp_int(min({risk_ttl_at(risk), task_ttl}), 1, 86400) if {
	task_ttl
} else := clamp_int(risk_ttl_at(risk), 1, 86400)
