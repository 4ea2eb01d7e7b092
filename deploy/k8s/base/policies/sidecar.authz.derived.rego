# What data alone decides, worked out once instead of on every call.
#
# OPA caches nothing from one evaluation to the next, so a value that depends on
# data.sidecar.config alone (the approval requirements and the credential TTL
# per risk, the knob lists as lookup tables, the single outcome the anomaly rules
# count) would be worked out again for every call. The sidecar's embedded engine
# evaluates this document once when it loads the policy, after the data check has
# passed, and sets the result as data.sidecar.runtime.derived; the rules read it
# there when it is set and compute the same value themselves when it is not (an
# OPA server, a Rego test run). Every entry must be exactly what the rules would
# compute per call from the same data: the decisions do not depend on whether it
# is set.
package sidecar.authz

# risk -> the approval requirements a held call at that risk gets.
derived.approval_requirements := {r: approval_requirements_at(r) | some r in risk_levels}

# risk -> the credential TTL at that risk, clamped (ttl.rego).
derived.ttl_seconds := {r: clamp_int(risk_ttl_at(r), 1, 86400) | some r in risk_levels}

# records_query_params lower-cased, as keys: a query parameter is one lookup.
derived.records_query_params := lower_keys(cfg.records_query_params)

# agent id -> {route: true} for the routes it may call ("*" among them for every route).
derived.agent_routes := {agent: {r: true | some r in strings(routes)} | some agent, routes in cfg.agent_routes} if {
	is_object(cfg.agent_routes)
}

# route -> its credential audience, where the knob sets a usable one.
derived.audiences := {r: a | some r, a in obj(cfg.audiences); is_string(a); a != ""}

# The one outcome the rate and denial rules count, when the knob names one.
derived.rate_outcome := cfg.anomalies.rate_outcomes[0] if {
	count(cfg.anomalies.rate_outcomes) == 1
	is_string(cfg.anomalies.rate_outcomes[0])
}

derived.denied_outcome := cfg.anomalies.denied_outcomes[0] if {
	count(cfg.anomalies.denied_outcomes) == 1
	is_string(cfg.anomalies.denied_outcomes[0])
}
