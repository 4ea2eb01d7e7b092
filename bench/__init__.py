"""The benchmark behind `make bench`: the sidecar beside a direct call and nginx, on loopback."""
