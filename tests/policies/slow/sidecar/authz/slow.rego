# A policy with one path that evaluates for seconds (a runaway evaluation) beside fast ones.
package sidecar.authz

import rego.v1

default decision := {"allow": false, "reasons": ["slow fixture: nothing matched"], "risk": "low"}

decision := {"allow": true, "reasons": ["slow fixture: reads are allowed"], "risk": "low"} if {
	input.request.method == "GET"
	not contains(input.request.path, "/runaway")
	not contains(input.request.path, "/overrun")
}

decision := {"allow": true, "reasons": ["slow fixture: finished the runaway evaluation"], "risk": "low"} if {
	contains(input.request.path, "/runaway")
	count([x | some x in numbers.range(1, 1050000); x % 7 == 0]) > 0
}

# A shorter runaway (~2 s unloaded): past a 1 s deadline, over sooner.
decision := {"allow": true, "reasons": ["slow fixture: finished the short runaway evaluation"], "risk": "low"} if {
	contains(input.request.path, "/overrun")
	count([x | some x in numbers.range(1, 600000); x % 7 == 0]) > 0
}
