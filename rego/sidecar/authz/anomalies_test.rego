package sidecar.authz_test

import data.sidecar.authz

test_task_call_cap_denies_and_revokes if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"calls": 5000}))
	outcome(d) == "deny"
	reason_for(d, "task_call_cap") == "task_call_cap: task t-19 made 5001 calls > hard cap 5000"
	d.obligations == ["audit_alert", "revoke_task"]
	d.risk == "critical"
}

test_request_rate_denies_and_revokes if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(19, 1748779199000, "allow")}))
	outcome(d) == "deny"
	reason_for(d, "task_request_rate") == "task_request_rate: task t-19 made 20 calls within 2s > cap 19"
	"revoke_task" in d.obligations
}

test_calls_spread_out_are_no_rate_anomaly if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(20, 1748779140000, "allow")}))
	outcome(d) == "allow"
}

test_held_calls_do_not_count_toward_rate if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(20, 1748779200000, "hold")}))
	outcome(d) == "allow"
}

test_the_window_is_measured_to_the_millisecond if {
	# now is 12:00:00.000 and the window 2 s: a call decided at 11:59:58.000 is inside it, one at 11:59:57.999 is not.
	fired(decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(19, 1748779198000, "allow")})), "task_request_rate")
	not fired(decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(19, 1748779197999, "allow")})), "task_request_rate")
}

test_the_rate_counts_the_latest_allowed_calls if {
	# 19 allowed calls, only the last 18 of them inside the window: not past the cap of 19.
	recent := {"calls": 19, "at_ms": {"allow": array.concat([1748779100000], [1748779199000 | some _ in numbers.range(1, 18)])}}
	not fired(decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent})), "task_request_rate")
}

test_several_rate_outcomes_are_merged_in_time_order if {
	recent := {"calls": 19, "at_ms": {"allow": [1748779199000 | some _ in numbers.range(1, 10)], "hold": [1748779199500 | some _ in numbers.range(1, 9)]}}
	inp := with_history(call("GET", "crm", "/customers/42", null), {"recent": recent})
	not fired(decide(inp), "task_request_rate")
	d := authz.decision with input as inp with data.sidecar.config.anomalies.rate_outcomes as ["allow", "hold"]
	reason_for(d, "task_request_rate") == "task_request_rate: task t-19 made 20 calls within 2s > cap 19"
}

test_timestamps_that_are_not_numbers_are_ignored if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": {"calls": 20, "at_ms": {"allow": ["yesterday" | some _ in numbers.range(1, 20)]}}}))
	outcome(d) == "allow"
}

test_repeated_denials_revoke if {
	d := decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(6, 1748775600000, "deny")}))
	outcome(d) == "deny"
	reason_for(d, "repeated_denials") == "repeated_denials: 6 of the last 6 calls in task t-19 were denied > cap 5"
	"revoke_task" in d.obligations
	outcome(decide(with_history(call("GET", "crm", "/customers/42", null), {"recent": recent_calls(5, 1748775600000, "deny")}))) == "allow"
}
