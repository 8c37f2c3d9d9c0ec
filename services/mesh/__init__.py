"""The data plane's Envoy config from one source: the static bootstrap and the xDS resources the router serves."""
