package sidecar.authz_test

import data.sidecar.authz

test_ttl_by_risk if {
	decide(call("GET", "crm", "/customers/42", null)).credential.ttl_seconds == 300
	decide(call("POST", "crm", "/customers", {"name": "Ada"})).credential.ttl_seconds == 120
	decide(call("DELETE", "crm", "/customers/42", null)).credential.ttl_seconds == 30
	decide(call("POST", "payments", "/refunds", {"amount": 5000})).credential.ttl_seconds == 10
}

test_ttl_never_outlives_the_task if {
	d := decide(with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at": "2025-06-01T12:01:30Z"}))
	d.credential.ttl_seconds == 90
}

test_approval_by_risk_is_tunable if {
	d := decide(call("DELETE", "crm", "/customers/42", null)) with data.sidecar.config.approval.high as {"approvers": 3, "group": "dba", "expires_in_seconds": 60}
	d.approval == {"approvers": 3, "group": "dba", "expires_in_seconds": 60}
}

test_granted_approval_allows_held_call if {
	inp := object.union(call("DELETE", "crm", "/customers/42", null), {"approval": {"id": "ap-1", "status": "approved", "approvals": [{"approver": "alice"}]}})
	d := decide(inp)
	outcome(d) == "allow"
	reason_for(d, "approval_granted") == "approval_granted: approval ap-1 covers high_impact_delete; allowed at high risk"
	d.credential.ttl_seconds == 30
}

test_critical_approval_needs_two_distinct_approvers if {
	base := call("POST", "payments", "/refunds", {"amount": 5000})
	one := object.union(base, {"approval": {"id": "ap-2", "status": "approved", "approvals": [{"approver": "alice"}, {"approver": "alice"}]}})
	outcome(decide(one)) == "hold"
	two := object.union(base, {"approval": {"id": "ap-2", "status": "approved", "approvals": [{"approver": "alice"}, {"approver": "bob"}]}})
	outcome(decide(two)) == "allow"
}

test_agent_never_counts_as_its_own_approver if {
	agent := "spiffe://cluster.local/ns/agents/sa/billing-agent"
	inp := object.union(call("DELETE", "crm", "/customers/42", null), {"approval": {"id": "ap-3", "status": "approved", "approvals": [{"approver": agent}]}})
	outcome(decide(inp)) == "hold"
}

test_approval_not_granted_keeps_hold if {
	inp := object.union(call("DELETE", "crm", "/customers/42", null), {"approval": {"id": "ap-4", "status": "pending"}})
	outcome(decide(inp)) == "hold"
}

test_deny_wins_over_granted_approval if {
	inp := object.union(
		with_history(call("DELETE", "crm", "/customers/42", null), {"calls": 9999}),
		{"approval": {"id": "ap-5", "status": "approved", "approvals": [{"approver": "alice"}]}},
	)
	outcome(decide(inp)) == "deny"
}

test_audience_override if {
	d := decide(call("GET", "crm", "/customers/42", null)) with data.sidecar.config.audiences as {"crm": "https://crm.example.com"}
	d.credential.audience == "https://crm.example.com"
	d.credential.scopes == ["crm:read"]
}

test_decision_defined_without_input if {
	d := authz.decision
	outcome(d) == "deny"
	fired(d, "malformed_input")
}

test_decision_defined_for_malformed_input if {
	garbage := {
		"request": {"method": 5, "path": ["x"], "host": null, "body": "text", "query": {"limit": "9"}, "headers": []},
		"tool": {"route": 7, "labels": {"reversible": 0, "external": "maybe", "data_classification": ["x"]}},
		"agent": "me",
		"task": {"id": 1, "history": {"calls": "many", "totals": [], "recent": {"calls": "x", "at_ms": {"allow": [1, "2025-02-30T00:00:00+99:00"], "deny": 3}}, "classifications_read": "confidential"}},
		"mcp": {"method": "tools/call", "tool": 3, "arguments": [1], "annotations": {"destructiveHint": "yes"}},
		"approval": {"status": 1, "approvals": "alice"},
		"time": {"now_ns": "soon"},
	}
	d := decide(garbage)
	outcome(d) == "deny"
	reason_for(d, "malformed_input") == "malformed_input: input is not a v2 document; denied"
	d.credential.audience == "unknown-route"
}

test_every_reason_names_its_rule if {
	inputs := [
		call("GET", "crm", "/customers/42", null),
		no_task(call("POST", "crm", "/customers", {})),
		call("POST", "payments", "/refunds", {"amount": 5000}),
		with_history(call("POST", "webhook", "/hooks/1", {}), {"classifications_read": ["confidential"], "calls": 9999}),
	]
	every inp in inputs {
		d := decide(inp)
		every r in d.reasons {
			some rule in d.rules
			startswith(r, concat("", [rule, ": "]))
		}
		count(d.reasons) > 0
	}
}

test_decision_has_the_full_shape if {
	d := decide(call("DELETE", "crm", "/customers/42", null))
	object.keys(d) == {"allow", "require_approval", "reasons", "risk", "credential", "approval", "obligations", "rules", "measures"}
	object.keys(d.credential) == {"audience", "scopes", "ttl_seconds"}
	object.keys(d.approval) == {"approvers", "group", "expires_in_seconds"}
	is_array(d.obligations)
	is_array(d.rules)
	d.measures == {"amount": 0, "records": 0}
}

test_a_read_reports_its_records_alone if {
	d := decide(object.union(call("GET", "crm", "/customers", null), {"request": {"query": {"limit": ["90"]}}}))
	d.measures == {"records": 90}
}

test_decision_reports_the_measures_it_judged if {
	d := decide(call("POST", "payments", "/refunds", [{"amount": 49}]))
	d.measures.amount == 49
}

test_approval_group_falls_back_when_blank if {
	d := decide(call("DELETE", "crm", "/customers/42", null)) with data.sidecar.config.approval.high.group as ""
	d.approval.group == "approvers"
}

test_approvers_may_be_listed_by_name if {
	inp := object.union(call("DELETE", "crm", "/customers/42", null), {"approval": {"id": "ap-6", "status": "approved", "approvals": ["alice"]}})
	outcome(decide(inp)) == "allow"
}

test_unknown_risk_name_counts_as_high if {
	d := decide(call("POST", "payments", "/refunds", {"amount": 10})) with data.sidecar.config.rule_risk.production_write as "severe"
	d.risk == "high"
}

# An input v1 document (an older sidecar, a recorded call) is not judged as if it were v2.
test_v1_document_denied_as_malformed if {
	d := decide(object.union(call("GET", "crm", "/customers/42", null), {"version": "v1"}))
	outcome(d) == "deny"
	reason_for(d, "malformed_input") == "malformed_input: input is not a v2 document; denied"
}

test_an_approval_of_another_group_does_not_cover_the_call if {
	held := call("DELETE", "crm", "/customers/42", null)
	ok := object.union(held, {"approval": {"id": "ap-1", "status": "approved", "group": "approvers", "approvals": [{"approver": "alice"}]}})
	d := decide(ok)
	d.allow == true
	other := object.union(held, {"approval": {"id": "ap-1", "status": "approved", "group": "security", "approvals": [{"approver": "alice"}]}})
	d2 := decide(other)
	d2.require_approval == true
}

test_an_approval_shown_other_rules_does_not_cover_the_call if {
	held := call("DELETE", "crm", "/customers/42", null)
	asked := decide(held)
	asked.require_approval == true
	approval := {"id": "ap-1", "status": "approved", "group": "approvers", "approvals": [{"approver": "alice"}]}
	seen := decide(object.union(held, {"approval": object.union(approval, {"rules": asked.rules})}))
	seen.allow == true
	unseen := decide(object.union(held, {"approval": object.union(approval, {"rules": ["external_publish"]})}))
	unseen.require_approval == true
}
