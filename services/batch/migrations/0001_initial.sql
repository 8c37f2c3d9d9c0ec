-- Jobs, their items (which double as the transactional outbox) and one result per item.

CREATE TABLE jobs (
    job_id uuid PRIMARY KEY,
    tenant text NOT NULL,
    idempotency_key text NOT NULL,
    request_sha256 bytea NOT NULL,           -- tells a retried submit from a different one with the same key
    model_id text NOT NULL,
    version bigint NOT NULL,
    priority integer NOT NULL,
    labels jsonb NOT NULL DEFAULT '{}',
    state smallint NOT NULL,                 -- servegrid.batch.v1.BatchJobState
    total_items bigint NOT NULL,
    succeeded_items bigint NOT NULL DEFAULT 0,
    failed_items bigint NOT NULL DEFAULT 0,
    cancelled_items bigint NOT NULL DEFAULT 0,
    create_time timestamptz NOT NULL DEFAULT now(),
    start_time timestamptz,
    end_time timestamptz,
    UNIQUE (tenant, idempotency_key)
);
CREATE INDEX jobs_by_tenant ON jobs (tenant, create_time DESC, job_id DESC);

CREATE TABLE items (
    job_id uuid NOT NULL REFERENCES jobs ON DELETE CASCADE,
    item_index bigint NOT NULL,
    item_id text NOT NULL,
    request bytea NOT NULL,                  -- inference.ModelInferRequest: this item's inputs as raw contents
    state smallint NOT NULL DEFAULT 1,       -- servegrid.batch.v1.BatchItemState
    attempts integer NOT NULL DEFAULT 0,     -- inference calls made for the item
    due_at timestamptz DEFAULT now(),        -- outbox: the relay publishes the item once due_at <= now()
    lease_until timestamptz,                 -- published: past this without a result, it is due again
    dlq_due boolean NOT NULL DEFAULT false,  -- failed for good, dead-letter record not yet published
    PRIMARY KEY (job_id, item_index)
);
CREATE INDEX items_due ON items (due_at) WHERE state = 1 AND due_at IS NOT NULL;
CREATE INDEX items_leased ON items (lease_until) WHERE state = 1 AND due_at IS NULL;
CREATE INDEX items_dlq_due ON items (job_id) WHERE dlq_due;

CREATE TABLE results (
    job_id uuid NOT NULL REFERENCES jobs ON DELETE CASCADE,
    item_index bigint NOT NULL,
    state smallint NOT NULL,                 -- SUCCEEDED or FAILED
    response bytea,                          -- inference.ModelInferResponse for this item, when SUCCEEDED
    error_code integer,                      -- google.rpc.Code, when FAILED
    error_reason text,
    error_message text,
    attempts integer NOT NULL,
    complete_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, item_index)          -- one result per item: the first write wins
);
