# Builders for complete input.v2 documents; tests override parts with object.union.
package sidecar.authz_test

import data.sidecar.authz

now := "2025-06-01T12:00:00Z"

now_ns := 1748779200000000000

# The demo routes, plus a few that exercise other labels.
routes := {
	"crm": {"host": "crm.internal", "labels": {"environment": "dev", "data_classification": "confidential", "reversible": true}},
	"payments": {"host": "payments.internal", "labels": {"environment": "prod", "data_classification": "financial", "reversible": false}},
	"publish": {"host": "127.0.0.1", "labels": {"external": true, "environment": "prod"}},
	"mcp": {"host": "tools.internal", "labels": {"protocol": "mcp"}},
	"mcp-open": {"host": "tools.internal", "labels": {}},
	"mcp-external": {"host": "mcp.example.com", "labels": {"protocol": "mcp"}},
	"mcp-prod": {"host": "tools.internal", "labels": {"protocol": "mcp", "environment": "prod"}},
	"rest": {"host": "tools.internal", "labels": {"protocol": "rest"}},
	"iam": {"host": "iam.internal", "labels": {"environment": "prod"}},
	"iam-dev": {"host": "iam.internal", "labels": {"environment": "dev"}},
	"search": {"host": "search.example.com", "labels": {"data_classification": "public"}},
	"webhook": {"host": "hooks.example.com", "labels": {}},
	"partner": {"host": "api.partner.example", "labels": {"external": false}},
	"wiki": {"host": "wiki.internal", "labels": {"data_classification": "unheard-of"}},
}

empty_history := {
	"calls": 0,
	"by_route": {},
	"by_method": {},
	"totals": {"amount": 0, "records": 0},
	"external_hosts_written": [],
	"classifications_read": [],
	"recent": {"calls": 0, "at_ms": {}},
	"in_flight": {"calls": 0, "totals": {}},
}

base_task := {
	"id": "t-19",
	"intent": "refund duplicate charges",
	"labels": {},
	"allowed_tools": [],
	"created_at": "2025-06-01T11:00:00Z",
	"expires_at": "2025-06-01T13:00:00Z",
	"history": empty_history,
}

call(method, route, path, body) := {
	"version": "v2",
	"request": {
		"method": method,
		"scheme": "http",
		"host": routes[route].host,
		"port": 80,
		"path": path,
		"query": {},
		"headers": {"content-type": "application/json"},
		"body": body,
		"body_sha256": "0000000000000000000000000000000000000000000000000000000000000000",
		"body_size": 0,
		"content_type": "application/json",
		"mode": "route_prefix",
	},
	"tool": {"route": route, "labels": routes[route].labels, "upstream": sprintf("http://%s", [routes[route].host])},
	"agent": {"id": "spiffe://cluster.local/ns/agents/sa/billing-agent", "verified": true},
	"task": base_task,
	"delegation": [],
	"mcp": null,
	"approval": null,
	"time": {"now": now, "now_ns": now_ns},
}

mcp_call(route, tool, arguments, annotations) := object.union(
	call("POST", route, "/mcp", {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}),
	{"mcp": {"method": "tools/call", "id": 1, "tool": tool, "arguments": arguments, "annotations": annotations}},
)

mcp_method(route, method) := object.union(
	call("POST", route, "/mcp", {"jsonrpc": "2.0", "id": 1, "method": method}),
	{"mcp": {"method": method, "id": 1, "tool": null, "arguments": null}},
)

no_task(inp) := object.union(inp, {"task": null})

with_history(inp, history) := object.union(inp, {"task": {"history": object.union(empty_history, history)}})

with_task_fields(inp, fields) := object.union(inp, {"task": fields})

with_query(inp, query) := object.union(inp, {"request": {"query": query}})

# history.recent with n calls, all decided at the given time (Unix ms), with the given outcome.
recent_calls(n, at_ms, outcome) := {"calls": n, "at_ms": {outcome: [at_ms | some _ in numbers.range(1, n)]}}

decide(inp) := d if {
	d := authz.decision with input as inp
}

outcome(d) := "hold" if {
	d.require_approval == true
} else := "allow" if {
	d.allow == true
} else := "deny"

fired(d, rule) if rule in d.rules

# The first reason given by the rule.
reason_for(d, rule) := [r | some r in d.reasons; startswith(r, concat("", [rule, ":"]))][0]
