# Normalized facts about the call. The embedded engine raises on builtin type
# errors (a string where a number was expected, a bad timestamp), so nothing
# here trusts the shape of input: every value goes through a typed accessor.
package sidecar.authz

default cfg := {}

cfg := data.sidecar.config if is_object(data.sidecar.config)

default doc := {}

doc := input if is_object(input)

# -- typed accessors --------------------------------------------------------

str(x) := x if {
	is_string(x)
} else := ""

num(x) := x if {
	is_number(x)
} else := to_number(x) if {
	is_string(x)
	regex.match(number_text, x)
} else := 0

# Numbers as text, bounded so to_number can never fail.
number_text := `^-?[0-9]{1,15}(\.[0-9]{1,15})?$`

obj(x) := x if {
	is_object(x)
} else := {}

arr(x) := x if {
	is_array(x)
} else := []

strings(x) := [s | some s in arr(x); is_string(s)]

lower_strings(x) := {lower(s) | some s in strings(x)}

in_str(path) := str(object.get(doc, path, ""))

in_obj(path) := obj(object.get(doc, path, {}))

in_num(path) := num(object.get(doc, path, 0))

matches_any(patterns, s) if {
	some p in strings(patterns)
	regex.match(p, s)
}

# Attacker-controlled text is clipped so reasons stay short and readable.
clip(s) := substring(s, 0, 120)

# -- request ----------------------------------------------------------------

method := upper(in_str(["request", "method"]))

path := in_str(["request", "path"])

lpath := lower(path)

host := lower(in_str(["request", "host"]))

route := r if {
	r := in_str(["tool", "route"])
	r != ""
} else := "unknown-route"

labels := in_obj(["tool", "labels"])

label(name) := lower(label_text(object.get(labels, name, "")))

label_text(v) := v if {
	is_string(v)
} else := "true" if {
	v == true
} else := "false" if {
	v == false
} else := ""

classification := label("data_classification")

environment := label("environment")

sensitive_route if classification in lower_strings(cfg.sensitive_classifications)

production if environment in lower_strings(cfg.production_environments)

headers := in_obj(["request", "headers"])

body := object.get(doc, ["request", "body"], null)

# The sidecar could not read the body (neither JSON nor a form): what it carries is unknown.
body_unreadable if object.get(doc, ["request", "body_readable"], true) == false

query := in_obj(["request", "query"])

# -- MCP --------------------------------------------------------------------

has_mcp if is_object(doc.mcp)

mcp_method := in_str(["mcp", "method"])

mcp_tool := lower(in_str(["mcp", "tool"]))

mcp_annotations := in_obj(["mcp", "annotations"])

mcp_tool_call if {
	has_mcp
	mcp_method == "tools/call"
}

# -- destination ------------------------------------------------------------

host_internal if {
	some suffix in strings(cfg.internal_host_suffixes)
	s := trim_prefix(suffix, ".")
	host_matches_suffix(host, s)
}

host_internal if {
	is_ipv4(host)
	some cidr in strings(cfg.internal_cidrs)
	net.cidr_contains(cidr, host)
}

host_matches_suffix(h, s) if h == s

host_matches_suffix(h, s) if endswith(h, concat("", [".", s]))

is_ipv4(h) if regex.match(`^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$`, h)

# The route's `external` label wins over what the host name suggests, both ways:
# `external: false` marks a trusted SaaS upstream as internal.
destination_external if label("external") == "true"

destination_external if {
	label("external") != "false"
	not host_internal
}

# -- task and history -------------------------------------------------------

has_task if is_object(doc.task)

task := in_obj(["task"])

task_id := in_str(["task", "id"])

history := in_obj(["task", "history"])

history_calls := num(object.get(history, "calls", 0))

history_amount := num(object.get(history, ["totals", "amount"], 0))

history_records := num(object.get(history, ["totals", "records"], 0))

# history.recent (v2): how many calls the window holds and, per outcome, when each
# was decided in Unix milliseconds, oldest first.
recent := obj(object.get(history, "recent", {}))

recent_calls := num(object.get(recent, "calls", 0))

recent_at_ms := obj(object.get(recent, "at_ms", {}))

history_classifications := lower_strings(object.get(history, "classifications_read", []))

now_ns := in_num(["time", "now_ns"])

# An RFC 3339 timestamp in ns; undefined, never an error, when malformed
# (time.parse_rfc3339_ns raises on a 30 February).
timestamp_ns(s) := time.parse_rfc3339_ns(s) if {
	is_string(s)
	regex.match(`^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$`, s)
	to_number(substring(s, 8, 2)) <= days_in_month(to_number(substring(s, 0, 4)), to_number(substring(s, 5, 2)))
}

days_in_month(year, 2) := 29 if {
	year % 4 == 0
	not leap_exception(year)
}

days_in_month(year, 2) := 28 if {
	not year % 4 == 0
}

days_in_month(year, 2) := 28 if leap_exception(year)

days_in_month(_, month) := 30 if month in {4, 6, 9, 11}

days_in_month(_, month) := 31 if month in {1, 3, 5, 7, 8, 10, 12}

leap_exception(year) if {
	year % 100 == 0
	year % 400 != 0
}

# -- amounts and records in this call -----------------------------------------

# The objects that may carry amounts and record counts: the JSON body, each
# element of a JSON array body (a batch), and the MCP tool arguments.
payloads := array.concat(as_objects(body), as_objects(object.get(doc, ["mcp", "arguments"], null)))

as_objects(x) := [x] if {
	is_object(x)
} else := [o | some o in x; is_object(o)] if {
	is_array(x)
} else := []

# Field names match ignoring case: many upstreams bind "Amount" to amount. (The
# sidecar refuses a body with two keys equal ignoring case, so at most one matches.)
amount_field_names := lower_strings(cfg.amount_fields)

amount_values := [abs(num(v)) |
	some p in payloads
	some k, v in p
	lower(k) in amount_field_names
	is_amount(v)
]

query_amount_values := [abs(num(v)) |
	some k, values in query
	lower(k) in amount_field_names
	some v in arr(values)
	is_amount(v)
]

is_amount(v) if is_number(v)

is_amount(v) if {
	is_string(v)
	regex.match(number_text, v)
}

# input.request.measures holds the route's configured measures (routes[].measures
# in the sidecar config) found in this call; the sidecar extracted them from the
# JSON paths the operator named. A measure it did not find falls back to the
# fields above.
request_measures := in_obj(["request", "measures"])

measured(name) := request_measures[name] if {
	is_number(request_measures[name])
	request_measures[name] >= 0
}

has_amount if measured("amount")

has_amount if count(amount_values) + count(query_amount_values) > 0

call_amount := measured("amount") if {
	measured("amount")
} else := sum(amount_values) + sum(query_amount_values)

records_field_names := lower_strings(cfg.records_fields)

record_counts contains n if {
	some p in payloads
	some k, v in p
	lower(k) in records_field_names
	n := count_of(v)
}

record_counts contains count(body) if {
	not has_mcp
	is_array(body)
}

record_counts contains num(v) if {
	some k, values in query
	lower(k) in lower_strings(cfg.records_query_params)
	some v in arr(values)
}

count_of(x) := count(x) if {
	is_array(x)
} else := num(x)

call_records := measured("records") if {
	measured("records")
} else := max(record_counts | {0})

# -- wording ----------------------------------------------------------------

action := sprintf("MCP tool %s on %s", [clip(mcp_tool), route]) if {
	mcp_tool_call
} else := sprintf("MCP %s on %s", [clip(mcp_method), route]) if {
	has_mcp
} else := sprintf("%s %s on %s", [clip(method), clip(path), route])

task_name := sprintf("task %s", [clip(task_id)])

# Whole numbers print without a fraction, whatever JSON number form they came in.
fmt(n) := format_int(n, 10) if {
	is_number(n)
	n == floor(n)
} else := sprintf("%v", [n])

clamp_int(x, lo, hi) := max({lo, min({hi, floor(num(x))})})
