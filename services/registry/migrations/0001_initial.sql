-- Registry schema v1. Runs with search_path set to the registry's own schema.

-- One row: the routing-table revision. Every write bumps it in its own transaction, so the row lock
-- orders commits and the revision a reader sees always matches the data in its snapshot.
CREATE TABLE registry_state (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    revision bigint NOT NULL
);
INSERT INTO registry_state (id, revision) VALUES (true, 0);

CREATE TABLE models (
    model_id text PRIMARY KEY,
    description text NOT NULL DEFAULT '',
    task text NOT NULL DEFAULT '',
    labels jsonb NOT NULL DEFAULT '{}'::jsonb,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL,
    -- Revision of the last write; the etag is derived from it, so it changes on every write.
    revision bigint NOT NULL
);

CREATE TABLE model_versions (
    model_id text NOT NULL REFERENCES models (model_id) ON DELETE CASCADE,
    version bigint NOT NULL CHECK (version > 0),
    triton_model_name text NOT NULL,
    triton_model_version bigint NOT NULL DEFAULT 0,
    artifact_uri text NOT NULL DEFAULT '',
    stage smallint NOT NULL CHECK (stage BETWEEN 1 AND 4),
    description text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL,
    revision bigint NOT NULL,
    PRIMARY KEY (model_id, version)
);
-- Route building reads only servable versions.
CREATE INDEX model_versions_servable ON model_versions (model_id) WHERE stage IN (2, 3);

CREATE TABLE traffic_policies (
    model_id text PRIMARY KEY REFERENCES models (model_id) ON DELETE CASCADE,
    -- [{"version": 3, "weight": 90}, ...]
    splits jsonb NOT NULL DEFAULT '[]'::jsonb,
    shadow_version bigint,
    shadow_sample_rate double precision,
    sticky_header text NOT NULL DEFAULT '',
    load_balancing smallint NOT NULL DEFAULT 0,
    update_time timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL,
    revision bigint NOT NULL
);

CREATE TABLE backends (
    backend_id text PRIMARY KEY,
    address text NOT NULL,
    labels jsonb NOT NULL DEFAULT '{}'::jsonb,
    triton_models text[] NOT NULL DEFAULT '{}',
    weight integer NOT NULL DEFAULT 1 CHECK (weight >= 0),
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    revision bigint NOT NULL
);
