"""Python stubs for the part of Envoy's ext_authz gRPC API the edge implements (RLQS comes from xds-protos)."""
