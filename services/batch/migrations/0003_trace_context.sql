-- The submitting request's W3C trace context ({"traceparent": ..., "tracestate": ...}) and request id
-- (x-request-id): the outbox relay sends both with every chunk of the job's items, so the worker's spans
-- join that request's trace and its log lines carry that request's id.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS trace_context jsonb NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS request_id text NOT NULL DEFAULT '';
