-- API keys: only the SHA-256 of the whole key is stored (services/edge/keys.py says why that suffices).
-- IF NOT EXISTS: schemas made before the edge recorded migrations already have the table.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id text PRIMARY KEY,
    key_hash text NOT NULL UNIQUE,
    tenant text NOT NULL,
    roles text[] NOT NULL DEFAULT '{}',
    description text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
