# The decision: data.sidecar.authz.decision, schema decision.v1.
#
# Outcome: deny rules win over hold rules, hold rules over allow.
#   deny  - allow: false, require_approval: false
#   hold  - allow: false, require_approval: true
#   allow - allow: true,  require_approval: false
#
# Every rule adds a finding {"rule", "reason"} to one of three sets: deny,
# hold or notes (notes only raise the risk). Risk is the highest of the
# findings' risks (data.sidecar.config.rule_risk, a note may carry its own),
# and picks the credential TTL and the approval requirements.
#
# input.task.history (input v2), the bounded summary of the task's earlier calls,
# calls still in flight included, that the sidecar provides (a missing field reads
# as zero or empty):
#   {
#     "calls": 12,                                   calls so far in the task
#     "by_route": {"crm": 10, "payments": 2},        calls per route
#     "by_method": {"GET": 10, "POST": 2},           calls per HTTP method
#     "by_tool": {"refund": 2},                      calls per MCP tool (tools/call)
#     "totals": {"amount": 98, "records": 10},       per measure, summed over allowed calls (routes[].measures add more)
#     "external_hosts_written": ["api.example.com"], hosts outside the cluster written to
#     "classifications_read": ["confidential"],      data_classification labels of routes read
#     "recent": {                                    the last calls (20 by default)
#       "calls": 12,                                 how many
#       "at_ms": {"allow": [1748779198000, ...],     per outcome ("allow", "deny", "hold"), when each
#                 "deny": [1748779199000]}           was decided, in Unix milliseconds, oldest first;
#     },                                             "allow": the 20 latest allowed calls, whatever came between
#     "in_flight": {"calls": 1, "totals": {"amount": 49}}   the allowed calls not answered yet, apart
#   }
# The task itself carries "expires_at_epoch" (Unix seconds) next to "expires_at".
package sidecar.authz

# Anything the rules cannot decide (no input, a policy bug) is a deny.
default decision := {
	"allow": false,
	"require_approval": false,
	"reasons": ["policy_error: the policy could not decide on this input; denied"],
	"risk": "high",
	"obligations": ["audit_alert"],
	"rules": ["policy_error"],
}

# Most calls find nothing: then the call is allowed at low risk with no
# obligation, and the decision is written down without walking the finding sets
# (every obligation comes from a finding: an anomaly, an exfiltration chain, a
# critical risk). It is the document the general branch gives for no finding.
decision := {
	"allow": true,
	"require_approval": false,
	"reasons": [sprintf("allowed: %s is class %s; allowed at low risk", [action, action_class])], # allowed_reason at low risk
	"risk": "low",
	"credential": credential,
	"approval": approval_requirements,
	"obligations": [],
	"rules": ["allowed"],
	"measures": judged_measures,
} if {
	nothing_found
} else := {
	"allow": allow,
	"require_approval": require_approval,
	"reasons": reasons,
	"risk": risk,
	"credential": credential,
	"approval": approval_requirements,
	"obligations": sort(obligations),
	"rules": sort(fired_rules),
	"measures": judged_measures,
}

# What this call adds to its task's totals, as the rules above judged it: the sidecar counts the larger of
# this and its own measures, so a total never misses an amount read from the query or an array body.
# Amounts are judged on writes only (a read moves no money), so a read reports its records alone.
judged_measures := {"amount": call_amount, "records": call_records} if {
	is_write
} else := {"records": call_records}

# Rules that only ever apply to writes are kept in their own sets, which a read
# never evaluates: write_deny, write_hold and write_notes.
deny contains f if {
	is_write
	some f in write_deny
}

hold contains f if {
	is_write
	some f in write_hold
}

notes contains f if {
	is_write
	some f in write_notes
}

denied if count(deny) > 0

needs_approval if {
	not denied
	count(hold) > 0
	not approval_granted
}

default allow := false

allow if {
	not denied
	not needs_approval
}

default require_approval := false

require_approval if needs_approval

# -- explanation ------------------------------------------------------------

outcome_notes contains {
	"rule": "approval_granted",
	"reason": sprintf("approval_granted: approval %s covers %s; allowed at %s risk", [clip(approval_id), concat(", ", sort({f.rule | some f in hold})), risk]),
} if {
	not denied
	count(hold) > 0
	approval_granted
}

outcome_notes contains {"rule": "allowed", "reason": allowed_reason} if {
	not denied
	count(hold) == 0
}

allowed_reason := sprintf("allowed: %s is class %s; allowed at %s risk", [action, action_class, risk])

findings := (deny | hold) | notes

nothing_found if {
	count(deny) == 0
	count(hold) == 0
	count(notes) == 0
}

fired_rules := {f.rule | some f in findings} | {f.rule | some f in outcome_notes}

reasons := array.slice(
	array.concat(
		array.concat([f.reason | some f in deny], [f.reason | some f in hold]),
		array.concat([f.reason | some f in notes], [f.reason | some f in outcome_notes]),
	),
	0, 50,
)

# -- risk -------------------------------------------------------------------

risk_levels := ["low", "medium", "high", "critical"]

risk_ranks := {"low": 0, "medium": 1, "high": 2, "critical": 3}

finding_risk(f) := f.risk if {
	f.risk in risk_levels
} else := object.get(obj(cfg.rule_risk), f.rule, "high")

# An unknown level counts as high.
risk := "low" if {
	nothing_found
} else := risk_levels[max({0} | {object.get(risk_ranks, finding_risk(f), 2) | some f in findings})]

# -- credential -------------------------------------------------------------

audience := a if {
	r := route
	a := object.get(data.sidecar.runtime.derived.audiences, r, r) # the usable ones, picked at load (derived.rego)
} else := a if {
	a := cfg.audiences[route]
	is_string(a)
	a != ""
} else := route

credential := {
	"audience": audience,
	"scopes": [sprintf("%s:%s", [route, scope_verb])],
	"ttl_seconds": ttl_seconds,
}
