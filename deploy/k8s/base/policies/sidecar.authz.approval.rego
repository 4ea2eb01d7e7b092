# Who must approve a held call, by risk, and whether the approval this retry
# carries covers it.
package sidecar.authz

approval_level := l if {
	l := cfg.approval[risk]
	is_object(l)
} else := {}

approval_group := g if {
	g := approval_level.group
	is_string(g)
	g != ""
} else := "approvers"

approval_requirements := {
	"approvers": clamp_int(object.get(approval_level, "approvers", 1), 1, 10),
	"group": approval_group,
	"expires_in_seconds": clamp_int(object.get(approval_level, "expires_in_seconds", 900), 1, 604800),
}

# input.approval is set by the sidecar only once the approval is verified as
# granted for this exact request; the policy still counts distinct approvers,
# never counting the agent itself ("can execute" is not "can decide").
approval_granted if {
	is_object(doc.approval)
	object.get(doc.approval, "status", "approved") in {"approved", "granted"}
	not approvers_short
}

approvers_short if {
	is_array(doc.approval.approvals)
	count(distinct_approvers) < approval_requirements.approvers
}

distinct_approvers := {who |
	some entry in doc.approval.approvals
	who := approver_name(entry)
	who != ""
	who != agent_id
}

approver_name(entry) := str(entry.approver) if {
	is_object(entry)
} else := str(entry)

approval_id := str(object.get(obj(doc.approval), "id", ""))
