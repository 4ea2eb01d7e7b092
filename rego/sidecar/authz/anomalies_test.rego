package sidecar.authz_test

test_task_call_cap_denies_and_revokes if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"calls": 5000}))
	outcome(d) == "deny"
	reason_for(d, "task_call_cap") == "task_call_cap: task t-19 made 5001 calls > hard cap 5000"
	d.obligations == ["audit_alert", "revoke_task"]
	d.risk == "critical"
}

test_request_rate_denies_and_revokes if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(19, "2025-06-01T11:59:59Z", "allow")}))
	outcome(d) == "deny"
	reason_for(d, "task_request_rate") == "task_request_rate: task t-19 made 20 calls within 2s > cap 19"
	"revoke_task" in d.obligations
}

test_calls_spread_out_are_no_rate_anomaly if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(20, "2025-06-01T11:59:00Z", "allow")}))
	outcome(d) == "allow"
}

test_held_calls_do_not_count_toward_rate if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(20, "2025-06-01T12:00:00Z", "hold")}))
	outcome(d) == "allow"
}

test_numeric_timestamps_count_toward_rate if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(19, 1748779199, "allow")}))
	fired(d, "task_request_rate")
}

test_unparseable_timestamps_are_ignored if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(20, "yesterday", "allow")}))
	outcome(d) == "allow"
}

test_repeated_denials_revoke if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(6, "2025-06-01T11:00:00Z", "deny")}))
	outcome(d) == "deny"
	reason_for(d, "repeated_denials") == "repeated_denials: 6 of the last 6 calls in task t-19 were denied > cap 5"
	"revoke_task" in d.obligations
	outcome(decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(5, "2025-06-01T11:00:00Z", "deny")}))) == "allow"
}
