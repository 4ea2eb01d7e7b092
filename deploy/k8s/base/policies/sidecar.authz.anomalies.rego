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
# upstream, and repeated denials have their own rule. History is oldest first,
# so the rate is past the cap exactly when the cap-th latest allowed call is
# inside the window: one timestamp to parse, not twenty.
# The outcome lists are hoisted into rules: a function call inside a comprehension
# is evaluated again for every element.
rate_outcomes := {s | some s in strings(cfg.anomalies.rate_outcomes)}

denied_outcomes := {s | some s in strings(cfg.anomalies.denied_outcomes)}

recent_allowed := [r | some r in history_recent_raw; rate_outcomes[r.outcome]]

rate_window_start_ns := now_ns - (cfg.anomalies.rate_window_seconds * 1000000000)

anomaly contains {
	"rule": "task_request_rate",
	"reason": sprintf("task_request_rate: %s made %d calls within %ss > cap %s", [task_name, count(calls_in_window) + 1, fmt(cfg.anomalies.rate_window_seconds), fmt(cfg.anomalies.max_calls_in_window)]),
} if {
	has_task
	now_ns > 0
	cap := cfg.anomalies.max_calls_in_window
	count(recent_allowed) >= cap
	at_ns(recent_allowed[count(recent_allowed) - cap].at) >= rate_window_start_ns
}

calls_in_window := [r | some r in recent_allowed; at_ns(r.at) >= rate_window_start_ns]

at_ns(at) := at * 1000000000 if {
	is_number(at)
} else := timestamp_ns(at)

recent_denied := [r | some r in history_recent_raw; denied_outcomes[r.outcome]]

anomaly contains {
	"rule": "repeated_denials",
	"reason": sprintf("repeated_denials: %d of the last %d calls in %s were denied > cap %s", [count(recent_denied), count(history_recent), task_name, fmt(cfg.anomalies.max_denied_in_recent)]),
} if {
	has_task
	count(recent_denied) > cfg.anomalies.max_denied_in_recent
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
