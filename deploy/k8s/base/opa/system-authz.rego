# Authorization of OPA's own REST API (opa run --authorization=basic).
#
# Every container in the pod shares the loopback interface, so the agent can reach
# 127.0.0.1:8181 as well as the sidecar can. Without this policy it could PUT
# /v1/policies and rewrite the rules that judge it. Only the sidecar's decision query is
# allowed (the decision_path in sidecar.yaml) and the health check; every policy or data
# write, every read of policies or data, is refused.
package system.authz

default allow := false

allow if {
	input.method == "POST"
	input.path == ["v1", "data", "sidecar", "authz", "decision"]
}

allow if {
	input.method == "GET"
	input.path == ["health"]
}
