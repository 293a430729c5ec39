CREATE TABLE IF NOT EXISTS ingest_records (
    tenant      text        NOT NULL,
    id          text        NOT NULL,
    kind        text        NOT NULL,
    revision    bigint      NOT NULL CHECK (revision >= 0),
    event_time  timestamptz NOT NULL,
    source      text        NOT NULL,
    priority    text        NOT NULL DEFAULT 'normal',
    attributes  jsonb       NOT NULL,
    links       jsonb       NOT NULL DEFAULT '[]'::jsonb,
    deleted     boolean     NOT NULL DEFAULT false,
    -- where the held revision entered the pipeline: tells redelivered history from out-of-order
    origin_tp     text,
    origin_offset bigint,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, id)
);
CREATE INDEX IF NOT EXISTS ingest_records_tenant_event_time ON ingest_records (tenant, event_time);
