# High-impact actions: irreversible or hard to undo, so a human approves the
# exact call first. Every rule here holds for approval.
package sidecar.authz

write_hold contains {
	"rule": "high_impact_delete",
	"reason": sprintf("high_impact_delete: %s deletes data", [action]),
} if {
	destructive
}

funds_movement if {
	is_write
	matches_any(cfg.high_impact.funds_path_patterns, lpath)
}

funds_movement if {
	is_write
	mcp_tool_call
	matches_any(cfg.high_impact.funds_tool_patterns, mcp_tool)
}

write_hold contains {
	"rule": "amount_over_call_limit",
	"reason": sprintf("amount_over_call_limit: %s moves %s > per-call limit %s", [action, fmt(call_amount), fmt(cfg.limits.per_call_amount)]),
} if {
	call_amount > cfg.limits.per_call_amount
}

write_hold contains {
	"rule": "critical_amount",
	"reason": sprintf("critical_amount: %s moves %s > critical amount %s", [action, fmt(call_amount), fmt(cfg.limits.critical_amount)]),
} if {
	call_amount > cfg.limits.critical_amount
}

# Without an amount the blast radius of a funds movement is unknown
# (a form-encoded body, another field name): a human looks at it.
write_hold contains {
	"rule": "funds_movement_without_amount",
	"reason": sprintf("funds_movement_without_amount: %s moves funds but carries no amount in %s", [action, concat(", ", strings(cfg.amount_fields))]),
} if {
	funds_movement
	not has_amount
}

external_publish if {
	is_write
	label("external") == "true"
}

external_publish if {
	is_write
	destination_external
	matches_any(cfg.high_impact.publish_path_patterns, lpath)
}

external_publish if {
	is_write
	destination_external
	mcp_tool_call
	matches_any(cfg.high_impact.publish_tool_patterns, mcp_tool)
}

write_hold contains {
	"rule": "external_publish",
	"reason": sprintf("external_publish: %s publishes to an external audience", [action]),
} if {
	external_publish
}

policy_change if matches_any(cfg.high_impact.policy_path_patterns, lpath)

policy_change if {
	mcp_tool_call
	matches_any(cfg.high_impact.policy_tool_patterns, mcp_tool)
}

write_hold contains {
	"rule": "prod_policy_change",
	"reason": sprintf("prod_policy_change: %s changes access policy in environment %s", [action, environment]),
} if {
	production
	policy_change
}
