-- webhook_logs: one row per webhook delivery the gateway received, kept 30
-- days (seed 001: "webhook_logs & processed_webhook_messages - Partition by
-- date, retain 30 days, automatically drop old partitions"). Partitioned by
-- day on the time the delivery reached Kafka.
CREATE TABLE IF NOT EXISTS webhook_logs (
    received_at     timestamptz NOT NULL,  -- Kafka append time (the partition key)
    company_id      uuid        NOT NULL,  -- tenant (gateway header)
    request_id      text,                  -- the gateway's request id (header)
    object          text,                  -- Meta's `object`, e.g. whatsapp_business_account
    waba_id         text,                  -- entry[0].id: the WhatsApp Business Account
    source_topic    text        NOT NULL,
    source_partition integer    NOT NULL,
    source_offset   bigint      NOT NULL,
    payload         jsonb       NOT NULL,  -- the body as received
    ingested_at     timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (received_at);

-- Tenant + time: a company's deliveries, newest first.
CREATE INDEX IF NOT EXISTS webhook_logs_company_received_idx
    ON webhook_logs (company_id, received_at DESC);
