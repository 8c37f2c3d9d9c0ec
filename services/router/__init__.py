"""The router: Envoy's xDS control plane (registry routes + backend probes → snapshots), drains, shadow comparison."""
