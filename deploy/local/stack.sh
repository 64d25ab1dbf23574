#!/usr/bin/env bash
# weir's local stack: a throwaway PostgreSQL and a tansu broker (Apache Kafka
# protocol, written in Rust), both on loopback, both provisioned idempotently.
#
#   deploy/local/stack.sh up       install what is missing, start both, print the settings
#   deploy/local/stack.sh env      print the settings (as `export` lines) without starting anything
#   deploy/local/stack.sh status   say what runs
#   deploy/local/stack.sh prune    drop the schemas tests left in its database (the suite runs it first)
#   deploy/local/stack.sh down     stop both (data is kept; tansu's is in memory and goes)
#   deploy/local/stack.sh destroy  stop both and delete the PostgreSQL data directory
#   deploy/local/stack.sh postgres-up | postgres-stop | postgres-destroy
#                                  the same for PostgreSQL alone (tests use this
#                                  for a private cluster: set WEIR_STACK_DIR and
#                                  WEIR_STACK_PG_PORT)
#   deploy/local/stack.sh postgres-restart fast|immediate
#                                  pg_ctl restart in that shutdown mode (the
#                                  chaos runner's fault; immediate is a crash:
#                                  the server recovers from its WAL)
#
# `eval "$(deploy/local/stack.sh up)"` leaves the settings in the shell.
#
# tansu is built from crates.io with weir's patches to two of its crates,
# beside this script: tansu-storage-0.6.0.patch (0.6.0 answered a fetch that
# starts inside a record batch with the next batch, losing records, held
# every fetch for its full max wait, and listed every stored batch of a
# partition on every fetch) and tansu-broker-0.6.0.patch (its group
# coordinator could leave a killed consumer's partitions owned by nobody for
# minutes). The cached build is keyed by both patches' hash, so a changed patch
# rebuilds; a patch that no longer applies stops the script with an error.
# Log lines go to stderr, settings to stdout.
#
# Knobs (environment):
#   WEIR_CACHE_DIR        where slow installs are cached (default ~/.cache/weir)
#   WEIR_STACK_DIR        data, logs and pid files (default /tmp/weir-stack)
#   WEIR_STACK_PG_PORT    PostgreSQL port (default 55432)
#   WEIR_STACK_KAFKA_PORT tansu port (default 19092)
#   WEIR_STACK_KAFKA_ADVERTISED
#                         host:port tansu tells clients to connect to (default
#                         127.0.0.1:$WEIR_STACK_KAFKA_PORT; the chaos runner
#                         points it at its fault proxy)
set -euo pipefail

CACHE_DIR=${WEIR_CACHE_DIR:-$HOME/.cache/weir}
STACK_DIR=${WEIR_STACK_DIR:-/tmp/weir-stack}
PG_PORT=${WEIR_STACK_PG_PORT:-55432}
KAFKA_PORT=${WEIR_STACK_KAFKA_PORT:-19092}
KAFKA_ADVERTISED=${WEIR_STACK_KAFKA_ADVERTISED:-127.0.0.1:$KAFKA_PORT}
TANSU_VERSION=0.6.0
# The tansu crates weir patches; each has tansu-<crate>-$TANSU_VERSION.patch here.
TANSU_PATCHED_CRATES="tansu-storage tansu-broker"
TANSU_PATCH_DIR="$(cd "$(dirname "$0")" && pwd)"
for crate in $TANSU_PATCHED_CRATES; do
  [ -f "$TANSU_PATCH_DIR/$crate-$TANSU_VERSION.patch" ] ||
    { echo "stack: error: $TANSU_PATCH_DIR/$crate-$TANSU_VERSION.patch is missing" >&2; exit 1; }
done
TANSU_PATCH_HASH=$(for crate in $TANSU_PATCHED_CRATES; do
  cat "$TANSU_PATCH_DIR/$crate-$TANSU_VERSION.patch"
done | sha256sum | cut -c1-12)
TANSU_ROOT="$CACHE_DIR/tansu-$TANSU_VERSION-$TANSU_PATCH_HASH"
TANSU_BIN="$TANSU_ROOT/bin/tansu"
PG_DATA="$STACK_DIR/pg"
PG_DB=weir

log() { echo "stack: $*" >&2; }
die() {
  echo "stack: error: $*" >&2
  exit 1
}

# Runs a command with root rights: directly as root, else through sudo.
as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

# initdb refuses to run as root: the server runs as the `postgres` user then.
as_pg_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ]; then
      echo "$dir"
      return 0
    fi
  done
  if command -v pg_config >/dev/null 2>&1; then
    dir=$(pg_config --bindir)
    if [ -x "$dir/initdb" ]; then
      echo "$dir"
      return 0
    fi
  fi
  return 1
}

ensure_postgres_installed() {
  if pg_bindir >/dev/null; then
    return 0
  fi
  log "PostgreSQL server binaries not found: installing Debian's postgresql package"
  command -v apt-get >/dev/null 2>&1 || die "no PostgreSQL server binaries and no apt-get: install PostgreSQL 15+ server binaries"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  pg_bindir >/dev/null || die "postgresql installed but initdb still not found"
}

# Puts the source of tansu crate $1, from the cargo registry, with weir's patch
# for it applied, in $2. cargo itself downloads the crate (through whatever
# registry or mirror cargo is configured for): a scratch package that depends
# on exactly that version, and `cargo metadata` to find where cargo unpacked it.
patched_tansu_crate() {
  local crate=$1 dest=$2 scratch="$CACHE_DIR/tansu-source" manifest src
  local patch="$TANSU_PATCH_DIR/$crate-$TANSU_VERSION.patch"
  mkdir -p "$scratch/src"
  : >"$scratch/src/lib.rs"
  printf '%s\n' '[package]' 'name = "weir-tansu-source"' 'version = "0.0.0"' \
    'edition = "2021"' 'publish = false' '' '[dependencies]' \
    "$crate = { version = \"=$TANSU_VERSION\", default-features = false }" \
    >"$scratch/Cargo.toml"
  manifest=$(cargo metadata --manifest-path "$scratch/Cargo.toml" --format-version 1 \
    --filter-platform "$(rustc -vV | sed -n 's/^host: //p')" |
    grep -o '"manifest_path":"[^"]*/'"$crate-$TANSU_VERSION"'/Cargo.toml"' |
    head -1 | sed 's/^"manifest_path":"//; s/"$//') ||
    die "could not fetch $crate $TANSU_VERSION from the cargo registry"
  src=$(dirname "$manifest")
  [ -f "$src/Cargo.toml" ] || die "$crate $TANSU_VERSION source not found (looked in '$src')"
  rm -rf "$dest"
  cp -R "$src" "$dest"
  # GIT_CEILING_DIRECTORIES: patch these files even when a parent directory is a git work tree.
  if ! (cd "$dest" && GIT_CEILING_DIRECTORIES="$(dirname "$dest")" git apply --check "$patch" >&2); then
    die "$patch no longer applies to $crate $TANSU_VERSION: update the patch for this version (see its header)"
  fi
  (cd "$dest" && GIT_CEILING_DIRECTORIES="$(dirname "$dest")" git apply "$patch")
}

ensure_tansu_installed() {
  if [ -x "$TANSU_BIN" ]; then
    return 0
  fi
  command -v cargo >/dev/null 2>&1 || die "cargo is needed to install tansu"
  command -v git >/dev/null 2>&1 || die "git is needed to apply weir's patch to tansu"
  log "installing tansu $TANSU_VERSION with weir's patches into $TANSU_ROOT (cached; about 10 minutes on 2 cores, once)"
  mkdir -p "$TANSU_ROOT"
  local crate patches=()
  for crate in $TANSU_PATCHED_CRATES; do
    patched_tansu_crate "$crate" "$TANSU_ROOT/$crate-$TANSU_VERSION"
    patches+=(--config "patch.crates-io.$crate.path=\"$TANSU_ROOT/$crate-$TANSU_VERSION\"")
  done
  # dynostore: without it tansu's in-memory storage engine refuses to start.
  # --locked keeps every other crate at the version tansu 0.6.0 was released with.
  # A build directory kept in the cache: a changed patch recompiles only
  # the patched crate and what depends on it.
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore \
    "${patches[@]}" \
    --target-dir "$CACHE_DIR/tansu-build" \
    --root "$TANSU_ROOT" >&2
  [ -x "$TANSU_BIN" ] || die "cargo install tansu finished but $TANSU_BIN is missing"
}

pg_running() {
  [ -f "$PG_DATA/postmaster.pid" ] || return 1
  as_pg_owner "$(pg_bindir)/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

start_postgres() {
  local bindir
  bindir=$(pg_bindir)
  mkdir -p "$STACK_DIR"
  chmod 755 "$STACK_DIR"
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    log "initdb $PG_DATA"
    mkdir -p "$PG_DATA"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_DATA"; fi
    chmod 700 "$PG_DATA"
    as_pg_owner "$bindir/initdb" -D "$PG_DATA" -U postgres --auth=trust \
      --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    # Trust, but on loopback only: this cluster is a throwaway for local runs and tests.
    as_pg_owner tee "$PG_DATA/pg_hba.conf" >/dev/null <<EOF
local all all trust
host  all all 127.0.0.1/32 trust
host  all all ::1/128 trust
EOF
    as_pg_owner tee -a "$PG_DATA/postgresql.conf" >/dev/null <<EOF
# weir local stack
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DATA'
max_connections = 300
shared_buffers = '512MB'
max_wal_size = '4GB'
checkpoint_timeout = '15min'
logging_collector = off
EOF
  fi
  if pg_running; then
    log "PostgreSQL already running on 127.0.0.1:$PG_PORT"
  else
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    touch "$STACK_DIR/pg.log"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$STACK_DIR/pg.log"; fi
    as_pg_owner "$bindir/pg_ctl" -D "$PG_DATA" -l "$STACK_DIR/pg.log" -w -t 60 start >/dev/null ||
      die "PostgreSQL did not start; see $STACK_DIR/pg.log"
  fi
  if ! "$bindir/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
    "$bindir/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$PG_DB"
  fi
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

tansu_running() {
  [ -f "$STACK_DIR/tansu.pid" ] && kill -0 "$(cat "$STACK_DIR/tansu.pid")" 2>/dev/null && port_open "$KAFKA_PORT"
}

# The binary a running stack broker was started from: a broker from an older
# (or unpatched) build is replaced, never silently reused.
tansu_running_binary() {
  readlink "/proc/$(cat "$STACK_DIR/tansu.pid")/exe" 2>/dev/null || true
}

start_tansu() {
  mkdir -p "$STACK_DIR"
  if tansu_running; then
    if [ "$(tansu_running_binary)" = "$TANSU_BIN" ]; then
      log "tansu already running on 127.0.0.1:$KAFKA_PORT"
      return 0
    fi
    log "tansu on 127.0.0.1:$KAFKA_PORT runs another build: restarting it (its topics are lost)"
    kill "$(cat "$STACK_DIR/tansu.pid")" 2>/dev/null || true
    local waited=0
    while port_open "$KAFKA_PORT" && [ "$waited" -lt 100 ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
  fi
  if port_open "$KAFKA_PORT"; then
    die "port $KAFKA_PORT is taken by something that is not this stack's tansu (set WEIR_STACK_KAFKA_PORT)"
  fi
  log "starting tansu on 127.0.0.1:$KAFKA_PORT"
  # setsid + nohup: the broker outlives the shell (or test) that started it.
  setsid nohup "$TANSU_BIN" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://$KAFKA_ADVERTISED" \
    --storage-engine "memory://tansu/" \
    >"$STACK_DIR/tansu.log" 2>&1 </dev/null &
  echo $! >"$STACK_DIR/tansu.pid"
  local waited=0
  until port_open "$KAFKA_PORT"; do
    sleep 0.2
    waited=$((waited + 1))
    if [ "$waited" -ge 150 ] || ! kill -0 "$(cat "$STACK_DIR/tansu.pid")" 2>/dev/null; then
      die "tansu did not start; see $STACK_DIR/tansu.log"
    fi
  done
}

print_env() {
  cat <<EOF
export WEIR_DATABASE_URL='postgres://postgres@127.0.0.1:$PG_PORT/$PG_DB'
export WEIR_KAFKA__BROKERS='$KAFKA_ADVERTISED'
export WEIR_KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS='10'
export WEIR_KAFKA__PROPERTIES__SESSION_TIMEOUT_MS='6000'
EOF
}

stop_all() {
  if [ -f "$STACK_DIR/tansu.pid" ]; then
    kill "$(cat "$STACK_DIR/tansu.pid")" 2>/dev/null || true
    rm -f "$STACK_DIR/tansu.pid"
    log "tansu stopped"
  fi
  if pg_bindir >/dev/null && pg_running; then
    as_pg_owner "$(pg_bindir)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
    log "PostgreSQL stopped"
  fi
}

# Drops the schemas tests made in the stack's database. Each test works in
# a schema of its own named <prefix>_<pid>_<hex> and leaves it there (a
# failed test's tables stay to look at); the test suite prunes them before
# it runs, so they do not pile up run after run.
prune_test_schemas() {
  pg_running || die "PostgreSQL is not running in $PG_DATA"
  local psql schemas count=0
  psql=("$(pg_bindir)/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$PG_DB" -qtA -v ON_ERROR_STOP=1)
  schemas=$("${psql[@]}" -c "SELECT nspname FROM pg_namespace
                             WHERE nspname ~ '^[a-z][a-z0-9_-]*_[0-9]+_[0-9a-f]{1,8}\$'")
  for schema in $schemas; do
    # One schema per statement: a whole run's schemas in one transaction
    # would need more locks than max_locks_per_transaction allows.
    "${psql[@]}" -c "SET client_min_messages = warning; DROP SCHEMA \"$schema\" CASCADE" ||
      die "could not drop schema $schema"
    count=$((count + 1))
  done
  log "dropped $count test schema(s)"
}

case "${1:-up}" in
up)
  ensure_postgres_installed
  ensure_tansu_installed
  start_postgres
  start_tansu
  print_env
  ;;
env)
  print_env
  ;;
prune)
  prune_test_schemas
  ;;
status)
  if pg_bindir >/dev/null && pg_running; then echo "postgres: running on 127.0.0.1:$PG_PORT"; else echo "postgres: stopped"; fi
  if tansu_running; then echo "tansu: running on 127.0.0.1:$KAFKA_PORT"; else echo "tansu: stopped"; fi
  ;;
down)
  stop_all
  ;;
destroy)
  stop_all
  rm -rf "$PG_DATA"
  log "removed $PG_DATA"
  ;;
postgres-up)
  ensure_postgres_installed
  start_postgres
  echo "export WEIR_DATABASE_URL='postgres://postgres@127.0.0.1:$PG_PORT/$PG_DB'"
  ;;
postgres-stop)
  if pg_bindir >/dev/null && pg_running; then
    as_pg_owner "$(pg_bindir)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
    log "PostgreSQL stopped"
  fi
  ;;
postgres-restart)
  case "${2:-}" in
  fast | immediate) ;;
  *) die "usage: $0 postgres-restart fast|immediate" ;;
  esac
  pg_running || die "PostgreSQL is not running in $PG_DATA"
  as_pg_owner "$(pg_bindir)/pg_ctl" -D "$PG_DATA" -l "$STACK_DIR/pg.log" -m "$2" -w -t 60 restart >/dev/null ||
    die "PostgreSQL did not restart; see $STACK_DIR/pg.log"
  log "PostgreSQL restarted ($2)"
  ;;
postgres-destroy)
  if pg_bindir >/dev/null && pg_running; then
    as_pg_owner "$(pg_bindir)/pg_ctl" -D "$PG_DATA" -m immediate -w stop >/dev/null
  fi
  rm -rf "$STACK_DIR"
  ;;
*)
  echo "usage: $0 up|env|prune|status|down|destroy|postgres-up|postgres-stop|postgres-restart|postgres-destroy" >&2
  exit 2
  ;;
esac
