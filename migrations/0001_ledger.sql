-- Ledger schema (Postgres). Times are epoch milliseconds (BIGINT).

CREATE TABLE customers (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE licenses (
    id            TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL REFERENCES customers (id),
    model         TEXT NOT NULL,
    quota_tokens  BIGINT NOT NULL,
    quota_period  TEXT NOT NULL,
    issued_at     BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL
);

CREATE TABLE revocations (
    license_id  TEXT PRIMARY KEY,
    revoked_at  BIGINT NOT NULL,
    revoked_by  TEXT NOT NULL,
    reason      TEXT NOT NULL
);

-- Tokens reserved (admitted, not yet settled) and used, per license, protected layer and
-- quota period. Admission is one conditional UPDATE: atomic across gateway replicas.
CREATE TABLE quota_usage (
    license_id    TEXT NOT NULL,
    layer         TEXT NOT NULL,
    period_start  BIGINT NOT NULL,
    quota_tokens  BIGINT NOT NULL,
    reserved      BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    used          BIGINT NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (license_id, layer, period_start)
);

-- One row per billed query: claimed in the same transaction as its usage row.
CREATE TABLE query_claims (
    license_id  TEXT NOT NULL,
    query_id    TEXT NOT NULL,
    claimed_at  BIGINT NOT NULL,
    PRIMARY KEY (license_id, query_id)
);

-- One row per FHE query, partitioned by month (retention drops whole partitions).
CREATE TABLE usage_events (
    query_id        TEXT NOT NULL,
    license_id      TEXT NOT NULL,
    customer_id     TEXT NOT NULL,
    model           TEXT NOT NULL,
    layer           TEXT NOT NULL,
    tokens          BIGINT NOT NULL,
    upload_bytes    BIGINT NOT NULL,
    download_bytes  BIGINT NOT NULL,
    worker          TEXT NOT NULL,
    compute_ms      DOUBLE PRECISION NOT NULL,
    status          TEXT NOT NULL,
    created_at      BIGINT NOT NULL
) PARTITION BY RANGE (created_at);

CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;
CREATE INDEX usage_events_license_time ON usage_events (license_id, created_at);

CREATE TABLE usage_hourly (
    license_id      TEXT NOT NULL,
    customer_id     TEXT NOT NULL,
    model           TEXT NOT NULL,
    layer           TEXT NOT NULL,
    hour_start      BIGINT NOT NULL,
    requests        BIGINT NOT NULL,
    tokens          BIGINT NOT NULL,
    upload_bytes    BIGINT NOT NULL,
    download_bytes  BIGINT NOT NULL,
    PRIMARY KEY (license_id, layer, hour_start)
);

CREATE TABLE usage_daily (
    license_id      TEXT NOT NULL,
    customer_id     TEXT NOT NULL,
    model           TEXT NOT NULL,
    layer           TEXT NOT NULL,
    day_start       BIGINT NOT NULL,
    requests        BIGINT NOT NULL,
    tokens          BIGINT NOT NULL,
    upload_bytes    BIGINT NOT NULL,
    download_bytes  BIGINT NOT NULL,
    PRIMARY KEY (license_id, layer, day_start)
);

-- Administrative actions, append-only.
CREATE TABLE audit_events (
    id       BIGSERIAL PRIMARY KEY,
    at       BIGINT NOT NULL,
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    subject  TEXT NOT NULL,
    details  TEXT NOT NULL
);

CREATE FUNCTION audit_events_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER audit_events_no_change
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
