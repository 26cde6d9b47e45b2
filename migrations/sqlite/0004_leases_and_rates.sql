-- Reservation leases and rate limits shared by every gateway replica.

-- Every reservation in flight, with its lease. A key's quota_usage.reserved is the sum of its
-- rows here; a row whose lease has expired is reclaimed (deleted, and the counter recomputed
-- from the rows that remain) by the next admission of its key that the quota would refuse.
CREATE TABLE reservations (
    id            TEXT PRIMARY KEY,
    license_id    TEXT NOT NULL,
    customer_id   TEXT NOT NULL,
    model         TEXT NOT NULL,
    layer         TEXT NOT NULL,
    period_start  BIGINT NOT NULL,
    tokens        BIGINT NOT NULL CHECK (tokens > 0),
    reserved_at   BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL
);

CREATE INDEX reservations_by_key ON reservations (license_id, layer, period_start, expires_at);

-- A token bucket per license (capacity and refill: the license's tokens per minute), taken by
-- the same admission on every replica.
CREATE TABLE rate_buckets (
    license_id  TEXT PRIMARY KEY,
    tokens      DOUBLE PRECISION NOT NULL,
    at          BIGINT NOT NULL
);
