-- messages: one row per chat message, inbound (from Meta webhooks) or
-- outbound (from the CRM's own message events), partitioned by ISO week on
-- the message time. Seeds 001/003: "whatsapp_messages - Partition by
-- created_at (weekly for high volume)", index messages(conversation_id,
-- created_at DESC), tenant columns on every row.
CREATE TABLE IF NOT EXISTS messages (
    message_id      text        NOT NULL,  -- wamid (inbound) or the CRM's id (outbound)
    company_id      uuid        NOT NULL,  -- tenant
    team_id         uuid,                  -- team within the tenant
    conversation_id uuid,                  -- the CRM conversation (gateway header / event field)
    direction       text        NOT NULL,  -- 'inbound' or 'outbound'
    phone_number_id text        NOT NULL,  -- the business number
    contact_wa_id   text        NOT NULL,  -- the customer's WhatsApp id
    contact_name    text,                  -- profile name Meta sent, if any
    message_type    text        NOT NULL,  -- text, image, interactive, reaction, location, ...
    body            text,                  -- text body, caption, reply title or emoji
    payload         jsonb       NOT NULL,  -- the message as received
    created_at      timestamptz NOT NULL,  -- message time (the partition key)
    received_at     timestamptz NOT NULL,  -- when it was appended to Kafka
    ingested_at     timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (created_at);

-- Conversation + time: the chat view, newest first.
CREATE INDEX IF NOT EXISTS messages_conversation_created_idx
    ON messages (conversation_id, created_at DESC);
-- Tenant + time: a company's inbox.
CREATE INDEX IF NOT EXISTS messages_company_created_idx
    ON messages (company_id, created_at DESC);
-- Phone + time, inbound only: what one customer sent (partial: outbound rows
-- are found by conversation).
CREATE INDEX IF NOT EXISTS messages_contact_inbound_idx
    ON messages (contact_wa_id, created_at DESC) WHERE direction = 'inbound';
-- Natural key, for dedupe (see wa_events).
CREATE UNIQUE INDEX IF NOT EXISTS messages_message_uidx
    ON messages (message_id, created_at);
