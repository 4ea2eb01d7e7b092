package sidecar.authz_test

test_demo_get_with_task_allowed_at_low_risk if {
	d := decide(call("GET", "crm", "/customers/42", null))
	d.allow == true
	d.require_approval == false
	d.risk == "low"
	d.credential == {"audience": "crm", "scopes": ["crm:read"], "ttl_seconds": 300}
	d.obligations == []
}

test_demo_get_without_task_allowed if {
	d := decide(no_task(call("GET", "crm", "/customers/42", null)))
	outcome(d) == "allow"
	d.risk == "low"
	fired(d, "read_without_task")
}

test_demo_post_without_task_denied if {
	d := decide(no_task(call("POST", "crm", "/customers", {"name": "Ada"})))
	outcome(d) == "deny"
	fired(d, "write_without_task")
	contains(reason_for(d, "write_without_task"), "writes need a task")
}

# Deny rules win over approval rules.
test_delete_without_task_denied_not_held if {
	d := decide(no_task(call("DELETE", "crm", "/customers/42", null)))
	outcome(d) == "deny"
	fired(d, "write_without_task")
	fired(d, "high_impact_delete")
}

test_route_outside_task_routes_denied if {
	inp := with_task_fields(call("GET", "payments", "/refunds", null), {"labels": {"allowed_routes": ["crm"]}})
	d := decide(inp)
	outcome(d) == "deny"
	reason_for(d, "outside_task_intent") == "outside_task_intent: GET /refunds on payments is outside the routes declared by task t-19 (crm)"
}

test_route_inside_task_routes_allowed if {
	inp := with_task_fields(call("GET", "crm", "/customers/42", null), {"labels": {"allowed_routes": ["crm", "payments"]}})
	outcome(decide(inp)) == "allow"
}

test_tool_outside_allowed_tools_denied if {
	inp := with_task_fields(mcp_call("mcp", "create_ticket", {}, {}), {"allowed_tools": ["search_customers"]})
	d := decide(inp)
	outcome(d) == "deny"
	fired(d, "outside_task_intent")
}

test_allowed_tools_match_route_tool_or_both if {
	outcome(decide(with_task_fields(mcp_call("mcp", "create_ticket", {}, {}), {"allowed_tools": ["create_ticket"]}))) == "allow"
	outcome(decide(with_task_fields(mcp_call("mcp", "create_ticket", {}, {}), {"allowed_tools": ["mcp:create_ticket"]}))) == "allow"
	outcome(decide(with_task_fields(mcp_call("mcp", "create_ticket", {}, {}), {"allowed_tools": ["mcp"]}))) == "allow"
}

test_empty_intent_lists_do_not_bound if {
	inp := with_task_fields(call("GET", "payments", "/refunds", null), {"labels": {"allowed_routes": []}, "allowed_tools": []})
	outcome(decide(inp)) == "allow"
}

test_agent_route_not_allowed if {
	d := decide(call("GET", "payments", "/refunds", null)) with data.sidecar.config.agent_routes as {
		"spiffe://cluster.local/ns/agents/sa/billing-agent": ["crm"],
		"*": ["*"],
	}
	outcome(d) == "deny"
	reason_for(d, "agent_route_not_allowed") == "agent_route_not_allowed: agent spiffe://cluster.local/ns/agents/sa/billing-agent may not call route payments"
}

test_agent_default_entry_applies if {
	routes_by_agent := {"spiffe://other": ["*"], "*": ["crm"]}
	outcome(decide(call("GET", "crm", "/customers", null))) == "allow" with data.sidecar.config.agent_routes as routes_by_agent
	outcome(decide(call("GET", "payments", "/refunds", null))) == "deny" with data.sidecar.config.agent_routes as routes_by_agent
}

test_task_expired_denied if {
	d := decide(with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at": "2025-06-01T11:59:59Z"}))
	outcome(d) == "deny"
	fired(d, "task_expired")
}

test_task_expiry_epoch_preferred if {
	d := decide(with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at_epoch": 1748779100}))
	fired(d, "task_expired")
}

test_missing_knob_denies_everything if {
	config := json.remove(data.sidecar.config, ["limits/critical_amount"])
	d := decide(call("GET", "crm", "/customers/42", null)) with data.sidecar.config as config
	outcome(d) == "deny"
	reason_for(d, "config_invalid") == "config_invalid: data.sidecar.config.limits.critical_amount must be a number; every call is denied until the policy data is fixed"
}

test_a_rate_cap_beyond_the_history_denies_everything if {
	d := decide(call("GET", "crm", "/customers/42", null)) with data.sidecar.config.anomalies.max_calls_in_window as 21
	outcome(d) == "deny"
	reason_for(d, "config_invalid") == "config_invalid: data.sidecar.config.anomalies.max_calls_in_window must be at most 20 (the history carries the 20 latest allowed calls); every call is denied until the policy data is fixed"
}

test_mistyped_knob_denies_everything if {
	d := decide(call("GET", "crm", "/customers/42", null)) with data.sidecar.config.limits.per_call_amount as "50"
	outcome(d) == "deny"
	fired(d, "config_invalid")
}

test_knob_check_skipped_once_checked_at_load if {
	d := decide(call("GET", "crm", "/customers/42", null)) with data.sidecar.config.limits.per_call_amount as "50"
		with data.sidecar.runtime.config_checked as true
	not fired(d, "config_invalid")
}

test_other_mcp_methods_are_writes if {
	d := decide(no_task(mcp_method("mcp", "sampling/createMessage")))
	reason_for(d, "write_without_task") == "write_without_task: MCP sampling/createMessage on mcp is a propose call and writes need a task (declare one and send X-Agent-Task)"
}

# Only real calendar dates parse; a malformed expiry never breaks the policy.
test_task_expiry_parses_calendar_dates_only if {
	expired(with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at": "2024-02-29T00:00:00Z"}))
	expired(with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at": "2000-02-29T00:00:00+02:00"}))
	expired(with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at": "2025-05-31T23:59:59.5Z"}))
	expired(with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at": "2025-02-28T00:00:00Z"}))
	not expired(with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at": "2025-02-29T00:00:00Z"}))
	not expired(with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at": "2100-02-29T00:00:00Z"}))
	not expired(with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at": "2025-04-31T00:00:00Z"}))
	not expired(with_task_fields(call("GET", "crm", "/customers/42", null), {"expires_at": "yesterday"}))
}

expired(inp) if fired(decide(inp), "task_expired")

test_changed_mcp_tool_denied if {
	inp := object.union(mcp_call("mcp", "search_customers", {}, {}), {"mcp": {"tool_changed": {"fields": ["description"]}}})
	d := decide(inp)
	outcome(d) == "deny"
	reason_for(d, "mcp_tool_changed") == sprintf("mcp_tool_changed: the server changed description of tool search_customers since task %s listed it; start a new task to use it", [inp.task.id])
}

test_unchanged_mcp_tool_not_denied_for_change if {
	not fired(decide(mcp_call("mcp", "search_customers", {}, {})), "mcp_tool_changed")
}

test_declared_tools_leave_the_mcp_session_plumbing_alone if {
	inp := object.union(mcp_method("mcp", "tools/list"), {"task": {"allowed_tools": ["search_customers"]}})
	not fired(decide(inp), "outside_task_intent")
	call := object.union(mcp_call("mcp", "delete_record", {}, {}), {"task": {"allowed_tools": ["search_customers"]}})
	fired(decide(call), "outside_task_intent")
}
