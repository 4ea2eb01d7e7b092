# A policy with one path that evaluates for seconds (a runaway evaluation) beside fast ones.
package sidecar.authz

import rego.v1

default decision := {"allow": false, "reasons": ["slow fixture: nothing matched"], "risk": "low"}

decision := {"allow": true, "reasons": ["slow fixture: reads are allowed"], "risk": "low"} if {
	input.request.method == "GET"
	not contains(input.request.path, "/runaway")
}

decision := {"allow": true, "reasons": ["slow fixture: finished the runaway evaluation"], "risk": "low"} if {
	contains(input.request.path, "/runaway")
	count([x | some x in numbers.range(1, 1050000); x % 7 == 0]) > 0
}
