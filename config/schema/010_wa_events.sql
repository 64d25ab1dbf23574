-- wa_events: one row per WhatsApp Cloud API webhook item (an inbound message
-- or a status update), partitioned by month on the item's own timestamp.
-- Seed 001: "wa_events - Partition by created_at (monthly)", composite index
-- (from_number, created_at DESC); tenant columns on every row (seed 003).
CREATE TABLE IF NOT EXISTS wa_events (
    event_id        text        NOT NULL,  -- wamid of the message (statuses carry the wamid they are about)
    kind            text        NOT NULL,  -- 'message' or 'status'
    event_type      text        NOT NULL,  -- message type (text, image, ...) or status (sent, delivered, read, failed)
    company_id      uuid        NOT NULL,  -- tenant, set by the webhook gateway (Kafka header company_id)
    team_id         uuid,                  -- team within the tenant (Kafka header team_id)
    phone_number_id text        NOT NULL,  -- the business number the webhook is for (value.metadata)
    from_number     text        NOT NULL,  -- the customer: sender of a message, recipient of a status
    conversation_id text,                  -- Meta's conversation id (statuses)
    error_code      integer,               -- first errors[].code of a failed status
    payload         jsonb       NOT NULL,  -- the item as Meta sent it
    created_at      timestamptz NOT NULL,  -- the item's timestamp (event time; the partition key)
    received_at     timestamptz NOT NULL,  -- when the gateway appended it to Kafka
    ingested_at     timestamptz NOT NULL DEFAULT now()  -- when weir wrote it
) PARTITION BY RANGE (created_at);

-- Tenant + time: a company's recent events.
CREATE INDEX IF NOT EXISTS wa_events_company_created_idx
    ON wa_events (company_id, created_at DESC);
-- Phone + time: one customer's history (seed 001: idx_wa_events_user_time).
CREATE INDEX IF NOT EXISTS wa_events_from_created_idx
    ON wa_events (from_number, created_at DESC);
-- Partial: failed deliveries per tenant, a small slice read by alerting dashboards.
CREATE INDEX IF NOT EXISTS wa_events_failed_idx
    ON wa_events (company_id, created_at DESC) WHERE event_type = 'failed';
-- Natural key: a message, or one status of a message. Lets weir skip the
-- items Meta delivers twice (dedupe_key in config/weir.toml); unique indexes
-- of a partitioned table must include the partition key.
CREATE UNIQUE INDEX IF NOT EXISTS wa_events_event_uidx
    ON wa_events (event_id, event_type, created_at);
