-- Backends gain the operator's drain flag: stored here so every router replica tells every Envoy the same.
ALTER TABLE backends ADD COLUMN drained boolean NOT NULL DEFAULT false;
