#!/usr/bin/env bash
# Times the archive and restore hooks, one segment per call as PostgreSQL calls them, for
# walcore and for pgBackRest (the distribution's package), on the same real WAL and the same
# disk, in one run, and prints per-segment latency, throughput, repository size and peak RSS.
#
#   benches/hooks-vs-pgbackrest.sh [SEGMENTS]     (default 32 real 16 MiB segments)
#
# Both tools compress with zstd at level 3 and encrypt (walcore AES-256-GCM; pgBackRest
# aes-256-cbc, its only cipher). pgBackRest runs synchronously (one process per segment, as
# archive_command); its asynchronous mode and walcore's look-ahead are measured separately.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
segments=${1:-32}
PGBIN=/usr/lib/postgresql/15/bin

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v pgbackrest >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest >/dev/null
fi
for tool in /usr/bin/time; do [ -x "$tool" ] || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null; done
cargo build --release --bins -q

work=$(mktemp -d /tmp/walcore-hooks-bench.XXXXXX)
if [ "$(id -u)" = 0 ]; then as_pg() { runuser -u postgres -- "$@"; }; chown postgres: "$work"; else as_pg() { "$@"; }; fi
chmod 755 "$work"
trap 'as_pg "$PGBIN/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
cp target/release/walcore-archive target/release/walcore-restore "$work/"

echo "== making $segments real WAL segments with pgbench"
as_pg "$PGBIN/initdb" -D "$work/data" -A trust >/dev/null
as_pg mkdir "$work/sock" "$work/wal" "$work/walcore-repo" "$work/pgbr-repo" "$work/out"
cat >> "$work/data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$work/sock'
wal_level = replica
archive_mode = on
archive_command = 'cp %p $work/wal/%f'
max_wal_size = 4GB
CONF
as_pg "$PGBIN/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
as_pg "$PGBIN/pgbench" -h "$work/sock" -i -s 20 -q postgres >/dev/null 2>&1
while [ "$(ls "$work/wal" | grep -c '^[0-9A-F]\{24\}$')" -lt $((segments + 2)) ]; do
  as_pg "$PGBIN/pgbench" -h "$work/sock" -c 2 -j 2 -T 5 postgres >/dev/null 2>&1
done
mapfile -t segs < <(ls "$work/wal" | grep '^[0-9A-F]\{24\}$' | tail -n "$segments")
bytes=$((segments * 16 * 1024 * 1024))

key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
cat > "$work/pgbackrest.conf" <<CONF
[global]
repo1-path=$work/pgbr-repo
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=$key
compress-type=zst
compress-level=3
log-level-console=warn
log-level-file=off
lock-path=$work/pgbr-lock
spool-path=$work/pgbr-spool
[bench]
pg1-path=$work/data
pg1-socket-path=$work/sock
CONF
chmod 644 "$work/pgbackrest.conf"
as_pg pgbackrest --config="$work/pgbackrest.conf" --stanza=bench stanza-create >/dev/null

export WALCORE_REPO="file://$work/walcore-repo" WALCORE_ENCRYPTION_KEY=$key
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true

# Runs one hook per segment; prints seconds, max RSS (KiB) of any call, user+sys CPU seconds.
timed_loop() {
  local label=$1; shift
  local start end maxrss=0 cpu=0
  start=$(date +%s.%N)
  for s in "${segs[@]}"; do
    as_pg /usr/bin/time -f '%M %U %S' -o "$work/time.$label" "$@" "$s" 2>>"$work/$label.err" >/dev/null \
      || { echo "$label failed on $s:"; tail -5 "$work/$label.err"; exit 1; }
    read -r rss u sy < "$work/time.$label"
    [ "$rss" -gt "$maxrss" ] && maxrss=$rss
    cpu=$(echo "$cpu + $u + $sy" | bc)
  done
  end=$(date +%s.%N)
  echo "$(echo "$end - $start" | bc) $maxrss $cpu"
}
push_walcore() { cd "$work/wal" && "$work/walcore-archive" "$1"; }
push_pgbr() { pgbackrest --config="$work/pgbackrest.conf" --stanza=bench archive-push "$work/wal/$1"; }
get_walcore() { "$work/walcore-restore" "$1" "$work/out/$1"; }
get_pgbr() { pgbackrest --config="$work/pgbackrest.conf" --stanza=bench archive-get "$1" "$work/out/$1"; }
export -f push_walcore push_pgbr get_walcore get_pgbr
export work

row() { # label seconds rss cpu
  local ms mbs cpug
  ms=$(echo "scale=1; $2 * 1000 / $segments" | bc)
  mbs=$(echo "scale=0; $bytes / 1048576 / $2" | bc)
  cpug=$(echo "scale=2; $4 * 1073741824 / $bytes" | bc)
  printf '| %-22s | %8s | %7s | %9s | %9s |\n' "$1" "$ms" "$mbs" "$(( $3 / 1024 ))" "$cpug"
}
echo "== timing (interleaved: walcore, pgBackRest, for push then get)"
read -r w_push w_push_rss w_push_cpu < <(timed_loop wpush bash -c 'push_walcore "$0"')
read -r p_push p_push_rss p_push_cpu < <(timed_loop ppush bash -c 'push_pgbr "$0"')
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
read -r w_get w_get_rss w_get_cpu < <(timed_loop wget bash -c 'rm -f "$work/out/$0"; get_walcore "$0"')
read -r p_get p_get_rss p_get_cpu < <(timed_loop pget bash -c 'rm -f "$work/out/$0"; get_pgbr "$0"')
for s in "${segs[@]}"; do cmp -s "$work/wal/$s" "$work/out/$s" || { echo "MISMATCH $s"; exit 1; }; done

echo
echo "$segments segments of 16 MiB, $(nproc) cores; per call = as PostgreSQL sees it"
printf '| %-22s | %8s | %7s | %9s | %9s |\n' "hook" "ms/seg" "MiB/s" "RSS MiB" "CPU s/GiB"
echo "|---|---|---|---|---|"
row "walcore archive" "$w_push" "$w_push_rss" "$w_push_cpu"
row "pgBackRest archive-push" "$p_push" "$p_push_rss" "$p_push_cpu"
row "walcore restore" "$w_get" "$w_get_rss" "$w_get_cpu"
row "pgBackRest archive-get" "$p_get" "$p_get_rss" "$p_get_cpu"
wsize=$(du -sb "$work/walcore-repo/wal" | cut -f1); psize=$(du -sb "$work/pgbr-repo/archive" | cut -f1)
echo
echo "repository size: walcore $((wsize / 1048576)) MiB, pgBackRest $((psize / 1048576)) MiB (walcore/pgBackRest = $(echo "scale=3; $wsize / $psize" | bc)); ratio vs raw: walcore $(echo "scale=1; $bytes / $wsize" | bc)x"
echo "latency ratio walcore/pgBackRest: archive $(echo "scale=2; $w_push / $p_push" | bc), restore $(echo "scale=2; $w_get / $p_get" | bc)"
