# Chained intent: calls that are harmless one by one and risky together.
package sidecar.authz

# Sensitive data read earlier in the task, now a write leaves the cluster:
# the shape of an exfiltration.
sensitive_read_earlier := history_classifications & sensitive_classifications

write_hold contains {
	"rule": "exfiltration_chain",
	"reason": sprintf("exfiltration_chain: %s read %s data earlier and %s now writes to external host %s", [task_name, concat(", ", sort(sensitive_read_earlier)), action, clip(host)]),
} if {
	has_task
	destination_external
	count(sensitive_read_earlier) > 0
}

# Small amounts under the per-call limit, repeated: twenty refunds of 49.
write_hold contains {
	"rule": "task_amount_threshold",
	"reason": sprintf("task_amount_threshold: amounts in %s total %s > %s (earlier %s + this call %s)", [task_name, fmt(task_amount_total), fmt(cfg.limits.task_amount), fmt(history_amount), fmt(call_amount)]),
} if {
	has_task
	call_amount > 0
	task_amount_total > cfg.limits.task_amount
}

task_amount_total := history_amount + call_amount
