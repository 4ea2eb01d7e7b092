package sidecar.authz_test

test_demo_refund_after_480_held if {
	d := decide(with_history(call("POST", "payments", "/refunds", {"amount": 49}), {"totals": {"amount": 480}}))
	outcome(d) == "hold"
	reason_for(d, "task_amount_threshold") == "task_amount_threshold: amounts in task t-19 total 529 > 500 (earlier 480 + this call 49)"
}

# Twenty refunds of 49, each under the per-call limit of 50.
test_twentieth_small_refund_held if {
	d := decide(with_history(call("POST", "payments", "/refunds", {"amount": 49}), {"calls": 19, "totals": {"amount": 931}}))
	outcome(d) == "hold"
	not fired(d, "amount_over_call_limit")
	contains(reason_for(d, "task_amount_threshold"), "total 980 > 500")
}

test_history_totals_as_floats if {
	d := decide(with_history(call("POST", "payments", "/refunds", {"amount": 49}), {"totals": {"amount": 480.0}}))
	contains(reason_for(d, "task_amount_threshold"), "earlier 480 +")
}

test_task_total_at_threshold_allowed if {
	outcome(decide(with_history(call("POST", "payments", "/refunds", {"amount": 49}), {"totals": {"amount": 451}}))) == "allow"
}

test_reads_do_not_add_to_task_amount if {
	not fired(decide(with_history(with_query(call("GET", "payments", "/refunds", null), {"amount": ["49"]}), {"totals": {"amount": 480}})), "task_amount_threshold")
}

test_exfiltration_chain_held_as_critical if {
	inp := with_history(call("POST", "webhook", "/hooks/1", {"data": "..."}), {"classifications_read": ["confidential"]})
	d := decide(inp)
	outcome(d) == "hold"
	d.risk == "critical"
	d.approval.approvers == 2
	reason_for(d, "exfiltration_chain") == "exfiltration_chain: task t-19 read confidential data earlier and POST /hooks/1 on webhook now writes to external host hooks.example.com"
	"audit_alert" in d.obligations
	not "revoke_task" in d.obligations
}

test_exfiltration_chain_via_external_label if {
	inp := with_history(call("POST", "publish", "/posts", {"text": "x"}), {"classifications_read": ["financial", "public"]})
	d := decide(inp)
	fired(d, "exfiltration_chain")
	fired(d, "external_publish")
}

test_public_reads_then_external_write_no_chain if {
	inp := with_history(call("POST", "webhook", "/hooks/1", {"data": "..."}), {"classifications_read": ["public"]})
	outcome(decide(inp)) == "allow"
}

test_sensitive_reads_then_internal_write_no_chain if {
	inp := with_history(call("POST", "crm", "/notes", {"text": "x"}), {"classifications_read": ["confidential"]})
	not fired(decide(inp), "exfiltration_chain")
	not fired(decide(object.union(inp, {"request": {"host": "10.1.2.3"}})), "exfiltration_chain")
}

test_external_false_label_marks_trusted_upstream if {
	inp := with_history(call("POST", "partner", "/orders", {"sku": "x"}), {"classifications_read": ["confidential"]})
	not fired(decide(inp), "exfiltration_chain")
}

test_internal_suffix_matches_whole_labels_only if {
	inp := with_history(call("POST", "webhook", "/hooks/1", {"data": "x"}), {"classifications_read": ["confidential"]})
	fired(decide(object.union(inp, {"request": {"host": "evilinternal"}})), "exfiltration_chain")
	not fired(decide(object.union(inp, {"request": {"host": "db.internal"}})), "exfiltration_chain")
}

# A blocked exfiltration attempt revokes the task.
test_denied_exfiltration_attempt_revokes_task if {
	inp := with_task_fields(
		with_history(call("POST", "webhook", "/hooks/1", {"data": "..."}), {"classifications_read": ["confidential"]}),
		{"labels": {"allowed_routes": ["crm"]}},
	)
	d := decide(inp)
	outcome(d) == "deny"
	fired(d, "exfiltration_chain")
	d.obligations == ["audit_alert", "revoke_task"]
}
