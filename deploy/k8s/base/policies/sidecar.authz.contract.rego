# The two contracts the rules rely on, checked before anything else counts.
package sidecar.authz

# The input: a v2 document naming a method and a route. Without them no rule
# can reason about the call, and an empty deny set must not read as "allow".
input_errors contains "input is not a v2 document" if not input.version == "v2"

input_errors contains "request.method is missing" if method == ""

input_errors contains "tool.route is missing" if not route_named

# The errors are listed only for an input that is not valid (one step per call).
input_valid if {
	input.version == "v2"
	method != ""
	route_named
}

deny contains {
	"rule": "malformed_input",
	"reason": sprintf("malformed_input: %s; denied", [msg]),
} if {
	not input_valid
	some msg in input_errors
}

# The data: the operator tunes the policy through data.sidecar.config
# (rego/data.json). A knob that is missing or of the wrong type would silently
# switch a rule off, so it denies every call instead, naming the knob.

required_knobs := {
	["read_methods"]: "array",
	["amount_fields"]: "array",
	["records_fields"]: "array",
	["records_query_params"]: "array",
	["limits", "per_call_amount"]: "number",
	["limits", "critical_amount"]: "number",
	["limits", "task_amount"]: "number",
	["limits", "records_per_call"]: "number",
	["limits", "task_records"]: "number",
	["sensitive_classifications"]: "array",
	["classification_risk"]: "object",
	["production_environments"]: "array",
	["internal_host_suffixes"]: "array",
	["internal_cidrs"]: "array",
	["high_impact", "delete_methods"]: "array",
	["high_impact", "funds_path_patterns"]: "array",
	["high_impact", "funds_tool_patterns"]: "array",
	["high_impact", "publish_path_patterns"]: "array",
	["high_impact", "publish_tool_patterns"]: "array",
	["high_impact", "policy_path_patterns"]: "array",
	["high_impact", "policy_tool_patterns"]: "array",
	["mcp", "read_methods"]: "array",
	["mcp", "read_tools"]: "array",
	["mcp", "destructive_tools"]: "array",
	["mcp", "destructive_tool_patterns"]: "array",
	["mcp", "trust_unlabelled_routes"]: "boolean",
	["mcp", "session_header"]: "string",
	["agent_routes"]: "object",
	["audiences"]: "object",
	["ttl_seconds", "low"]: "number",
	["ttl_seconds", "medium"]: "number",
	["ttl_seconds", "high"]: "number",
	["ttl_seconds", "critical"]: "number",
	["approval", "low", "approvers"]: "number",
	["approval", "low", "group"]: "string",
	["approval", "low", "expires_in_seconds"]: "number",
	["approval", "medium", "approvers"]: "number",
	["approval", "medium", "group"]: "string",
	["approval", "medium", "expires_in_seconds"]: "number",
	["approval", "high", "approvers"]: "number",
	["approval", "high", "group"]: "string",
	["approval", "high", "expires_in_seconds"]: "number",
	["approval", "critical", "approvers"]: "number",
	["approval", "critical", "group"]: "string",
	["approval", "critical", "expires_in_seconds"]: "number",
	["rule_risk"]: "object",
	["anomalies", "max_calls_per_task"]: "number",
	["anomalies", "rate_window_seconds"]: "number",
	["anomalies", "max_calls_in_window"]: "number",
	["anomalies", "rate_outcomes"]: "array",
	["anomalies", "max_denied_in_recent"]: "number",
	["anomalies", "denied_outcomes"]: "array",
}

config_errors contains sprintf("%s must be a %s", [concat(".", knob), want]) if {
	some knob, want in required_knobs
	type_name(object.get(cfg, knob, null)) != want
}

# The sidecar sends the times of the 20 latest allowed calls (task.history.recent.at_ms.allow): a higher
# cap could never be reached, and the rate rule would be off without a word.
config_errors contains sprintf("anomalies.max_calls_in_window must be at most %d (the history carries the %d latest allowed calls)", [recent_window, recent_window]) if {
	is_number(cfg.anomalies.max_calls_in_window)
	cfg.anomalies.max_calls_in_window > recent_window
}

recent_window := 20

deny contains {
	"rule": "config_invalid",
	"reason": sprintf("config_invalid: data.sidecar.config.%s; every call is denied until the policy data is fixed", [msg]),
} if {
	not data.sidecar.runtime.config_checked == true # data_checked_at_load, inlined: every call reads it
	some msg in config_errors
}

# The sidecar's embedded engine evaluates config_errors once when it loads the
# policy, refuses to start unless it is empty, and then sets this flag: its data
# cannot change afterwards, and the per-call check is about a sixth of an
# evaluation. An OPA server, whose data a bundle may replace at any time, never
# gets the flag and checks on every call.
data_checked_at_load if data.sidecar.runtime.config_checked == true
