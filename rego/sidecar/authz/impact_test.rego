package sidecar.authz_test

test_demo_delete_with_task_held if {
	d := decide(call("DELETE", "crm", "/customers/42", null))
	outcome(d) == "hold"
	d.risk == "high"
	d.approval.approvers == 1
	reason_for(d, "high_impact_delete") == "high_impact_delete: DELETE /customers/42 on crm deletes data"
}

test_mcp_delete_record_held if {
	d := decide(mcp_call("mcp", "delete_record", {"id": 42}, {}))
	outcome(d) == "hold"
	reason_for(d, "high_impact_delete") == "high_impact_delete: MCP tool delete_record on mcp deletes data"
}

test_mcp_destructive_hint_held if {
	outcome(decide(mcp_call("mcp", "tidy_up", {}, {"destructiveHint": true}))) == "hold"
}

test_mcp_delete_like_tool_name_held if {
	outcome(decide(mcp_call("mcp", "purge-cache", {}, {}))) == "hold"
	outcome(decide(mcp_call("mcp", "undelete_record", {}, {}))) == "allow"
}

test_demo_small_refund_allowed if {
	d := decide(call("POST", "payments", "/refunds", {"amount": 49}))
	outcome(d) == "allow"
	d.risk == "medium"
	d.credential == {"audience": "payments", "scopes": ["payments:write"], "ttl_seconds": 120}
	fired(d, "irreversible_action")
	fired(d, "production_write")
}

test_demo_large_refund_critical_with_two_approvers if {
	d := decide(call("POST", "payments", "/refunds", {"amount": 5000}))
	outcome(d) == "hold"
	d.risk == "critical"
	d.approval == {"approvers": 2, "group": "approvers", "expires_in_seconds": 900}
	reason_for(d, "amount_over_call_limit") == "amount_over_call_limit: POST /refunds on payments moves 5000 > per-call limit 50"
	reason_for(d, "critical_amount") == "critical_amount: POST /refunds on payments moves 5000 > critical amount 1000"
	"audit_alert" in d.obligations
}

test_refund_over_call_limit_held_at_high_risk if {
	d := decide(call("POST", "payments", "/refunds", {"amount": 60}))
	outcome(d) == "hold"
	d.risk == "high"
	d.approval.approvers == 1
	not fired(d, "critical_amount")
}

test_negative_amount_counts_by_size if {
	fired(decide(call("POST", "payments", "/refunds", {"amount": -60})), "amount_over_call_limit")
}

test_refund_without_amount_held if {
	d := decide(call("POST", "payments", "/refunds", {"charge": "ch_1"}))
	outcome(d) == "hold"
	reason_for(d, "funds_movement_without_amount") == "funds_movement_without_amount: POST /refunds on payments moves funds but carries no amount in amount"
}

test_amount_as_string_is_read if {
	fired(decide(call("POST", "payments", "/refunds", {"amount": "75.00"})), "amount_over_call_limit")
	fired(decide(call("POST", "payments", "/refunds", {"amount": "lots"})), "funds_movement_without_amount")
}

test_amounts_in_batch_body_add_up if {
	d := decide(call("POST", "payments", "/refunds", [{"amount": 30}, {"amount": 30}]))
	reason_for(d, "amount_over_call_limit") == "amount_over_call_limit: POST /refunds on payments moves 60 > per-call limit 50"
}

test_amount_in_query_counts if {
	inp := with_query(call("POST", "payments", "/refunds", null), {"amount": ["70"]})
	fired(decide(inp), "amount_over_call_limit")
}

test_amount_in_mcp_arguments if {
	d := decide(mcp_call("mcp", "issue_refund", {"amount": 5000}, {}))
	outcome(d) == "hold"
	d.risk == "critical"
	fired(decide(mcp_call("mcp", "issue_refund", {"order": 1}, {})), "funds_movement_without_amount")
}

test_external_publish_held if {
	d := decide(call("POST", "publish", "/posts", {"text": "hello"}))
	outcome(d) == "hold"
	reason_for(d, "external_publish") == "external_publish: POST /posts on publish publishes to an external audience"
}

test_external_read_allowed if {
	outcome(decide(call("GET", "publish", "/posts", null))) == "allow"
}

test_publish_path_on_external_host_held if {
	fired(decide(call("POST", "webhook", "/publish", {"text": "hi"})), "external_publish")
	not fired(decide(call("POST", "crm", "/publish", {"text": "hi"})), "external_publish")
}

test_prod_policy_change_held_as_critical if {
	d := decide(call("PUT", "iam", "/policies/agents", {"allow": ["*"]}))
	outcome(d) == "hold"
	d.risk == "critical"
	d.approval.approvers == 2
	reason_for(d, "prod_policy_change") == "prod_policy_change: PUT /policies/agents on iam changes access policy in environment prod"
}

test_policy_change_outside_prod_allowed if {
	outcome(decide(call("PUT", "iam-dev", "/policies/agents", {"allow": ["*"]}))) == "allow"
	outcome(decide(call("GET", "iam", "/policies/agents", null))) == "allow"
}

test_mcp_publish_tool_on_external_host_held if {
	fired(decide(mcp_call("mcp-external", "post_message", {"text": "hi"}, {})), "external_publish")
	not fired(decide(mcp_call("mcp", "post_message", {"text": "hi"}, {})), "external_publish")
}

test_mcp_policy_tool_in_prod_held if {
	d := decide(mcp_call("mcp-prod", "update_role_binding", {"role": "admin"}, {}))
	outcome(d) == "hold"
	reason_for(d, "prod_policy_change") == "prod_policy_change: MCP tool update_role_binding on mcp-prod changes access policy in environment prod"
}

test_fractional_amounts_are_printed_as_is if {
	d := decide(call("POST", "payments", "/refunds", {"amount": 50.5}))
	reason_for(d, "amount_over_call_limit") == "amount_over_call_limit: POST /refunds on payments moves 50.5 > per-call limit 50"
}

test_amount_field_matches_ignoring_case if {
	d := decide(call("POST", "payments", "/refunds", {"Amount": 75}))
	fired(d, "amount_over_call_limit")
	fired(decide(with_query(call("POST", "payments", "/refunds", null), {"AMOUNT": ["70"]})), "amount_over_call_limit")
}

test_unreadable_body_on_funds_route_denied if {
	inp := object.union(call("POST", "payments", "/refunds", null), {"request": {"body_readable": false, "body_size": 17}})
	d := decide(inp)
	outcome(d) == "deny"
	fired(d, "unreadable_body")
}

test_unreadable_body_on_measured_route_denied if {
	inp := object.union(call("POST", "crm", "/notes", null), {"request": {"body_readable": false}, "tool": {"measures": ["records"]}})
	fired(decide(inp), "unreadable_body")
}

test_unreadable_body_read_not_refused if {
	inp := object.union(call("GET", "payments", "/balance", null), {"request": {"body_readable": false}})
	not fired(decide(inp), "unreadable_body")
}
