package sidecar.authz_test

# input.request.measures: the route's configured measures, extracted by the sidecar.
with_measures(inp, measures) := object.union(inp, {"request": {"measures": measures}})

test_measured_amount_counts_where_the_body_field_is_unknown if {
	# The amount sits at refund.amount, which the library's amount_fields do not name:
	# without the measure the call is held as a funds movement without an amount.
	inp := call("POST", "payments", "/refunds", {"refund": {"amount": 49}})
	fired(decide(inp), "funds_movement_without_amount")
	d := decide(with_measures(inp, {"amount": 49}))
	outcome(d) == "allow"
	not fired(d, "funds_movement_without_amount")
}

test_measured_amount_wins_over_the_body_field if {
	d := decide(with_measures(call("POST", "payments", "/refunds", {"amount": 5000, "refund": {"amount": 49}}), {"amount": 49}))
	outcome(d) == "allow"
}

test_measured_amount_adds_to_the_task_total if {
	inp := with_history(call("POST", "payments", "/refunds", {"refund": {"amount": 49}}), {"totals": {"amount": 490}})
	d := decide(with_measures(inp, {"amount": 49}))
	outcome(d) == "hold"
	reason_for(d, "task_amount_threshold") == "task_amount_threshold: amounts in task t-19 total 539 > 500 (earlier 490 + this call 49)"
}

test_measured_amount_over_the_call_limit_held if {
	d := decide(with_measures(call("POST", "payments", "/refunds", {"refund": {"amount": 60}}), {"amount": 60}))
	reason_for(d, "amount_over_call_limit") == "amount_over_call_limit: POST /refunds on payments moves 60 > per-call limit 50"
}

test_measured_records_count if {
	d := decide(with_measures(call("POST", "crm", "/customers/bulk", {"rows": []}), {"records": 150}))
	reason_for(d, "bulk_records") == "bulk_records: POST /customers/bulk on crm touches 150 records > per-call limit 100"
}

test_measure_missing_falls_back_to_the_body if {
	d := decide(with_measures(call("POST", "payments", "/refunds", {"amount": 60}), {"records": 1}))
	fired(d, "amount_over_call_limit")
}

test_empty_measures_fall_back_to_the_body if {
	fired(decide(with_measures(call("POST", "payments", "/refunds", {"amount": 60}), {})), "amount_over_call_limit")
}

test_malformed_measure_ignored if {
	# A negative or non-number measure is not trusted; the body is read instead.
	fired(decide(with_measures(call("POST", "payments", "/refunds", {"amount": 60}), {"amount": -5})), "amount_over_call_limit")
	fired(decide(with_measures(call("POST", "payments", "/refunds", {"amount": 60}), {"amount": "1"})), "amount_over_call_limit")
	outcome(decide(with_measures(call("POST", "payments", "/refunds", {"amount": 60}), "junk"))) == "hold"
}
