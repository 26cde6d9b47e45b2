-- Packed results (Postgres): packing keys registered per license, and the result encoding of
-- every usage row.

-- One row per key a license registered: the upload itself is part of the usage record.
CREATE TABLE packing_keys (
    key_id         TEXT PRIMARY KEY,
    license_id     TEXT NOT NULL,
    customer_id    TEXT NOT NULL,
    parameter_set  TEXT NOT NULL,
    bytes          BIGINT NOT NULL,
    key_blob       BYTEA NOT NULL,
    uploaded_at    BIGINT NOT NULL
);
CREATE INDEX packing_keys_license ON packing_keys (license_id, uploaded_at);

ALTER TABLE usage_events ADD COLUMN results TEXT NOT NULL DEFAULT 'keyless';
ALTER TABLE usage_events ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
