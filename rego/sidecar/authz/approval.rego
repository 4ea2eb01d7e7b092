# Who must approve a held call, by risk, and whether the approval this retry
# carries covers it.
package sidecar.authz

approval_requirements := a if {
	a := data.sidecar.runtime.derived.approval_requirements[risk] # set at load (derived.rego)
} else := approval_requirements_at(risk)

approval_requirements_at(r) := {
	"approvers": clamp_int(object.get(approval_level(r), "approvers", 1), 1, 10),
	"group": approval_group(r),
	"expires_in_seconds": clamp_int(object.get(approval_level(r), "expires_in_seconds", 900), 1, 604800),
}

approval_level(r) := l if {
	l := cfg.approval[r]
	is_object(l)
} else := {}

approval_group(r) := g if {
	g := approval_level(r).group
	is_string(g)
	g != ""
} else := "approvers"

# input.approval is set by the sidecar only once the approval is verified as
# granted for this exact request; the policy still counts distinct approvers,
# never counting the agent itself ("can execute" is not "can decide").
approval_granted if {
	is_object(doc.approval)
	object.get(doc.approval, "status", "approved") in {"approved", "granted"}
	not approvers_short
	not approved_by_another_group
	not held_for_another_rule
}

# The approval lists the rules that held the call when the humans were asked; a rule holding it now that
# they were not shown (a confidential read since: exfiltration_chain) is not covered. Approvals without
# the list (made by an older sidecar) are judged by their approvers and group alone.
held_for_another_rule if {
	shown := {r | some r in doc.approval.rules; is_string(r)}
	count(shown) > 0
	some f in hold
	not f.rule in shown
}

# The approval was asked of one group (its approvers were checked against it when they signed); a call
# that now needs another group's approval (the risk rose, and each risk names its group) is not covered.
approved_by_another_group if {
	is_string(doc.approval.group)
	doc.approval.group != approval_requirements.group
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
