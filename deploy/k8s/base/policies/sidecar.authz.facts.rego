# Normalized facts about the call. The embedded engine raises on builtin type
# errors (a string where a number was expected, a bad timestamp), so nothing
# here trusts the shape of input: every value is type-checked before use.
#
# Cost: every evaluation pays for each rule it touches (docs/performance.md,
# "Policy cost"). The facts every call needs read input directly (a reference
# into a value of the wrong type is undefined, never an error, and falls to the
# else branch); the typed accessor functions below serve the rarer paths.
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

method := upper(m) if {
	m := input.request.method
	is_string(m)
} else := ""

path := p if {
	p := input.request.path
	is_string(p)
} else := ""

lpath := lower(path)

host := lower(h) if {
	h := input.request.host
	is_string(h)
} else := ""

route_named if {
	r := input.tool.route
	is_string(r)
	r != ""
}

route := input.tool.route if route_named else := "unknown-route"

labels := l if {
	l := input.tool.labels
	is_object(l)
} else := {}

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

sensitive_classifications := lower_strings(cfg.sensitive_classifications)

sensitive_route if classification in sensitive_classifications

production if environment in lower_strings(cfg.production_environments)

headers := h if {
	h := input.request.headers
	is_object(h)
} else := {}

body := b if {
	b := input.request.body
} else := null

# The sidecar could not read the body (neither JSON nor a form): what it carries is unknown.
body_unreadable if input.request.body_readable == false

query := q if {
	q := input.request.query
	is_object(q)
} else := {}

# -- MCP --------------------------------------------------------------------

has_mcp if is_object(input.mcp)

mcp_method := m if {
	m := input.mcp.method
	is_string(m)
} else := ""

mcp_tool := lower(t) if {
	t := input.mcp.tool
	is_string(t)
} else := ""

mcp_annotations := a if {
	a := input.mcp.annotations
	is_object(a)
} else := {}

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

has_task if is_object(input.task)

task := t if {
	t := input.task
	is_object(t)
} else := {}

task_id := i if {
	i := input.task.id
	is_string(i)
} else := ""

history := h if {
	h := input.task.history
	is_object(h)
} else := {}

history_calls := n if {
	n := input.task.history.calls
	is_number(n)
} else := num(object.get(history, "calls", 0))

history_amount := num(object.get(history, ["totals", "amount"], 0))

history_records := n if {
	n := input.task.history.totals.records
	is_number(n)
} else := num(object.get(history, ["totals", "records"], 0))

# history.recent (v2): how many calls the window holds and, per outcome, when each
# was decided in Unix milliseconds, oldest first.
recent := r if {
	r := input.task.history.recent
	is_object(r)
} else := {}

recent_calls := num(object.get(recent, "calls", 0))

recent_at_ms := a if {
	a := input.task.history.recent.at_ms
	is_object(a)
} else := {}

history_classifications := lower_strings(object.get(history, "classifications_read", []))

now_ns := n if {
	n := input.time.now_ns
	is_number(n)
} else := in_num(["time", "now_ns"])

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
payloads := [] if {
	body == null
	not has_mcp
} else := array.concat(as_objects(body), as_objects(object.get(doc, ["mcp", "arguments"], null)))

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
measured(name) := n if {
	n := input.request.measures[name]
	is_number(n)
	n >= 0
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
	is_array(body)
	not has_mcp
}

# A query parameter named in records_query_params, ignoring case: one lookup in
# the knob's entries lower-cased, a table worked out at load (derived.rego) or,
# without it, per call.
record_counts contains num(v) if {
	some k, values in query
	records_query_params[lower(k)]
	some v in arr(values)
}

records_query_params := t if {
	t := data.sidecar.runtime.derived.records_query_params
} else := lower_keys(cfg.records_query_params)

# The string entries of a collection, lower-cased, as the keys of an object.
lower_keys(x) := {lower(s): true | some s in x; is_string(s)}

count_of(x) := count(x) if {
	is_array(x)
} else := num(x)

call_records := n if {
	n := input.request.measures.records
	is_number(n)
	n >= 0
} else := max(record_counts | {0})

# -- wording ----------------------------------------------------------------

action := sprintf("%s %s on %s", [substring(method, 0, 120), substring(path, 0, 120), route]) if {
	not has_mcp
} else := sprintf("MCP tool %s on %s", [clip(mcp_tool), route]) if {
	mcp_tool_call
} else := sprintf("MCP %s on %s", [clip(mcp_method), route])

task_name := sprintf("task %s", [clip(task_id)])

# Whole numbers print without a fraction, whatever JSON number form they came in.
fmt(n) := format_int(n, 10) if {
	is_number(n)
	n == floor(n)
} else := sprintf("%v", [n])

clamp_int(x, lo, hi) := n if {
	is_number(x)
	n := floor(x)
	n >= lo
	n <= hi
} else := max({lo, min({hi, floor(num(x))})})
