#!/usr/bin/env bash
# What streaming WAL costs the database: pgbench on one PostgreSQL 15 cluster, side by side in
# one run, with
#   none           no stream (the baseline)
#   walcore        walcore stream into a file:// repository (zstd:3, AES-256-GCM), default mode
#                  (pieces of the segment being filled every 10 s)
#   walcore-sync   walcore stream --synchronous, synchronous_standby_names = 'walcore'
#   receivewal-sync  pg_receivewal --synchronous into a local directory,
#                  synchronous_standby_names = 'pg_receivewal' (the local-only reference)
# and two workloads: commit-heavy (pgbench's TPC-B-like script: five statements, one small
# commit) and WAL-heavy (each transaction inserts 100 rows of 1 KiB).
#
#   benches/stream-vs-receivewal.sh
#   DURATION=60 CLIENTS=8 benches/stream-vs-receivewal.sh
#
# Columns:
#   tps            pgbench's, without connection time
#   p50/p99 ms     transaction latency from pgbench's per-transaction log (--log): with a
#                  synchronous stream, the commit waits for the repository (or pg_receivewal's
#                  fsync)
#   lag p99        bytes: the server's flushed WAL minus what the stream reported flushed, and
#                  seconds: pg_stat_replication.flush_lag, sampled every 200 ms during the run
#   stream CPU s   user + system seconds of the stream process over the run
#   vs none        tps as a share of the no-stream run of the same workload
# Targets (issue 12): walcore default mode >= 0.90 of the no-stream tps and lag p99 < 2 s;
# walcore-sync p50 within 1.5x of receivewal-sync's p50 (commit-heavy).
#
# Environment: DURATION (seconds per run, default 20), CLIENTS (default 4), SCALE (default 10),
# WORKLOADS (default "commit-heavy wal-heavy"), VARIANTS (default "none walcore walcore-sync
# receivewal-sync"; a ratio needs its baseline in the same run), REPO_DIR (where the streams
# write: walcore's repositories and pg_receivewal's directories; default beside the cluster, in
# a new directory under /tmp), STREAM_BENCH_BIN (a walcore binary to measure instead of building
# this checkout: to compare two builds in turn), PGBIN, KEEP=1. Runs as root (PostgreSQL and the tools then run as user postgres) or as a
# normal user.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
duration=${DURATION:-20}
clients=${CLIENTS:-4}
scale=${SCALE:-10}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

if [ -z "${STREAM_BENCH_BIN:-}" ]; then
  echo "building walcore (release)..." >&2
  cargo build --release -q -p basebackup --bin walcore
fi

work=$(mktemp -d /tmp/walcore-stream-bench.XXXXXX)
if [ "$(id -u)" = 0 ]; then
  pg_user=(runuser -u postgres --)
  chown postgres: "$work"
else
  pg_user=()
fi
as_pg() { "${pg_user[@]}" "$@"; }
chmod 755 "$work"
mkdir -p "$work/bin"
cp "${STREAM_BENCH_BIN:-target/release/walcore}" "$work/bin/walcore"
data=$work/data
repos=$work
if [ -n "${REPO_DIR:-}" ]; then
  repos=$(mktemp -d "$REPO_DIR/walcore-stream-bench.XXXXXX")
  [ "$(id -u)" = 0 ] && chown postgres: "$repos"
fi
sock=$work/sock
stream_pid=''
sampler_pid=''
cleanup() {
  set +e
  [ -z "$sampler_pid" ] || kill "$sampler_pid" 2>/dev/null
  [ -z "$stream_pid" ] || kill -KILL "$stream_pid" 2>/dev/null
  [ -f "$data/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1
  if [ "${KEEP:-0}" = 1 ]; then
    echo "kept $work $repos" >&2
  else
    rm -rf "$work"
    [ "$repos" = "$work" ] || rm -rf "$repos"
  fi
}
trap cleanup EXIT

as_pg mkdir "$sock"
as_pg "$PGBIN/initdb" -D "$data" -U postgres -A trust >/dev/null
cat >>"$data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$sock'
port = 5432
max_wal_senders = 10
max_replication_slots = 10
wal_level = replica
archive_mode = off
shared_buffers = 256MB
max_wal_size = 4GB
EOF
as_pg "$PGBIN/pg_ctl" -D "$data" -l "$work/server.log" -w start >/dev/null
sql() { as_pg "$PGBIN/psql" -h "$sock" -qAtX -c "$1" postgres; }
echo "pgbench -i -s $scale..." >&2
as_pg "$PGBIN/pgbench" -h "$sock" -i -q -s "$scale" postgres >/dev/null 2>&1
sql "create table wal_heavy (id bigserial, payload text)"
as_pg tee "$work/wal-heavy.sql" >/dev/null <<'EOF'
insert into wal_heavy (payload) select repeat(md5(random()::text), 32) from generate_series(1, 100);
EOF

cpu_of() { # pid: user+system seconds
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"
}

# Starts the stream of a variant; sets stream_pid.
start_stream() { # variant
  local repo slot
  # A new slot holds WAL from the last checkpoint's redo point: checkpoint first, so that the
  # stream does not start with the previous runs' WAL to catch up on.
  sql "checkpoint"
  case $1 in
  none) stream_pid='' ;;
  walcore | walcore-sync)
    repo=$repos/repo-$1-$RANDOM
    as_pg mkdir "$repo"
    local -a flags=()
    [ "$1" = walcore-sync ] && flags=(--synchronous)
    slot=bench_$RANDOM
    "${pg_user[@]}" env WALCORE_REPO="file://$repo" WALCORE_ENCRYPTION_KEY=$(printf "%064d" 7) \
      WALCORE_LOG=info "$work/bin/walcore" stream --dbname "host=$sock user=postgres" \
      --slot "$slot" "${flags[@]}" 2>>"$work/stream.log" &
    ;;
  receivewal-sync)
    repo=$repos/receivewal-$RANDOM
    as_pg mkdir "$repo"
    slot=bench_$RANDOM
    as_pg "$PGBIN/pg_receivewal" -h "$sock" -U postgres -D "$repo" --slot "$slot" \
      --create-slot --if-not-exists 2>>"$work/stream.log"
    "${pg_user[@]}" "$PGBIN/pg_receivewal" -h "$sock" -U postgres -D "$repo" --slot "$slot" \
      --synchronous -n 2>>"$work/stream.log" &
    ;;
  esac
  # The stream's own process (not a runuser between), found by its unique slot name.
  if [ "$1" != none ]; then
    for _ in $(seq 50); do
      stream_pid=$(pgrep -u postgres -f -- "--slot $slot( |\$)" | head -1) && [ -n "$stream_pid" ] && break
      sleep 0.1
    done
  fi
  if [ "$1" != none ] && [ -z "$stream_pid" ]; then
    echo "the stream of $1 is not running; its log:" >&2
    cat "$work/stream.log" >&2
    exit 1
  fi
  case $1 in
  walcore-sync) sql "alter system set synchronous_standby_names = 'walcore'" ;;
  receivewal-sync) sql "alter system set synchronous_standby_names = 'pg_receivewal'" ;;
  *) sql "alter system set synchronous_standby_names = ''" ;;
  esac
  sql "select pg_reload_conf()" >/dev/null
  if [ -n "$stream_pid" ]; then
    local app=walcore
    [ "$1" = receivewal-sync ] && app=pg_receivewal
    for _ in $(seq 100); do
      [ "$(sql "select count(*) from pg_stat_replication where application_name = '$app' and state = 'streaming'")" = 1 ] && return 0
      sleep 0.1
    done
    echo "the stream of $1 did not start; its log:" >&2
    cat "$work/stream.log" >&2
    exit 1
  fi
}

stop_stream() {
  [ -n "$stream_pid" ] || return 0
  kill -TERM "$stream_pid" 2>/dev/null || true
  while kill -0 "$stream_pid" 2>/dev/null; do sleep 0.1; done
  wait 2>/dev/null || true
  stream_pid=''
  sql "alter system set synchronous_standby_names = ''" >/dev/null
  sql "select pg_reload_conf()" >/dev/null
  sql "select pg_drop_replication_slot(slot_name) from pg_replication_slots where not active" >/dev/null
}

# Samples the stream's lag every 200 ms into a file: bytes, seconds.
sample_lag() { # file
  while :; do
    sql "select pg_current_wal_flush_lsn() - flush_lsn, coalesce(extract(epoch from flush_lag), 0) from pg_stat_replication where application_name in ('walcore', 'pg_receivewal')" |
      tr '|' ' ' >>"$1"
    sleep 0.2
  done
}

percentile() { # p, reads numbers on stdin
  sort -g | awk -v p="$1" '{ v[NR] = $1 } END { if (NR == 0) { print "-"; exit } i = int(NR * p / 100 + 0.5); if (i < 1) i = 1; if (i > NR) i = NR; print v[i] }'
}

rows=()
declare -A base_tps
for workload in ${WORKLOADS:-commit-heavy wal-heavy}; do
  for variant in ${VARIANTS:-none walcore walcore-sync receivewal-sync}; do
    echo "$workload / $variant: ${duration}s..." >&2
    start_stream "$variant"
    logdir=$work/log-$workload-$variant-${#rows[@]}
    as_pg mkdir "$logdir"
    lagfile=$work/lag-$workload-$variant-${#rows[@]}
    : >"$lagfile"
    chmod 666 "$lagfile"
    sample_lag "$lagfile" &
    sampler_pid=$!
    cpu0=0
    [ -n "$stream_pid" ] && cpu0=$(cpu_of "$stream_pid")
    script=()
    [ "$workload" = wal-heavy ] && script=(-f "$work/wal-heavy.sql")
    out=$(cd "$logdir" && as_pg "$PGBIN/pgbench" -h "$sock" -c "$clients" -j 2 -T "$duration" \
      --log --log-prefix="$logdir/tx" "${script[@]}" postgres 2>/dev/null)
    cpu1=0
    [ -n "$stream_pid" ] && cpu1=$(cpu_of "$stream_pid")
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=''
    stop_stream
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' <<<"$out")
    p50=$(cat "$logdir"/tx* | awk '{ print $3 / 1000 }' | percentile 50)
    p99=$(cat "$logdir"/tx* | awk '{ print $3 / 1000 }' | percentile 99)
    if [ "$variant" = none ]; then
      base_tps[$workload]=$tps
      lagb=-
      lags=-
      cpu=-
    else
      lagb=$(awk '{ print $1 }' "$lagfile" | percentile 99)
      lags=$(awk '{ print $2 }' "$lagfile" | percentile 99)
      cpu=$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.1f", b - a }')
    fi
    share=$(awk -v t="$tps" -v b="${base_tps[$workload]:-}" 'BEGIN { if (b == "") print "-"; else printf "%.2f", t / b }')
    rows+=("| $workload | $variant | $tps | $p50 | $p99 | $lagb | $lags | $cpu | $share |")
    echo "${rows[-1]}" >&2
  done
done

echo
echo "PostgreSQL $("$PGBIN/postgres" --version | awk '{ print $3 }'), pgbench -c $clients -j 2 -T $duration, scale $scale, $(nproc) cores"
echo
echo "| workload | stream | tps | p50 ms | p99 ms | lag p99 bytes | lag p99 s | stream CPU s | vs none |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
