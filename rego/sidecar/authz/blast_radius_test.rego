package sidecar.authz_test

import data.sidecar.authz

test_bulk_write_held if {
	ids := numbers.range(1, 150)
	d := decide(call("POST", "crm", "/customers/bulk-update", {"ids": ids, "tier": "gold"}))
	outcome(d) == "hold"
	reason_for(d, "bulk_records") == "bulk_records: POST /customers/bulk-update on crm touches 150 records > per-call limit 100"
}

test_bulk_read_of_sensitive_data_held if {
	d := decide(with_query(call("GET", "crm", "/customers", null), {"limit": ["500"]}))
	outcome(d) == "hold"
	fired(d, "bulk_records")
}

test_bulk_read_of_public_data_allowed if {
	outcome(decide(with_query(call("GET", "search", "/results", null), {"limit": ["500"]}))) == "allow"
}

test_records_number_in_body if {
	fired(decide(call("POST", "crm", "/exports", {"records": 101})), "bulk_records")
	not fired(decide(call("POST", "crm", "/exports", {"records": 100})), "bulk_records")
}

test_task_records_threshold_held if {
	inp := with_history(with_query(call("GET", "crm", "/customers", null), {"limit": ["50"]}), {"totals": {"records": 990}})
	d := decide(inp)
	outcome(d) == "hold"
	reason_for(d, "task_records_threshold") == "task_records_threshold: records in task t-19 total 1040 > 1000 (earlier 990 + this call 50)"
}

test_task_records_past_threshold_hold_sensitive_reads if {
	inp := with_history(call("GET", "crm", "/customers/42", null), {"totals": {"records": 1500}})
	fired(decide(inp), "task_records_threshold")
	not fired(decide(with_history(call("GET", "search", "/q", null), {"totals": {"records": 1500}})), "task_records_threshold")
}

test_classified_write_raises_risk if {
	d := decide(call("POST", "crm", "/customers", {"name": "Ada"}))
	outcome(d) == "allow"
	d.risk == "medium"
	d.credential.ttl_seconds == 120
	reason_for(d, "classified_write") == "classified_write: POST /customers on crm writes confidential data"
}

test_unknown_classification_adds_no_risk if {
	d := decide(call("POST", "wiki", "/pages", {"title": "x"}))
	d.risk == "low"
	not fired(d, "classified_write")
}

test_classification_risk_is_tunable if {
	d := decide(call("POST", "crm", "/customers", {"name": "Ada"})) with data.sidecar.config.classification_risk.confidential as "high"
	d.risk == "high"
	d.credential.ttl_seconds == 30
}

test_records_query_params_match_ignoring_case if {
	inp := with_query(call("GET", "crm", "/customers", null), {"PER_PAGE": ["500"]})
	fired(decide(inp), "bulk_records")
	d := authz.decision with input as with_query(call("GET", "crm", "/customers", null), {"Rows": ["500"]}) with data.sidecar.config.records_query_params as ["ROWS"]
	fired(d, "bulk_records")
	not fired(decide(with_query(call("GET", "crm", "/customers", null), {"rows": ["500"]})), "bulk_records")
}
