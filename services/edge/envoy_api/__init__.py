"""Python stubs for the parts of Envoy's RLS and ext_authz gRPC APIs the edge service implements."""
