package sidecar.authz_test

import data.sidecar.authz

class_of(inp) := c if {
	c := authz.action_class with input as inp
}

test_get_is_read if {
	class_of(call("GET", "crm", "/customers/42", null)) == "read"
	class_of(call("HEAD", "crm", "/customers/42", null)) == "read"
}

test_post_is_propose if {
	class_of(call("POST", "crm", "/customers", {"name": "Ada"})) == "propose"
	class_of(call("PATCH", "crm", "/customers/42", {"name": "Ada"})) == "propose"
}

test_delete_is_execute if {
	class_of(call("DELETE", "crm", "/customers/42", null)) == "execute"
}

test_write_on_irreversible_route_is_execute if {
	class_of(call("POST", "payments", "/refunds", {"amount": 49})) == "execute"
	class_of(call("GET", "payments", "/refunds/1", null)) == "read"
}

test_mcp_read_only_hint_is_read if {
	inp := mcp_call("mcp", "search_customers", {"q": "ada"}, {"readOnlyHint": true})
	class_of(inp) == "read"
	d := decide(no_task(inp))
	outcome(d) == "allow"
	d.credential.scopes == ["mcp:read"]
}

test_mcp_destructive_hint_wins_over_read_only_hint if {
	class_of(mcp_call("mcp", "tidy", {}, {"readOnlyHint": true, "destructiveHint": true})) == "execute"
}

test_mcp_list_methods_are_read if {
	class_of(mcp_method("mcp", "tools/list")) == "read"
	class_of(mcp_method("mcp", "initialize")) == "read"
}

test_mcp_unannotated_tool_is_propose if {
	class_of(mcp_call("mcp", "create_ticket", {"title": "x"}, {})) == "propose"
}

test_mcp_configured_read_tool_is_read if {
	c := authz.action_class with input as mcp_call("mcp", "lookup", {}, {})
		with data.sidecar.config.mcp.read_tools as ["lookup"]
	c == "read"
}

# A JSON-RPC body sent to a REST route must not downgrade a write.
test_mcp_read_hint_ignored_on_rest_route if {
	class_of(mcp_call("rest", "search_customers", {}, {"readOnlyHint": true})) == "propose"
}

# The sidecar parses JSON-RPC on routes configured protocol: mcp only; the knob is
# off by default so that an input naming MCP on another route never lowers a risk.
test_mcp_read_hint_on_unlabelled_route_follows_knob if {
	inp := mcp_call("mcp-open", "search_customers", {}, {"readOnlyHint": true})
	class_of(inp) == "propose"
	c := authz.action_class with input as inp with data.sidecar.config.mcp.trust_unlabelled_routes as true
	c == "read"
}

test_mcp_session_close_is_read if {
	inp := object.union(call("DELETE", "mcp", "/mcp", null), {"request": {"headers": {"mcp-session-id": "abc"}}})
	class_of(inp) == "read"
	outcome(decide(no_task(inp))) == "allow"
}

test_session_header_on_rest_route_does_not_hide_a_delete if {
	inp := object.union(call("DELETE", "crm", "/customers/42", null), {"request": {"headers": {"mcp-session-id": "abc"}}})
	class_of(inp) == "execute"
	outcome(decide(inp)) == "hold"
}

test_scopes_follow_class if {
	decide(call("GET", "crm", "/customers/42", null)).credential.scopes == ["crm:read"]
	decide(call("POST", "crm", "/customers", {"name": "Ada"})).credential.scopes == ["crm:write"]
}
