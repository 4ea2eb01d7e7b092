# Blast radius: how much one call can touch, from the route's labels, the
# body (amounts, record counts) and what the task already touched.
package sidecar.authz

hold contains {
	"rule": "bulk_records",
	"reason": sprintf("bulk_records: %s touches %s records > per-call limit %s", [action, fmt(call_records), fmt(cfg.limits.records_per_call)]),
} if {
	call_records > cfg.limits.records_per_call
	bulk_matters
}

# A bulk read of public data is harmless; a bulk write or a bulk read of
# sensitive data is not.
bulk_matters if is_write

bulk_matters if sensitive_route

# Many modest calls add up: the task's running total of records counts too.
hold contains {
	"rule": "task_records_threshold",
	"reason": sprintf("task_records_threshold: records in %s total %s > %s (earlier %s + this call %s)", [task_name, fmt(task_records_total), fmt(cfg.limits.task_records), fmt(history_records), fmt(call_records)]),
} if {
	has_task
	task_records_total > cfg.limits.task_records
	task_records_matter
}

task_records_total := history_records + call_records

task_records_matter if call_records > 0

task_records_matter if sensitive_route

# A write whose body the sidecar could not read, on a route whose blast radius
# is read from the body (it has measures, it moves funds, or its data is
# sensitive): amounts and records are unknown, so the call is not allowed.
write_deny contains {
	"rule": "unreadable_body",
	"reason": sprintf("unreadable_body: %s sends a body that is neither JSON nor a form to a route measured from its body; send it as JSON", [action]),
} if {
	body_unreadable
	measured_from_body
}

measured_from_body if count(arr(object.get(doc, ["tool", "measures"], []))) > 0

measured_from_body if funds_movement

measured_from_body if sensitive_route

measured_from_body if production

# Notes do not hold or deny; they raise the risk, which shortens the
# credential's TTL and sizes any approval.
write_notes contains {
	"rule": "classified_write",
	"reason": sprintf("classified_write: %s writes %s data", [action, classification]),
	"risk": cfg.classification_risk[classification],
} if {
	classification != ""
}

write_notes contains {
	"rule": "production_write",
	"reason": sprintf("production_write: %s writes to environment %s", [action, environment]),
} if {
	production
}

write_notes contains {
	"rule": "irreversible_action",
	"reason": sprintf("irreversible_action: %s is class execute and cannot be undone", [action]),
} if {
	action_class == "execute"
}

notes contains {
	"rule": "read_without_task",
	"reason": sprintf("read_without_task: %s has no task; reads without a task are allowed at low risk", [action]),
} if {
	is_read
	not has_task
}
