#!/usr/bin/env bash
# weir's main job on the embedded default, with nothing configured:
# brings up a local PostgreSQL and Kafka-protocol broker (deploy/local/stack.sh),
# migrates the bundled schema, sends a sample of realistic WhatsApp webhook
# bodies and chat messages through real Kafka, runs weir, and shows the rows
# arriving in their time partitions.
#
#   deploy/local/demo.sh [EVENTS]      (default 5000 events)
#
# Run it again: more events are sent and weir carries on from its stored offsets.
set -euo pipefail
cd "$(dirname "$0")/../.."

EVENTS=${1:-5000}
export WEIR_CONFIG=${WEIR_CONFIG:-config/weir.toml}
export WEIR_HTTP__LISTEN=${WEIR_HTTP__LISTEN:-127.0.0.1:9187}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "local stack (PostgreSQL + tansu broker)"
eval "$(deploy/local/stack.sh up)"
echo "WEIR_DATABASE_URL=$WEIR_DATABASE_URL"
echo "WEIR_KAFKA__BROKERS=$WEIR_KAFKA__BROKERS"
PSQL=(psql "$WEIR_DATABASE_URL" -X -q -v ON_ERROR_STOP=1)

say "build"
cargo build --release --bins --quiet
WEIR=target/release/weir
LOADTEST=target/release/weir-loadtest

say "weir migrate"
"$WEIR" migrate

say "weir check"
created=$("$LOADTEST" produce --count 0 --quiet | sed -n 's/^created topic //p') # creates the topics if missing
"$WEIR" check

# A topic created just now has a new log, starting at offset 0: offsets
# stored for it earlier belong to a log that is gone (the local broker keeps
# its topics in memory and forgets them when it restarts, while PostgreSQL
# keeps weir's offsets). Kept, they would point into the new log and weir
# would start the demo's partitions part-way through it. Apache Kafka has the
# same hazard when a topic is deleted and recreated: move or delete the
# consumer group's offsets then.
for topic in $created; do
  forgotten=$("${PSQL[@]}" -At -c "
    WITH gone AS (DELETE FROM weir_offsets WHERE consumer_group = 'weir' AND topic = '$topic' RETURNING 1)
    SELECT count(*) FROM gone")
  if [ "$forgotten" -gt 0 ]; then
    echo "topic $topic was created just now: forgot weir's $forgotten stored offsets of its previous log"
  fi
done

say "sending $EVENTS events to Kafka"
"$LOADTEST" produce --count "$EVENTS" --seed "$(date +%s%N)" --spread-days 60

say "weir run"
LOG=$(mktemp -t weir-demo.XXXXXX.log)
"$WEIR" run 2>"$LOG" &
WEIR_PID=$!
trap 'kill "$WEIR_PID" 2>/dev/null || true' EXIT
echo "weir is running (pid $WEIR_PID, log $LOG, metrics http://$WEIR_HTTP__LISTEN/metrics)"

# Progress is counted per event: an event is committed once its partition's
# stored offset is past the offset Kafka gave it (the load generator logs
# each delivery). Not by the sum of stored offsets: a stored offset can move
# *back* (the topic was recreated, or the local broker restarted and forgot
# its topics, and weir restarted the partition at the log's start).
DELIVERIES=target/loadtest/last/deliveries.txt
committed_events() {
  "${PSQL[@]}" -At -F ' ' -c "
    SELECT CASE topic WHEN 'whatsapp.webhooks' THEN 0 ELSE 1 END, partition, next_offset
      FROM weir_offsets
     WHERE consumer_group = 'weir' AND topic IN ('whatsapp.webhooks', 'chat.messages')" |
    awk 'NR == FNR { stored[$1 " " $2] = $3; next }
         ($1 " " $2) in stored && $3 < stored[$1 " " $2] { n++ }
         END { print n + 0 }' - "$DELIVERIES"
}
started=$(date +%s)
while true; do
  committed=$(committed_events)
  rows=$("${PSQL[@]}" -At -c "SELECT (SELECT count(*) FROM wa_events) + (SELECT count(*) FROM messages) + (SELECT count(*) FROM webhook_logs)")
  printf '\r  events committed: %s/%s   rows in PostgreSQL: %s   ' "$committed" "$EVENTS" "$rows"
  if [ "$committed" -ge "$EVENTS" ]; then
    echo
    break
  fi
  if ! kill -0 "$WEIR_PID" 2>/dev/null; then
    echo
    echo "weir exited; its log:" >&2
    cat "$LOG" >&2
    exit 1
  fi
  if [ $(($(date +%s) - started)) -gt 300 ]; then
    echo
    echo "not done after 5 minutes; weir's log: $LOG" >&2
    exit 1
  fi
  sleep 1
done

say "rows per partition"
"${PSQL[@]}" -c "
SELECT 'wa_events' AS table, tableoid::regclass::text AS partition, count(*) AS rows,
       min(created_at) AS oldest, max(created_at) AS newest
  FROM wa_events GROUP BY tableoid
UNION ALL
SELECT 'messages', tableoid::regclass::text, count(*), min(created_at), max(created_at)
  FROM messages GROUP BY tableoid
UNION ALL
SELECT 'webhook_logs', tableoid::regclass::text, count(*), min(received_at), max(received_at)
  FROM webhook_logs GROUP BY tableoid
ORDER BY 1, 2;"

say "a few of the newest wa_events"
"${PSQL[@]}" -c "
SELECT created_at, kind, event_type, from_number, left(payload::text, 60) AS payload
  FROM wa_events ORDER BY created_at DESC LIMIT 5;"

say "dead letters and offsets"
"${PSQL[@]}" -c "SELECT stage, code, count(*) FROM weir_dead_letters GROUP BY 1, 2 ORDER BY 3 DESC;"
"${PSQL[@]}" -c "SELECT topic, partition, next_offset FROM weir_offsets WHERE consumer_group = 'weir' ORDER BY 1, 2;"

say "stage latencies (from /metrics)"
curl -fsS "http://$WEIR_HTTP__LISTEN/metrics" | grep -E '^weir_(rows_written_total|batches_total|stage_duration_seconds_(sum|count))' || true

kill -TERM "$WEIR_PID"
wait "$WEIR_PID" || true
trap - EXIT
say "done: weir stopped cleanly (log: $LOG). Run this again to send more; 'deploy/local/stack.sh down' stops the stack."
