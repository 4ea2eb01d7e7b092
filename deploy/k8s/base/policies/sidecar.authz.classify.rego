# Action classes: what the call does, whatever the protocol.
#   read    - no side effects: GET/HEAD/OPTIONS, MCP readOnlyHint, MCP list/read methods
#   propose - a reversible change: create, update
#   execute - irreversible: DELETE, destructive MCP tools, writes to routes labelled reversible: false
# The class picks the credential scope (<route>:read or <route>:write) and
# whether a task is required; execute also raises the risk (irreversible_action).
package sidecar.authz

# A plain HTTP call with a read method that is not also a delete method (most
# calls) is what the chain from "execute" below makes it, read, in fewer steps.
action_class := "read" if {
	not has_mcp
	method in cfg.read_methods
	not method in cfg.high_impact.delete_methods
} else := "execute" if {
	destructive
} else := "read" if {
	read_only
} else := "execute" if {
	label("reversible") == "false"
} else := "propose"

is_read if action_class == "read"

is_write if action_class != "read"

# The knob lists are used as they are: only strings can equal the method, and
# their type is checked (contract.rego) before any of them is read.
destructive if {
	not has_mcp
	method in cfg.high_impact.delete_methods
	not mcp_session_close
}

destructive if {
	mcp_tool_call
	mcp_destructive
}

# MCP hints are only ever trusted towards the safer class.
mcp_destructive if mcp_annotations.destructiveHint == true

mcp_destructive if mcp_tool in lower_strings(cfg.mcp.destructive_tools)

mcp_destructive if matches_any(cfg.mcp.destructive_tool_patterns, mcp_tool)

read_only if {
	not has_mcp
	method in cfg.read_methods
}

read_only if mcp_session_close

read_only if {
	mcp_trusted
	not mcp_tool_call
	mcp_method in strings(cfg.mcp.read_methods)
}

read_only if {
	mcp_trusted
	mcp_tool_call
	mcp_annotations.readOnlyHint == true
}

read_only if {
	mcp_trusted
	mcp_tool_call
	mcp_tool in lower_strings(cfg.mcp.read_tools)
}

# A JSON-RPC shaped body sent to a REST route must not turn a write into a read:
# MCP classification applies on routes labelled protocol: mcp, and on routes
# without a protocol label only while mcp.trust_unlabelled_routes is true.
mcp_trusted if {
	has_mcp
	label("protocol") == "mcp"
}

mcp_trusted if {
	has_mcp
	label("protocol") == ""
	cfg.mcp.trust_unlabelled_routes == true
}

# Streamable HTTP clients end their session with a bodiless DELETE.
mcp_session_close if {
	method == "DELETE"
	label("protocol") == "mcp"
	body == null
	is_string(headers[cfg.mcp.session_header])
}

scope_verb := "read" if {
	is_read
} else := "write"
