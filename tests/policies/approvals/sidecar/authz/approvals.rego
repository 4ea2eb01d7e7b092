# A policy for the human-approval tests: reads pass, every write is held for a human,
# and a write carrying a granted approval is allowed with a write scope (the policy sees
# input.approval on the retry and decides again).
package sidecar.authz

import rego.v1

default decision := {"allow": false, "reasons": ["approvals fixture: nothing matched"]}

decision := {"allow": true, "reasons": ["approvals fixture: reads are allowed"], "risk": "low"} if {
	input.request.method == "GET"
}

decision := {
	"allow": false, "require_approval": true, "risk": "high",
	"reasons": [sprintf("approvals fixture: %s on %s needs a human", [input.request.method, input.tool.route])],
	"approval": approval_spec,
} if {
	input.request.method != "GET"
	input.approval == null
}

decision := {
	"allow": true, "risk": "high",
	"reasons": [sprintf("approvals fixture: approved by %d approver(s)", [count(input.approval.approvals)])],
	"credential": {"audience": input.tool.route, "scopes": [sprintf("%s:write", [input.tool.route])], "ttl_seconds": 30},
} if {
	input.request.method != "GET"
	input.approval.status == "approved"
}

approval_spec := {"approvers": 2, "group": "finance", "expires_in_seconds": 600} if {
	startswith(input.request.path, "/payments")
} else := {"approvers": 1, "group": "approvers", "expires_in_seconds": 1} if {
	contains(input.request.path, "/short/")
} else := {"approvers": 1, "group": "approvers", "expires_in_seconds": 600}
