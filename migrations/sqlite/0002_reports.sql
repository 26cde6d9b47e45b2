-- Reports and exports (SQLite).

CREATE INDEX usage_events_time ON usage_events (created_at, license_id, query_id);

CREATE VIEW billable_daily AS
SELECT license_id, customer_id, model, day_start, MAX(tokens) AS billable_tokens
FROM usage_daily
GROUP BY license_id, customer_id, model, day_start;
