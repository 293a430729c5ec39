-- One row per writer: GuardedSink's probe write, which tells a sink that takes writes (a record
-- that fails there fails on its own) from a sink that does not (an outage).
CREATE TABLE IF NOT EXISTS ingest_sink_probe (
    name      text        PRIMARY KEY,
    probed_at timestamptz NOT NULL DEFAULT now()
);
