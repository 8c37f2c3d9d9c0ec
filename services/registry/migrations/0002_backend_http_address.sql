-- Backends gain their KServe v2 HTTP/REST address, for the data plane's /v2 REST routes; '' = gRPC only.
ALTER TABLE backends ADD COLUMN http_address text NOT NULL DEFAULT '';
