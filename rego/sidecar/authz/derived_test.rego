# derived.rego: what the sidecar sets at load as data.sidecar.runtime.derived is
# what the rules compute per call, so a decision is the same with it and without.
package sidecar.authz_test

import data.sidecar.authz

test_derived_from_the_shipped_data if {
	authz.derived == {
		"approval_requirements": {
			"low": {"approvers": 1, "group": "approvers", "expires_in_seconds": 3600},
			"medium": {"approvers": 1, "group": "approvers", "expires_in_seconds": 3600},
			"high": {"approvers": 1, "group": "approvers", "expires_in_seconds": 1800},
			"critical": {"approvers": 2, "group": "approvers", "expires_in_seconds": 900},
		},
		"ttl_seconds": {"low": 300, "medium": 120, "high": 30, "critical": 10},
		"records_query_params": {"limit": true, "per_page": true, "page_size": true},
		"agent_routes": {"*": {"*": true}},
		"audiences": {},
		"rate_outcome": "allow",
		"denied_outcome": "deny",
	}
}

# Calls that reach every rule reading a derived value: approval requirements and
# TTL at each risk, a task expiring before the risk's TTL, query parameters, the
# agent's routes, the anomaly rules.
derived_cases := [
	call("GET", "crm", "/customers/42", null),
	with_query(call("GET", "crm", "/customers", null), {"Limit": ["500"], "page_size": ["20"], "fields": ["a"]}),
	call("POST", "crm", "/customers", {"name": "Ada"}),
	call("DELETE", "crm", "/customers/42", null),
	call("POST", "payments", "/refunds", {"amount": 5000}),
	call("POST", "payments", "/refunds", {"amount": 20}),
	call("POST", "publish", "/posts", {"text": "hi"}),
	call("GET", "search", "/q", null),
	no_task(call("GET", "wiki", "/page", null)),
	with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at": "2025-06-01T12:00:45Z"}),
	with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at_epoch": 1748779200.5}),
	with_task_fields(call("DELETE", "crm", "/customers/42", null), {"expires_at_epoch": 1748779230}),
	with_task_fields(call("DELETE", "crm", "/customers/42", null), {"expires_at_epoch": 1748779229.9}),
	with_history(call("GET", "crm", "/customers/42", null), {"calls": 30, "recent": recent_calls(19, 1748779199500, "allow")}),
	with_history(call("GET", "crm", "/customers/42", null), {"calls": 30, "recent": recent_calls(6, 1748779199500, "deny")}),
	object.union(call("GET", "crm", "/customers/42", null), {"agent": {"id": "*"}}),
	object.union(call("GET", "crm", "/customers/42", null), {"agent": {"id": 7}}),
	mcp_call("mcp", "delete_record", {"id": 1}, {}),
	{"version": "v2"},
	{},
]

# The decision on every case, with derived set as the sidecar sets it, equals the one without.
same_with_derived(config) if {
	set := authz.derived with data.sidecar.config as config
	every inp in derived_cases {
		with_derived := authz.decision with input as inp with data.sidecar.config as config with data.sidecar.runtime.derived as set
		without := authz.decision with input as inp with data.sidecar.config as config
		with_derived == without
	}
}

test_decisions_are_the_same_with_derived_set if {
	same_with_derived(data.sidecar.config)
}

test_decisions_are_the_same_with_derived_set_for_other_knobs if {
	c := data.sidecar.config
	same_with_derived(object.union(c, {
		"audiences": {"crm": "https://crm.example.com", "search": "", "payments": 7},
		"agent_routes": {"spiffe://cluster.local/ns/agents/sa/billing-agent": ["payments", 3], "*": ["crm"], "7": ["*"]},
		"records_query_params": ["ROWS", "limit", 5],
		"ttl_seconds": {"low": 86401.5, "medium": 0.5, "high": "45", "critical": 10},
		"approval": {"low": {"approvers": 11, "group": ""}, "medium": "none", "high": {"approvers": 2.7, "expires_in_seconds": -1}, "critical": {"approvers": 2, "group": "sec", "expires_in_seconds": 900}},
		"anomalies": object.union(c.anomalies, {"rate_outcomes": ["allow", "hold"], "denied_outcomes": ["deny", 1]}),
	}))
	same_with_derived(object.union(c, {
		"agent_routes": {"spiffe://cluster.local/ns/agents/sa/billing-agent": "all"},
		"anomalies": object.union(c.anomalies, {"rate_outcomes": [], "denied_outcomes": ["hold"], "max_calls_in_window": 0}),
	}))
}

test_the_embedded_engine_sets_derived_only_after_the_data_check if {
	# contract.rego: config_invalid reads config_checked; derived is set beside it.
	d := authz.decision with input as call("GET", "crm", "/customers/42", null) with data.sidecar.runtime.derived as authz.derived with data.sidecar.runtime.config_checked as true
	d.allow == true
	d.credential.ttl_seconds == 300
}
