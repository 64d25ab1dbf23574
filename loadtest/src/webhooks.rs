//! Realistic traffic for weir: WhatsApp Cloud API webhook bodies (as Meta
//! posts them to a gateway) and a CRM's outbound chat-message events.
//!
//! Shapes follow Meta's "messages" webhook reference: `object` ->
//! `entry[]` -> `changes[]` -> `value` with `metadata`, `contacts` and
//! `messages[]` or `statuses[]`. Message types: text, image, interactive
//! (button and list replies), reaction, location, unsupported. Statuses:
//! sent, delivered, read, and failed with `errors[]`, carrying
//! `conversation` and `pricing` objects.
//!
//! Traffic shape: tenants drawn from a Zipf distribution, event times spread
//! back over a window (so they cross partition boundaries) with a share of
//! late events, a share of malformed bodies of several classes, and a share
//! of duplicate deliveries (Meta retries a webhook it thinks failed).
//!
//! Everything is derived from a seed: the same seed gives the same traffic.
//! Each generated event says what it should become (`Expect`), which is
//! what `verify` checks PostgreSQL against.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Topic of raw Meta webhook bodies.
pub const WEBHOOK_TOPIC: &str = "whatsapp.webhooks";
/// Topic of the CRM's own message events.
pub const CHAT_TOPIC: &str = "chat.messages";

/// Knobs of the traffic.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    pub seed: u64,
    /// Number of tenants (companies).
    pub companies: usize,
    /// Zipf exponent of tenant popularity (1.0: the top tenant gets about
    /// 1/ln(companies) of the traffic).
    pub zipf_exponent: f64,
    /// Event times are spread uniformly over this many seconds before now.
    pub spread_secs: i64,
    /// Share of events that are late (days older than the spread).
    pub late_share: f64,
    /// Share of bodies that are malformed.
    pub malformed_share: f64,
    /// Share of webhook bodies delivered twice.
    pub duplicate_share: f64,
    /// Share of events that are outbound chat messages (the rest webhooks).
    pub chat_share: f64,
    /// "now", Unix seconds (fixed for reproducibility).
    pub now_secs: i64,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            seed: 42,
            companies: 200,
            zipf_exponent: 1.1,
            spread_secs: 40 * 86_400,
            late_share: 0.01,
            malformed_share: 0.0,
            duplicate_share: 0.0,
            chat_share: 0.15,
            now_secs: chrono::Utc::now().timestamp(),
        }
    }
}

/// Classes of malformed input the generator produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Malformed {
    /// Not JSON at all (a truncated body).
    TruncatedJson,
    /// Bytes that are not UTF-8.
    InvalidUtf8,
    /// A webhook whose tenant header is missing (every row needs company_id).
    MissingTenant,
    /// A message item with an unparsable timestamp (the rest of the body is fine).
    BadTimestamp,
    /// A message item timestamped in the year 2999.
    FarFuture,
    /// A webhook with neither messages nor statuses... and no header either:
    /// nothing in it can be written anywhere.
    EmptyBody,
    /// A chat message whose company_id is not a UUID.
    BadUuid,
}

impl Malformed {
    pub const ALL: [Malformed; 7] = [
        Malformed::TruncatedJson,
        Malformed::InvalidUtf8,
        Malformed::MissingTenant,
        Malformed::BadTimestamp,
        Malformed::FarFuture,
        Malformed::EmptyBody,
        Malformed::BadUuid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Malformed::TruncatedJson => "truncated_json",
            Malformed::InvalidUtf8 => "invalid_utf8",
            Malformed::MissingTenant => "missing_tenant",
            Malformed::BadTimestamp => "bad_timestamp",
            Malformed::FarFuture => "far_future",
            Malformed::EmptyBody => "empty_body",
            Malformed::BadUuid => "bad_uuid",
        }
    }
}

/// A row an event should produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedRow {
    pub table: &'static str,
    /// The row's natural key (`event_id`+`event_type` for wa_events,
    /// `message_id` for messages).
    pub key: String,
    /// Event time, Unix seconds.
    pub time: i64,
}

/// A dead letter an event should produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedDeadLetter {
    pub table: Option<&'static str>,
    pub stage: &'static str,
    pub code: &'static str,
}

/// One Kafka message to send, and what it should become.
#[derive(Debug, Clone)]
pub struct Produced {
    pub topic: &'static str,
    pub key: String,
    pub headers: Vec<(&'static str, String)>,
    pub payload: Vec<u8>,
    /// Sequence number of the logical event (duplicates share it).
    pub sequence: u64,
    pub duplicate: bool,
    pub malformed: Option<Malformed>,
    pub rows: Vec<ExpectedRow>,
    pub dead_letters: Vec<ExpectedDeadLetter>,
}

impl Produced {
    /// The dead letters this message must leave, as sorted
    /// `"<table or -> <stage>/<code>"` strings: what a verifier compares
    /// with the dead-letter table, per source message.
    pub fn dead_letter_signature(&self) -> Vec<String> {
        let mut letters: Vec<String> = self
            .dead_letters
            .iter()
            .map(|d| format!("{} {}/{}", d.table.unwrap_or("-"), d.stage, d.code))
            .collect();
        letters.sort();
        letters
    }
}

struct Company {
    id: String,
    teams: Vec<String>,
    phone_number_ids: Vec<(String, String)>,
    waba_id: String,
}

/// A deterministic source of events.
pub struct Generator {
    shape: Shape,
    rng: SmallRng,
    companies: Vec<Company>,
    /// Cumulative Zipf weights of `companies`.
    cdf: Vec<f64>,
    sequence: u64,
    /// A body to deliver again (duplicate delivery), if pending.
    redeliver: Option<Produced>,
}

const FIRST_NAMES: &[&str] = &[
    "Ana", "João", "Maria", "Pedro", "Lucía", "Carlos", "Sheena", "Fatima", "Kwame", "Mei",
    "Rafael", "Beatriz", "Thiago", "Camila", "Diego", "Aisha",
];
const LAST_NAMES: &[&str] = &[
    "Silva", "Santos", "Oliveira", "Souza", "Nelson", "García", "Okafor", "Chen", "Pereira",
    "Costa",
];
const TEXTS: &[&str] = &[
    "Oi! Vocês têm esse modelo em azul?",
    "Does it come in another color?",
    "Quero cancelar meu pedido 🙏",
    "¿Cuál es el horario de atención?",
    "Obrigado pelo atendimento, foi ótimo! ⭐⭐⭐⭐⭐",
    "Can I change the delivery address?",
    "Qual o prazo de entrega para São Paulo?",
    "Recebi o produto com defeito 😕",
    "Hi, I'd like to book a demo for next week",
    "Pode me mandar o boleto de novo?",
];
const OUTBOUND: &[&str] = &[
    "Olá! Seu pedido #{n} foi enviado e chega em 2 dias úteis.",
    "Hi {name}, thanks for reaching out. An agent will reply shortly.",
    "Seu código de verificação é {n}.",
    "Lembrete: sua consulta é amanhã às 14h. Responda SIM para confirmar.",
    "We have 20% off this week only 🎉",
];
const FAILURES: &[(i64, &str)] = &[
    (
        131_050,
        "Unable to deliver the message. This recipient has chosen to stop receiving marketing messages on WhatsApp.",
    ),
    (131_026, "Message undeliverable"),
    (131_047, "Re-engagement message"),
    (130_472, "User's number is part of an experiment"),
];

impl Generator {
    pub fn new(shape: Shape) -> Self {
        let mut rng = SmallRng::seed_from_u64(shape.seed);
        let mut companies = Vec::with_capacity(shape.companies);
        for _ in 0..shape.companies.max(1) {
            let teams = (0..rng.random_range(1..=4))
                .map(|_| uuid_from(&mut rng))
                .collect();
            let phone_number_ids = (0..rng.random_range(1..=3))
                .map(|_| (digits(&mut rng, 15), format!("1555{}", digits(&mut rng, 7))))
                .collect();
            companies.push(Company {
                id: uuid_from(&mut rng),
                teams,
                phone_number_ids,
                waba_id: digits(&mut rng, 15),
            });
        }
        let mut cdf = Vec::with_capacity(companies.len());
        let mut total = 0.0;
        for rank in 1..=companies.len() {
            total += 1.0 / (rank as f64).powf(shape.zipf_exponent);
            cdf.push(total);
        }
        for weight in &mut cdf {
            *weight /= total;
        }
        Generator {
            shape,
            rng,
            companies,
            cdf,
            sequence: 0,
            redeliver: None,
        }
    }

    /// The next message to send.
    pub fn next_event(&mut self) -> Produced {
        if let Some(mut again) = self.redeliver.take() {
            // The same body under a new offset: what Meta's retries look like.
            again.duplicate = true;
            return again;
        }
        self.sequence += 1;
        let sequence = self.sequence;
        let roll: f64 = self.rng.random();
        let produced = if roll < self.shape.malformed_share {
            let class = Malformed::ALL[self.rng.random_range(0..Malformed::ALL.len())];
            self.malformed(sequence, class)
        } else if self.rng.random::<f64>() < self.shape.chat_share {
            self.chat_message(sequence)
        } else {
            self.webhook(sequence)
        };
        if produced.malformed.is_none()
            && produced.topic == WEBHOOK_TOPIC
            && self.rng.random::<f64>() < self.shape.duplicate_share
        {
            self.redeliver = Some(produced.clone());
        }
        produced
    }

    fn company(&mut self) -> usize {
        let u: f64 = self.rng.random();
        self.cdf
            .partition_point(|&c| c < u)
            .min(self.companies.len() - 1)
    }

    fn event_time(&mut self) -> i64 {
        let back = self.rng.random_range(0..self.shape.spread_secs.max(1));
        let late = if self.rng.random::<f64>() < self.shape.late_share {
            self.rng.random_range(1..=5) * 86_400
        } else {
            0
        };
        self.shape.now_secs - back - late
    }

    fn wamid(&mut self, sequence: u64, index: usize) -> String {
        format!(
            "wamid.HBgM{:016X}{:04X}{:08X}",
            self.shape.seed, index, sequence
        )
    }

    fn contact(&mut self) -> (String, String) {
        let name = format!(
            "{} {}",
            FIRST_NAMES[self.rng.random_range(0..FIRST_NAMES.len())],
            LAST_NAMES[self.rng.random_range(0..LAST_NAMES.len())]
        );
        (format!("55{}", digits(&mut self.rng, 11)), name)
    }

    /// A webhook body with messages or statuses, and its headers.
    fn webhook(&mut self, sequence: u64) -> Produced {
        let company_index = self.company();
        let (company_id, team_id, phone_number_id, display_number, waba_id) = {
            let company = &self.companies[company_index];
            let team = company.teams[self.rng.random_range(0..company.teams.len())].clone();
            let (id, display) = company.phone_number_ids
                [self.rng.random_range(0..company.phone_number_ids.len())]
            .clone();
            (
                company.id.clone(),
                team,
                id,
                display,
                company.waba_id.clone(),
            )
        };
        let (wa_id, name) = self.contact();
        let statuses = self.rng.random::<f64>() < 0.4;
        let count = if statuses {
            self.rng.random_range(1..=4)
        } else if self.rng.random::<f64>() < 0.15 {
            self.rng.random_range(2..=3)
        } else {
            1
        };
        let mut rows = Vec::new();
        let mut items = Vec::new();
        let time = self.event_time();
        for index in 0..count {
            let id = self.wamid(sequence, index);
            let at = time + index as i64;
            if statuses {
                let (item, status) = self.status(&id, &wa_id, at);
                rows.push(ExpectedRow {
                    table: "wa_events",
                    key: format!("{id}/{status}"),
                    time: at,
                });
                items.push(item);
            } else {
                let (item, kind) = self.message(&id, &wa_id, at);
                rows.push(ExpectedRow {
                    table: "wa_events",
                    key: format!("{id}/{kind}"),
                    time: at,
                });
                rows.push(ExpectedRow {
                    table: "messages",
                    key: id.clone(),
                    time: at,
                });
                items.push(item);
            }
        }
        let mut value = json!({
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": display_number, "phone_number_id": phone_number_id},
        });
        if statuses {
            value["statuses"] = Value::Array(items);
        } else {
            value["contacts"] = json!([{"profile": {"name": name}, "wa_id": wa_id}]);
            value["messages"] = Value::Array(items);
        }
        let body = json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": waba_id, "changes": [{"value": value, "field": "messages"}]}]
        });
        rows.push(ExpectedRow {
            table: "webhook_logs",
            key: String::new(),
            time: self.shape.now_secs,
        });
        let mut headers = vec![
            ("company_id", company_id),
            (
                "request_id",
                format!("req-{:016x}-{sequence}", self.shape.seed),
            ),
        ];
        if self.rng.random::<f64>() < 0.8 {
            headers.push(("team_id", team_id));
        }
        if !statuses {
            headers.push(("conversation_id", uuid_from(&mut self.rng)));
        }
        Produced {
            topic: WEBHOOK_TOPIC,
            key: phone_number_id,
            headers,
            payload: serde_json::to_vec(&body).expect("generated JSON should serialize"),
            sequence,
            duplicate: false,
            malformed: None,
            rows,
            dead_letters: Vec::new(),
        }
    }

    /// An inbound message item; returns it with its type.
    fn message(&mut self, id: &str, from: &str, at: i64) -> (Value, &'static str) {
        let kind = match self.rng.random_range(0..100) {
            0..=59 => "text",
            60..=71 => "image",
            72..=83 => "interactive",
            84..=91 => "reaction",
            92..=97 => "location",
            _ => "unsupported",
        };
        let mut item = json!({"from": from, "id": id, "timestamp": at.to_string(), "type": kind});
        match kind {
            "text" => {
                item["text"] = json!({"body": TEXTS[self.rng.random_range(0..TEXTS.len())]});
            }
            "image" => {
                item["image"] = json!({
                    "caption": "Segue a foto do produto",
                    "mime_type": "image/jpeg",
                    "sha256": hex_string(&mut self.rng, 32),
                    "id": digits(&mut self.rng, 16),
                });
            }
            "interactive" => {
                if self.rng.random::<bool>() {
                    item["interactive"] = json!({"type": "button_reply", "button_reply": {"id": "confirm-yes", "title": "Sim, confirmar"}});
                } else {
                    item["interactive"] = json!({"type": "list_reply", "list_reply": {"id": "slot-14h", "title": "Amanhã 14h", "description": "Consultório Centro"}});
                }
                item["context"] = json!({"from": "15550783881", "id": format!("{id}-ctx")});
            }
            "reaction" => {
                item["reaction"] = json!({"message_id": format!("{id}-orig"), "emoji": "👍"});
            }
            "location" => {
                item["location"] = json!({
                    "latitude": -23.5505 + self.rng.random_range(-0.1..0.1),
                    "longitude": -46.6333 + self.rng.random_range(-0.1..0.1),
                    "name": "Loja Paulista",
                    "address": "Av. Paulista, 1000 - São Paulo"
                });
            }
            _ => {
                item["errors"] = json!([{
                    "code": 131_051, "title": "Message type unknown", "message": "Message type unknown",
                    "error_data": {"details": "Message type is currently not supported."}
                }]);
            }
        }
        (item, kind)
    }

    /// A status item; returns it with its status.
    fn status(&mut self, id: &str, recipient: &str, at: i64) -> (Value, &'static str) {
        let status = match self.rng.random_range(0..100) {
            0..=29 => "sent",
            30..=64 => "delivered",
            65..=94 => "read",
            _ => "failed",
        };
        let category =
            ["marketing", "utility", "authentication", "service"][self.rng.random_range(0..4)];
        let mut item = json!({
            "id": id, "status": status, "timestamp": at.to_string(), "recipient_id": recipient,
        });
        if status == "failed" {
            let (code, title) = FAILURES[self.rng.random_range(0..FAILURES.len())];
            item["errors"] = json!([{
                "code": code, "title": title, "message": title,
                "error_data": {"details": title},
                "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
            }]);
        } else {
            item["conversation"] = json!({
                "id": hex_string(&mut self.rng, 16),
                "origin": {"type": category},
                "expiration_timestamp": (at + 86_400).to_string()
            });
            item["pricing"] = json!({"billable": true, "pricing_model": "PMP", "category": category, "type": "regular"});
        }
        (item, status)
    }

    /// An outbound message event from the CRM.
    fn chat_message(&mut self, sequence: u64) -> Produced {
        let company_index = self.company();
        let (company_id, team_id, phone_number_id) = {
            let company = &self.companies[company_index];
            (
                company.id.clone(),
                company.teams[self.rng.random_range(0..company.teams.len())].clone(),
                company.phone_number_ids[0].0.clone(),
            )
        };
        let (to, name) = self.contact();
        let conversation_id = uuid_from(&mut self.rng);
        let at = self.event_time();
        let millis = self.rng.random_range(0..1000);
        let id = format!("msg_{:016x}_{sequence}", self.shape.seed);
        let text = OUTBOUND[self.rng.random_range(0..OUTBOUND.len())]
            .replace("{n}", &digits(&mut self.rng, 6))
            .replace("{name}", name.split(' ').next().unwrap_or("cliente"));
        let sent_at = chrono::DateTime::from_timestamp(at, millis * 1_000_000)
            .expect("generated times should be valid")
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string();
        let body = json!({
            "id": id, "company_id": company_id, "team_id": team_id,
            "conversation_id": conversation_id, "direction": "outbound",
            "phone_number_id": phone_number_id, "to": to, "type": "text",
            "text": text, "sent_at": sent_at, "agent_id": uuid_from(&mut self.rng),
        });
        Produced {
            topic: CHAT_TOPIC,
            key: conversation_id,
            headers: vec![("company_id", company_id)],
            payload: serde_json::to_vec(&body).expect("generated JSON should serialize"),
            sequence,
            duplicate: false,
            malformed: None,
            rows: vec![ExpectedRow {
                table: "messages",
                key: id,
                time: at,
            }],
            dead_letters: Vec::new(),
        }
    }

    /// A malformed event of `class` and the dead letters it should yield.
    fn malformed(&mut self, sequence: u64, class: Malformed) -> Produced {
        let dead = |table: Option<&'static str>, stage: &'static str, code: &'static str| {
            ExpectedDeadLetter { table, stage, code }
        };
        let mut produced = match class {
            Malformed::BadUuid => self.chat_message(sequence),
            _ => self.webhook(sequence),
        };
        produced.malformed = Some(class);
        match class {
            Malformed::TruncatedJson => {
                // Cut at a character boundary: a cut inside a multi-byte
                // character would make the body invalid UTF-8 as well, which
                // weir rightly reports first (the chaos runner's seed 7012
                // found one).
                let mut cut = produced.payload.len() / 2;
                while cut > 0 && produced.payload[cut] & 0b1100_0000 == 0b1000_0000 {
                    cut -= 1;
                }
                produced.payload.truncate(cut);
                produced.rows.clear();
                produced.dead_letters = vec![dead(None, "decode", "invalid_json")];
            }
            Malformed::InvalidUtf8 => {
                let at = produced.payload.len() / 2;
                produced.payload.splice(at..at, [0xff, 0xfe, 0x80]);
                produced.rows.clear();
                produced.dead_letters = vec![dead(None, "decode", "invalid_utf8")];
            }
            Malformed::MissingTenant => {
                produced.headers.retain(|(name, _)| *name != "company_id");
                produced.dead_letters = produced
                    .rows
                    .iter()
                    .map(|row| dead(Some(row.table), "validate", "missing_required"))
                    .collect();
                produced.rows.clear();
            }
            Malformed::BadTimestamp | Malformed::FarFuture => {
                // Spoil the timestamp of the first item only: its rows become
                // dead letters, the other items of the body are written.
                let mut body: Value = serde_json::from_slice(&produced.payload).expect("own JSON");
                let value = &mut body["entry"][0]["changes"][0]["value"];
                let list = if value.get("messages").is_some() {
                    "messages"
                } else {
                    "statuses"
                };
                let spoiled = if class == Malformed::BadTimestamp {
                    json!("yesterday at noon")
                } else {
                    json!("32503680000") // 3000-01-01
                };
                value[list][0]["timestamp"] = spoiled;
                let first_id = value[list][0]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                produced.payload = serde_json::to_vec(&body).expect("own JSON");
                let (stage, code) = if class == Malformed::BadTimestamp {
                    ("validate", "invalid_value")
                } else {
                    ("route", "event_time_out_of_window")
                };
                let mut kept = Vec::new();
                for row in produced.rows.drain(..) {
                    if row.key.starts_with(&first_id) && row.table != "webhook_logs" {
                        produced
                            .dead_letters
                            .push(dead(Some(row.table), stage, code));
                    } else {
                        kept.push(row);
                    }
                }
                produced.rows = kept;
            }
            Malformed::EmptyBody => {
                produced.payload = serde_json::to_vec(&json!({
                    "object": "whatsapp_business_account",
                    "entry": [{"id": "0", "changes": [{"value": {"messaging_product": "whatsapp"}, "field": "account_update"}]}]
                }))
                .expect("own JSON");
                produced.headers.retain(|(name, _)| *name != "company_id");
                produced.rows.clear();
                produced.dead_letters =
                    vec![dead(Some("webhook_logs"), "validate", "missing_required")];
            }
            Malformed::BadUuid => {
                let mut body: Value = serde_json::from_slice(&produced.payload).expect("own JSON");
                body["company_id"] = json!("acme-corp");
                produced.payload = serde_json::to_vec(&body).expect("own JSON");
                produced.rows.clear();
                produced.dead_letters = vec![dead(Some("messages"), "validate", "invalid_value")];
            }
        }
        produced
    }
}

fn digits(rng: &mut SmallRng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

fn hex_string(rng: &mut SmallRng, bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

fn uuid_from(rng: &mut SmallRng) -> String {
    uuid::Uuid::from_u128(rng.random::<u128>() & !(0xf << 76) | (0x4 << 76)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_body_is_still_utf8_so_it_fails_as_json_only() {
        let mut generator = Generator::new(Shape {
            seed: 7012,
            malformed_share: 0.5,
            ..Shape::default()
        });
        let mut truncated = 0;
        for _ in 0..20_000 {
            let event = generator.next_event();
            if event.malformed == Some(Malformed::TruncatedJson) {
                truncated += 1;
                assert!(
                    std::str::from_utf8(&event.payload).is_ok(),
                    "a truncated body cut a character in two"
                );
            }
        }
        assert!(truncated > 100, "{truncated}");
    }
}
