# Anomalies: a task behaving like a runaway loop or a probe. Each one denies
# the call and obliges the sidecar to revoke every credential of the task.
package sidecar.authz

anomaly contains {
	"rule": "task_call_cap",
	"reason": sprintf("task_call_cap: %s made %s calls > hard cap %s", [task_name, fmt(history_calls + 1), fmt(cfg.anomalies.max_calls_per_task)]),
} if {
	has_task
	history_calls + 1 > cfg.anomalies.max_calls_per_task
}

# Only allowed calls count towards the rate: held and denied calls reach no
# upstream, and repeated denials have their own rule. The times are oldest
# first, so the rate is past the cap exactly when the cap-th latest allowed call
# is inside the window: one number to compare, not twenty.
rate_outcomes := {s | some s in arr(cfg.anomalies.rate_outcomes); is_string(s)}

denied_outcomes := {s | some s in arr(cfg.anomalies.denied_outcomes); is_string(s)}

# When each call that counts towards the rate was decided (Unix ms), oldest
# first. With one outcome (the default), its list as the sidecar sent it; the
# outcome is picked at load (derived.rego) when it can be.
rate_times := l if {
	l := recent_at_ms[data.sidecar.runtime.derived.rate_outcome] # recent_times, inlined
	is_array(l)
} else := [] if {
	data.sidecar.runtime.derived.rate_outcome
} else := recent_times(cfg.anomalies.rate_outcomes[0]) if {
	count(cfg.anomalies.rate_outcomes) == 1
	is_string(cfg.anomalies.rate_outcomes[0])
} else := sort([t | some o in rate_outcomes; some t in recent_times(o)])

recent_times(outcome) := l if {
	l := recent_at_ms[outcome]
	is_array(l)
} else := []

anomaly contains {
	"rule": "task_request_rate",
	"reason": sprintf("task_request_rate: %s made %d calls within %ss > cap %s", [task_name, count(calls_in_window) + 1, fmt(cfg.anomalies.rate_window_seconds), fmt(cfg.anomalies.max_calls_in_window)]),
} if {
	has_task
	cap := cfg.anomalies.max_calls_in_window
	times := rate_times
	n := count(times)
	n >= cap
	now := now_ns
	now > 0
	t := times[n - cap]
	is_number(t)
	t * 1000000 >= now - (cfg.anomalies.rate_window_seconds * 1000000000) # rate_window_start_ns, inlined
}

rate_window_start_ns := now_ns - (cfg.anomalies.rate_window_seconds * 1000000000)

calls_in_window := [t | some t in rate_times; is_number(t); t * 1000000 >= rate_window_start_ns]

recent_denied := count(l) if {
	l := recent_at_ms[data.sidecar.runtime.derived.denied_outcome] # recent_times, inlined
	is_array(l)
} else := 0 if {
	data.sidecar.runtime.derived.denied_outcome
} else := count(recent_times(cfg.anomalies.denied_outcomes[0])) if {
	count(cfg.anomalies.denied_outcomes) == 1
	is_string(cfg.anomalies.denied_outcomes[0])
} else := sum([count(recent_times(o)) | some o in denied_outcomes])

anomaly contains {
	"rule": "repeated_denials",
	"reason": sprintf("repeated_denials: %s of the last %s calls in %s were denied > cap %s", [fmt(recent_denied), fmt(recent_calls), task_name, fmt(cfg.anomalies.max_denied_in_recent)]),
} if {
	has_task
	recent_denied > cfg.anomalies.max_denied_in_recent
}

deny contains finding if some finding in anomaly

obligations contains "revoke_task" if count(anomaly) > 0

# A blocked exfiltration attempt means the task is compromised, not just wrong.
obligations contains "revoke_task" if {
	denied
	"exfiltration_chain" in fired_rules
}

obligations contains "audit_alert" if count(anomaly) > 0

obligations contains "audit_alert" if "exfiltration_chain" in fired_rules

obligations contains "audit_alert" if risk == "critical"
