-- Reports and exports (Postgres).

-- Usage exports page through the raw rows in time order.
CREATE INDEX usage_events_time ON usage_events (created_at, license_id, query_id);

-- Billable tokens of a license per day: a token that crosses several protected layers is billed
-- once, so a day's bill is the largest token count over the license's layers.
CREATE VIEW billable_daily AS
SELECT license_id, customer_id, model, day_start, MAX(tokens) AS billable_tokens
FROM usage_daily
GROUP BY license_id, customer_id, model, day_start;
