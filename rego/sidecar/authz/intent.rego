# Intent: who may call what, and under which task. Every rule here denies.
package sidecar.authz

write_deny contains {
	"rule": "write_without_task",
	"reason": sprintf("write_without_task: %s is a %s call and writes need a task (declare one and send X-Agent-Task)", [action, action_class]),
} if {
	not has_task
}

# The task's declared intent bounds what the agent may touch while working on it.
# An absent or empty list declares no bound.
task_allowed_routes := strings(r) if {
	r := input.task.labels.allowed_routes
	is_array(r)
	count(r) > 0
} else := []

task_allowed_tools := lower_strings(t) if {
	t := input.task.allowed_tools
	is_array(t)
	count(t) > 0
} else := set()

deny contains {
	"rule": "outside_task_intent",
	"reason": sprintf("outside_task_intent: %s is outside the routes declared by %s (%s)", [action, task_name, concat(", ", task_allowed_routes)]),
} if {
	has_task
	input.task.labels.allowed_routes # most tasks declare none: then task_allowed_routes is not worked out
	count(task_allowed_routes) > 0
	not route in task_allowed_routes
}

deny contains {
	"rule": "outside_task_intent",
	"reason": sprintf("outside_task_intent: %s is outside the tools declared by %s (%s)", [action, task_name, concat(", ", sort(task_allowed_tools))]),
} if {
	has_task
	t := input.task.allowed_tools # most tasks declare none: then task_allowed_tools is not worked out
	is_array(t)
	count(t) > 0
	count(task_allowed_tools) > 0
	not tool_declared
}

tool_declared if lower(route) in task_allowed_tools

tool_declared if {
	mcp_tool_call
	mcp_tool in task_allowed_tools
}

# The MCP session's own plumbing (initialize, tools/list, ping, notifications: the
# library's mcp.read_methods) calls no tool, so a task's declared tools do not bound it.
tool_declared if {
	has_mcp
	not mcp_tool_call
	mcp_method in strings(cfg.mcp.read_methods)
}

tool_declared if {
	mcp_tool_call
	concat(":", [lower(route), mcp_tool]) in task_allowed_tools
}

agent_id := a if {
	a := input.agent.id
	is_string(a)
} else := ""

# data.sidecar.config.agent_routes maps an agent id to its routes; "*" is the
# entry for agents not listed, and a "*" route allows every route. (Only
# strings can equal "*" or a route: the list is used as it is.)
agent_routes := r if {
	r := object.get(cfg.agent_routes, agent_id, object.get(cfg.agent_routes, "*", []))
	is_array(r)
} else := []

# The same lists as lookup tables, worked out at load (derived.rego): the agent's
# own entry, else the "*" entry, else none. Undefined when they were not.
agent_route_table := object.get(t, agent_id, object.get(t, "*", {})) if {
	t := data.sidecar.runtime.derived.agent_routes
}

agent_route_allowed if agent_route_table["*"]

agent_route_allowed if agent_route_table[route]

agent_route_allowed if {
	not agent_route_table
	"*" in agent_routes
}

agent_route_allowed if {
	not agent_route_table
	route in agent_routes
}

deny contains {
	"rule": "agent_route_not_allowed",
	"reason": sprintf("agent_route_not_allowed: agent %s may not call route %s", [clip(agent_id), route]),
} if {
	not agent_route_allowed
}

# The sidecar refuses expired tasks before asking; this covers a clock skew
# between the task store and the sidecar, and an OPA queried directly.
task_expires_ns := e * 1000000000 if {
	e := input.task.expires_at_epoch
	is_number(e)
} else := timestamp_ns(task.expires_at)

deny contains {
	"rule": "task_expired",
	"reason": sprintf("task_expired: %s expired at %s", [task_name, clip(str(task.expires_at))]),
} if {
	has_task
	now := now_ns
	now > 0
	task_expires_ns <= now
}

# The MCP server redefined this tool (its description, schemas or annotations) after
# the task first listed it: what the agent, or a human, agreed to use is not what
# would run. Refused until a new task lists the tool afresh.
deny contains {
	"rule": "mcp_tool_changed",
	"reason": sprintf("mcp_tool_changed: the server changed %s of tool %s since %s listed it; start a new task to use it", [concat(", ", strings(object.get(doc, ["mcp", "tool_changed", "fields"], []))), clip(mcp_tool), task_name]),
} if {
	mcp_tool_call
	count(strings(object.get(doc, ["mcp", "tool_changed", "fields"], []))) > 0
}
