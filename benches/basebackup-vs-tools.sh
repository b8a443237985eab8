#!/usr/bin/env bash
# Times full base backups and their restores on one PostgreSQL 15 cluster holding a pgbench
# database (scale 110 by default, about 1.6 GiB): walcore-basebackup next to pg_basebackup and
# pgBackRest (the distribution's package), on the same data and the same disk, in one run. Prints
# a markdown table (wall seconds, MiB/s, size on disk, peak RSS, CPU) and walcore's ratios against
# its targets.
#
#   benches/basebackup-vs-tools.sh
#   SCALE=5 benches/basebackup-vs-tools.sh          (a quick trial, about 100 MiB)
#   RUNS=3 benches/basebackup-vs-tools.sh           (three rounds, medians reported)
#
# One round is, each into a new directory or repository on the disk of /tmp:
#   takes     pg_basebackup -Ft -X none -c fast                          (the baseline)
#             pg_basebackup -Ft -X none -c fast --compress=client-zstd:1
#             walcore-basebackup take --checkpoint fast                  (zstd:3, AES-256-GCM)
#             pgbackrest backup --type=full    process-max=2, zst level 3, aes-256-cbc, start-fast
#   restores  walcore-basebackup restore --pgdata NEW --target-immediate
#             walcore verify --full   (every object of the repository read and checked, as a
#                                      restore reads them: its speed against the restore's)
#             pgbackrest restore --pg1-path=NEW --type=immediate         process-max=2
#             tar -xf base.tar of the uncompressed pg_basebackup (a reference: a plain copy, no
#             decompression, decryption or checks)
# The page cache is dropped before every run (as root; otherwise the table says it was not).
# Before the first round, one pg_basebackup to /dev/null is run and not counted (warm-up).
# Rounds alternate the order (takes and restores forwards in odd rounds, backwards in even ones),
# so that a slow drift of the machine weighs on every tool alike; with RUNS > 1 the table shows
# medians (peak RSS: the largest of the rounds) and the wall time of every round is listed.
#
# The archive, and why it is switched. Every take here waits until the WAL its backup ends in
# is archived: pg_basebackup -X none because the server waits in pg_backup_stop, walcore because
# take waits for its repository to hold the backup's WAL, pgBackRest because of archive-check.
# Turning that wait off (--include-wal, --no-archive-check) would time backups that cannot be
# recovered to a point in time, so each tool waits for its own archiver instead: before every
# take the archiver is let go idle, then archive_command is switched (ALTER SYSTEM and a reload)
# to walcore-archive into the round's walcore repository (for the two pg_basebackup takes and
# walcore's) or to pgBackRest archive-push into the round's pgBackRest repository. Both archivers
# run synchronously (WALCORE_LOOKAHEAD=0; archive-async=n, pgBackRest's default), so no detached
# worker outlives a take and runs into the next one. While pgbench fills the database,
# archive_command is /bin/true.
#
# What the columns measure:
#   wall s     from the launch of the command until it exits, then a `sync`, whose share is
#              the next column: pg_basebackup and pgBackRest fsync what they write; the sync
#              charges a tool that leaves dirty pages behind (tar never fsyncs) for writing them.
#   MiB/s      the size of base.tar of the first uncompressed pg_basebackup (the data directory
#              without pg_wal, which is what every tool copies) divided by the wall time.
#   size MiB   du -sb of what the run wrote: pg_basebackup's directory (tar + backup_manifest);
#              the repository without its WAL archive (walcore wal/, pgBackRest archive/);
#              the restored data directory.
#   peak RSS   the largest resident set of any single process of the tool: the larger of
#              /usr/bin/time's %M (the largest of the command and every descendant it waited
#              for, which covers pgBackRest's local processes: the main process forks and reaps
#              them) and a sampler that reads VmHWM of the tool's processes in /proc every
#              100 ms (a high-water mark, so a sample taken after the peak still sees it). The
#              archivers are not counted. A cgroup's memory peak is not used: it charges the
#              page cache the tool fills, i.e. the size of what it wrote.
#   tool CPU   user + system seconds of the command and its waited-for descendants (time).
#   server CPU CPU of the PostgreSQL backends that exited during the run (the walsender of
#              pg_basebackup and walcore, pgBackRest's SQL session): the growth of the
#              postmaster's cutime + cstime. pg_basebackup's and walcore's file reading and tar
#              framing happen in the walsender, pgBackRest reads the files itself; tool + server
#              compares them.
#
# Round 1's restores are then checked (VERIFY=0 skips it): PostgreSQL starts on the walcore and
# the pgBackRest copies (own socket, archive_mode=off), recovers to the end of the backup through
# the restore_command each tool wrote, and pgbench_accounts must hold SCALE * 100000 rows.
#
# Environment: SCALE (pgbench scale, default 110), RUNS (default 1), VERIFY (default 1),
# CHECKSUMS=1 (initdb -k: the tools then verify page checksums while reading), PGBIN, KEEP=1
# (keep the work directory). Runs as root (PostgreSQL and the tools then run as user postgres) or
# as a normal user.
set -euo pipefail
shopt -s nullglob
export LC_ALL=C
cd "$(dirname "$0")/.."
scale=${SCALE:-110}
runs=${RUNS:-1}
verify=${VERIFY:-1}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
case $scale in '' | *[!0-9]* | 0) echo "SCALE must be a positive number" >&2; exit 2 ;; esac
case $runs in '' | *[!0-9]* | 0) echo "RUNS must be a positive number" >&2; exit 2 ;; esac
[ -x "$PGBIN/pg_basebackup" ] || { echo "no PostgreSQL in $PGBIN (set PGBIN)" >&2; exit 2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v pgbackrest >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest >/dev/null
fi
[ -x /usr/bin/time ] || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
cargo build --release --bins -q

work=$(mktemp -d /tmp/walcore-basebackup-bench.XXXXXX)
if [ "$(id -u)" = 0 ]; then
  pg_user=(runuser -u postgres --)
  chown postgres: "$work"
else
  pg_user=()
fi
as_pg() { "${pg_user[@]}" "$@"; }
chmod 755 "$work"
res=$work/results
as_pg mkdir "$res" "$work/sock" "$work/vsock"
mkdir "$work/bin"
cp target/release/walcore-archive target/release/walcore-restore target/release/walcore-basebackup \
  target/release/walcore "$work/bin/"
PGDATA_MAIN=$work/data
sampler_pid=''

# Processes of ours, by name and by $work in their command line (nothing else is ever touched).
tool_pids() {
  local d comm
  local -a argv
  for d in /proc/[0-9]*; do
    { read -r comm < "$d/comm"; } 2>/dev/null || continue
    case $comm in pg_basebackup | walcore-* | pgbackrest | tar) ;; *) continue ;; esac
    { mapfile -d '' -t argv < "$d/cmdline"; } 2>/dev/null || continue
    if [[ "${argv[*]}" == *"$work"* ]]; then echo "${d#/proc/}"; fi
  done
}
pg_stop() { # data directory [mode]
  [ -f "$1/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$1" -m "${2:-fast}" -w stop >/dev/null 2>&1
  return 0
}
cleanup() {
  local pid pids d
  set +e
  [ -z "$sampler_pid" ] || kill "$sampler_pid" 2>/dev/null
  for d in "$PGDATA_MAIN" "$work"/round*/restore-*; do pg_stop "$d" immediate; done
  pids=$(tool_pids)
  if [ -n "$pids" ]; then
    for pid in $pids; do kill "$pid" 2>/dev/null; done
    sleep 1
    for pid in $(tool_pids); do kill -9 "$pid" 2>/dev/null; done
  fi
  if [ "${KEEP:-0}" = 0 ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkfifo "$work/tick"
exec {tick_fd}<> "$work/tick"
tick() { read -r -t "$1" -u "$tick_fd" _ || true; } # sleeps without a fork
sql() { as_pg "$PGBIN/psql" -h "$work/sock" -qAtX -c "$1" postgres; }

# Waits until no segment is left for archive_command (the archiver is idle).
wait_archived() {
  local n=0
  local -a ready
  while ready=("$PGDATA_MAIN"/pg_wal/archive_status/*.ready); [ ${#ready[@]} -gt 0 ]; do
    n=$((n + 1))
    if [ $n -gt 6000 ]; then echo "archiving stuck: ${#ready[@]} segments still .ready after 600 s" >&2; exit 1; fi
    tick 0.1
  done
}

echo "== PostgreSQL 15 cluster, pgbench -i -s $scale"
initdb_opts=(-A trust)
if [ "${CHECKSUMS:-0}" = 1 ]; then initdb_opts+=(-k); fi
as_pg "$PGBIN/initdb" -D "$PGDATA_MAIN" "${initdb_opts[@]}" >/dev/null
cat >> "$PGDATA_MAIN/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$work/sock'
wal_level = replica
archive_mode = on
archive_command = '/bin/true'
max_wal_size = 8GB
checkpoint_timeout = 1h
CONF
as_pg "$PGBIN/pg_ctl" -D "$PGDATA_MAIN" -l "$work/pg.log" -w start >/dev/null
t0=${EPOCHREALTIME/./}
as_pg "$PGBIN/pgbench" -h "$work/sock" -i -s "$scale" -q postgres > "$res/pgbench-init.log" 2>&1 \
  || { tail -n 20 "$res/pgbench-init.log"; exit 1; }
# Once every segment of the load is archived, a checkpoint lets the server remove them, and a
# backup that is not counted takes whatever a first backup pays once (here about a second) out
# of the baseline, which always runs first.
wait_archived
sql checkpoint
echo "   $(((${EPOCHREALTIME/./} - t0) / 1000000)) s"
t0=${EPOCHREALTIME/./}
as_pg "$PGBIN/pg_basebackup" -h "$work/sock" -U postgres -Ft -X none -c fast -D - > /dev/null 2> "$res/warm-up.log" \
  || { cat "$res/warm-up.log"; exit 1; }
echo "   warm-up backup (not counted): $(awk -v w=$((${EPOCHREALTIME/./} - t0)) 'BEGIN { printf "%.2f", w / 1e6 }') s"
db_bytes=$(sql 'select sum(pg_database_size(oid)) from pg_database')
pm_pid=$(head -n 1 "$PGDATA_MAIN/postmaster.pid")

key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '%s\n' "$key" | as_pg tee "$work/walcore.key" > /dev/null
as_pg chmod 600 "$work/walcore.key"

set_archive() { # archive_command
  wait_archived
  sql "alter system set archive_command = '$1'" > /dev/null
  sql 'select pg_reload_conf()' > /dev/null
  tick 1 # the archiver rereads its configuration before its next segment
}
walcore_archive_cmd() { # repository
  echo "WALCORE_REPO=file://$1 WALCORE_ENCRYPTION_KEY_FILE=$work/walcore.key WALCORE_LOOKAHEAD=0 $work/bin/walcore-archive %p"
}
pgbr_conf() { # file repository
  printf '%s\n' "[global]" "repo1-path=$2" "repo1-cipher-type=aes-256-cbc" "repo1-cipher-pass=$key" \
    "repo1-retention-full=2" "compress-type=zst" "compress-level=3" "process-max=2" "start-fast=y" \
    "log-level-console=warn" "log-level-file=off" "lock-path=$work/pgbr-lock" \
    "[bench]" "pg1-path=$PGDATA_MAIN" "pg1-socket-path=$work/sock" > "$1"
  chmod 644 "$1"
}

cache_dropped=yes
drop_caches() {
  sync
  { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null || sudo -n sh -c 'echo 3 > /proc/sys/vm/drop_caches' 2>/dev/null \
    || cache_dropped=no
}
# CPU seconds of the postmaster's reaped children (backends that have exited), in clock ticks.
server_ticks() {
  local line
  local -a f
  read -r line < "/proc/$pm_pid/stat"
  read -r -a f <<< "${line##*) }"
  echo $((f[13] + f[14]))
}
# Peak RSS (VmHWM, KiB) of the tool's processes, every 100 ms until STOP exists; writes
# "KiB processes-seen" to OUT. The archivers (walcore-archive, pgbackrest archive-push) are left out.
sampler() { # out stop
  local out=$1 stop=$2 peak=0 d comm key val
  local -a argv
  local -A seen=()
  while [ ! -e "$stop" ]; do
    for d in /proc/[0-9]*; do
      { read -r comm < "$d/comm"; } 2>/dev/null || continue
      case $comm in pg_basebackup | walcore-basebac* | pgbackrest | tar) ;; *) continue ;; esac
      { mapfile -d '' -t argv < "$d/cmdline"; } 2>/dev/null || continue
      [[ "${argv[*]}" == *"$work"* ]] || continue
      case " ${argv[*]} " in *" archive-push "* | *" archive-get "*) continue ;; esac
      { while read -r key val _; do
        if [ "$key" = VmHWM: ]; then
          if [ "$val" -gt "$peak" ]; then peak=$val; fi
          break
        fi
      done < "$d/status"; } 2>/dev/null || true
      seen[${d#/proc/}]=1
    done
    tick 0.1
  done
  echo "$peak ${#seen[@]}" > "$out"
}

declare -A label=([pgb-none]="pg_basebackup -Ft (none)" [pgb-zstd]="pg_basebackup -Ft client-zstd:1"
  [w-take]="walcore take" [p-take]="pgBackRest backup"
  [w-restore]="walcore restore" [p-restore]="pgBackRest restore" [untar]="tar -xf base.tar (reference)"
  [w-verify]="walcore verify --full")
takes=(pgb-none pgb-zstd w-take p-take)
restores=(w-restore w-verify p-restore untar)

# One timed run: page cache dropped, command as the cluster's owner under /usr/bin/time, then sync.
# Writes results/ID.ROUND.row: wall µs, sync µs, peak RSS KiB, tool CPU s, server CPU s,
# processes seen by the sampler.
run() { # id round command...
  local id=$1 r=$2 base t0 t1 t2 s0 s1 rss seen trss user sys
  shift 2
  base=$res/$id.$r
  drop_caches
  s0=$(server_ticks)
  sampler "$base.sample" "$base.stop" &
  sampler_pid=$!
  t0=${EPOCHREALTIME/./}
  if ! as_pg /usr/bin/time -f '%M %U %S' -o "$base.time" "$@" > "$base.out" 2> "$base.err"; then
    touch "$base.stop"
    wait "$sampler_pid" || true
    sampler_pid=''
    echo "FAILED: ${label[$id]} (round $r): $*" >&2
    cat "$base.out" "$base.err" >&2
    tail -n 1 "$base.time" >&2
    exit 1
  fi
  t1=${EPOCHREALTIME/./}
  sync
  t2=${EPOCHREALTIME/./}
  touch "$base.stop"
  wait "$sampler_pid"
  sampler_pid=''
  # the backends of the run are reaped once they have exited
  for _ in $(seq 50); do pgrep -P "$pm_pid" -f '\[local\]' > /dev/null || break; tick 0.1; done
  s1=$(server_ticks)
  read -r rss seen < "$base.sample"
  read -r trss user sys < <(tail -n 1 "$base.time")
  if [ "$trss" -gt "$rss" ]; then rss=$trss; fi
  echo "$((t2 - t0)) $((t2 - t1)) $rss $(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }') \
$(awk -v t=$((s1 - s0)) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }') $seen" > "$base.row"
  printf '   %-32s %8.2f s\n' "${label[$id]}" "$(awk -v w=$((t2 - t0)) 'BEGIN { print w / 1e6 }')"
}
size_of() { # id round directory
  local total wal=0
  total=$(du -sb "$3" | cut -f1)
  case $1 in
    w-take) [ ! -d "$3/wal" ] || wal=$(du -sb "$3/wal" | cut -f1) ;;
    p-take) [ ! -d "$3/archive" ] || wal=$(du -sb "$3/archive" | cut -f1) ;;
  esac
  echo $((total - wal)) > "$res/$1.$2.size"
}

verify_restore() { # directory name
  local n rec
  as_pg "$PGBIN/pg_ctl" -D "$1" -l "$res/verify-$2.log" -w -t 600 \
    -o "-c unix_socket_directories=$work/vsock -c port=5433 -c archive_mode=off" start > /dev/null \
    || { echo "the $2 restore does not start:"; tail -n 20 "$res/verify-$2.log"; exit 1; }
  n=$(as_pg "$PGBIN/psql" -h "$work/vsock" -p 5433 -qAtX -c 'select count(*) from pgbench_accounts' postgres)
  rec=$(as_pg "$PGBIN/psql" -h "$work/vsock" -p 5433 -qAtX -c 'select pg_is_in_recovery()' postgres)
  pg_stop "$1"
  if [ "$n" != $((scale * 100000)) ]; then echo "the $2 restore has $n rows in pgbench_accounts, not $((scale * 100000))"; exit 1; fi
  echo "   $2 restore: started, recovered (in recovery: $rec), $n rows"
}

wenv() { # repository
  echo WALCORE_REPO="file://$1" WALCORE_ENCRYPTION_KEY="$key" WALCORE_COMPRESSION=zstd:3
}

for r in $(seq "$runs"); do
  rd=$work/round$r
  as_pg mkdir "$rd" "$rd/walcore-repo" "$rd/pgbr-repo" "$rd/restore-walcore" "$rd/restore-pgbr" "$rd/restore-untar"
  as_pg chmod 700 "$rd/restore-walcore" "$rd/restore-pgbr" "$rd/restore-untar"
  pgbr_conf "$rd/pgbr.conf" "$rd/pgbr-repo"
  pgbr=(pgbackrest --config="$rd/pgbr.conf" --stanza=bench)
  as_pg "${pgbr[@]}" stanza-create > "$res/stanza-create.$r.log" 2>&1 || { cat "$res/stanza-create.$r.log"; exit 1; }
  order=("${takes[@]}")
  if [ $((r % 2)) = 0 ]; then order=(p-take w-take pgb-zstd pgb-none); fi
  echo "== round $r of $runs: takes"
  for id in "${order[@]}"; do
    case $id in
      pgb-none | pgb-zstd)
        set_archive "$(walcore_archive_cmd "$rd/walcore-repo")"
        compress=none
        if [ "$id" = pgb-zstd ]; then compress=client-zstd:1; fi
        run "$id" "$r" "$PGBIN/pg_basebackup" -h "$work/sock" -U postgres -Ft -X none -c fast \
          --compress="$compress" -D "$rd/$id"
        size_of "$id" "$r" "$rd/$id"
        ;;
      w-take)
        set_archive "$(walcore_archive_cmd "$rd/walcore-repo")"
        # shellcheck disable=SC2046 # one variable per word
        run "$id" "$r" env $(wenv "$rd/walcore-repo") "$work/bin/walcore-basebackup" take \
          --dbname "host=$work/sock port=5432 user=postgres" --checkpoint fast --label "bench round $r" --no-progress
        size_of "$id" "$r" "$rd/walcore-repo"
        backup_id=$(tail -n 1 "$res/w-take.$r.out")
        # shellcheck disable=SC2046
        as_pg env $(wenv "$rd/walcore-repo") "$work/bin/walcore-basebackup" show "$backup_id" --json > "$res/w-take.$r.show.json"
        ;;
      p-take)
        set_archive "${pgbr[*]} archive-push %p"
        run "$id" "$r" "${pgbr[@]}" backup --type=full
        size_of "$id" "$r" "$rd/pgbr-repo"
        ;;
    esac
    if [ "$r" = 1 ] && [ "$id" = pgb-none ]; then data_bytes=$(stat -c %s "$rd/pgb-none/base.tar"); fi
  done
  wait_archived
  order=("${restores[@]}")
  if [ $((r % 2)) = 0 ]; then order=(untar p-restore w-verify w-restore); fi
  echo "== round $r of $runs: restores"
  for id in "${order[@]}"; do
    case $id in
      w-restore)
        run "$id" "$r" env WALCORE_REPO="file://$rd/walcore-repo" WALCORE_ENCRYPTION_KEY_FILE="$work/walcore.key" \
          "$work/bin/walcore-basebackup" restore --pgdata "$rd/restore-walcore" --target-immediate --json
        size_of "$id" "$r" "$rd/restore-walcore"
        ;;
      w-verify)
        run "$id" "$r" env WALCORE_REPO="file://$rd/walcore-repo" WALCORE_ENCRYPTION_KEY_FILE="$work/walcore.key" \
          "$work/bin/walcore" verify --full --json
        size_of "$id" "$r" "$rd/walcore-repo"
        ;;
      p-restore)
        run "$id" "$r" "${pgbr[@]}" --pg1-path="$rd/restore-pgbr" --type=immediate --target-action=promote restore
        size_of "$id" "$r" "$rd/restore-pgbr"
        ;;
      untar)
        run "$id" "$r" tar -xf "$rd/pgb-none/base.tar" -C "$rd/restore-untar"
        size_of "$id" "$r" "$rd/restore-untar"
        ;;
    esac
  done
  if [ "$r" = 1 ] && [ "$verify" != 0 ]; then
    echo "== checking round 1's restores"
    verify_restore "$rd/restore-walcore" walcore
    verify_restore "$rd/restore-pgbr" pgBackRest
  fi
  if [ "${KEEP:-0}" = 0 ]; then rm -rf "$rd"; fi
done

# ---- report -----------------------------------------------------------------------------------
col() { # id column: that column of every round's row
  local r
  for r in $(seq "$runs"); do
    if [ "$2" = size ]; then cat "$res/$1.$r.size"; else awk -v c="$2" '{ print $c }' "$res/$1.$r.row"; fi
  done
}
median() { sort -n | awk '{ a[NR] = $1 } END { print NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
maximum() { sort -n | tail -n 1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'; }
target() { # value >=|< bound
  awk -v v="$1" -v op="$2" -v b="$3" 'BEGIN {
    if (v == "n/a") print "n/a"; else if ((op == "<" && v < b) || (op == ">=" && v >= b)) print "met"; else print "NOT met" }'
}
declare -A wall mbs rss
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
pgbr_version=$(pgbackrest version | awk '{ print $2 }')
pg_version=$("$PGBIN/postgres" --version | awk '{ print $3 }')
echo
echo "pgbench scale $scale: databases $(mib "$db_bytes") MiB (sum of pg_database_size), base.tar $(mib "$data_bytes") MiB" \
  "(the MiB/s numerator); PostgreSQL $pg_version, pgBackRest $pgbr_version, $(nproc) cores;"
if [ "$cache_dropped" = yes ]; then echo "page cache dropped before every run;"; else echo "page cache NOT dropped (needs root);"; fi
if [ "$runs" -gt 1 ]; then echo "medians of $runs rounds (peak RSS: the largest);"; fi
echo "wall includes a final sync (its share in the next column); peak RSS of the largest single process"
echo
printf '| %-32s | %7s | %6s | %7s | %8s | %9s | %12s | %10s | %12s |\n' run "wall s" "sync s" "MiB/s" "size MiB" "size/data" \
  "peak RSS MiB" "tool CPU s" "server CPU s"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for id in "${takes[@]}" "${restores[@]}"; do
  w=$(col "$id" 1 | median)
  s=$(col "$id" 2 | median)
  sz=$(col "$id" size | median)
  wall[$id]=$w
  mbs[$id]=$(awk -v b="$data_bytes" -v w="$w" 'BEGIN { printf "%.1f", b / 1048576 / (w / 1e6) }')
  rss[$id]=$(col "$id" 3 | maximum)
  cpu=$(col "$id" 4 | median | awk '{ printf "%.2f", $1 }')
  scpu=$(col "$id" 5 | median | awk '{ printf "%.2f", $1 }')
  case $id in *restore | untar) scpu=- ;; esac
  printf '| %-32s | %7.2f | %6.2f | %7s | %8s | %9s | %12s | %10s | %12s |\n' "${label[$id]}" \
    "$(awk -v w="$w" 'BEGIN { print w / 1e6 }')" "$(awk -v w="$s" 'BEGIN { print w / 1e6 }')" "${mbs[$id]}" \
    "$(mib "$sz")" "$(ratio "$sz" "$data_bytes")" "$(mib $((rss[$id] * 1024)))" "$cpu" "$scpu"
done
if [ "$runs" -gt 1 ]; then
  echo
  echo "wall s of every round (odd rounds forwards, even rounds backwards):"
  for id in "${takes[@]}" "${restores[@]}"; do
    printf '  %-32s %s\n' "${label[$id]}" "$(col "$id" 1 | awk '{ printf "%s%.2f", (NR > 1 ? " " : ""), $1 / 1e6 }')"
  done
fi
echo
plain=$(grep -o '"plaintext_len": *[0-9]*' "$res/w-take.1.show.json" | awk '{ s += $2 } END { print s + 0 }')
stored=$(grep -o '"stored_len": *[0-9]*' "$res/w-take.1.show.json" | awk '{ s += $2 } END { print s + 0 }')
echo "walcore catalog (round 1): $(mib "$plain") MiB of plaintext stored as $(mib "$stored") MiB" \
  "($(ratio "$plain" "$stored")x); processes seen by the RSS sampler (round 1):" \
  "$(for id in "${takes[@]}" "${restores[@]}"; do printf '%s %s, ' "$id" "$(awk '{ print $6 }' "$res/$id.1.row")"; done | sed 's/, $//')"
line() { printf '  %-52s %6s  %s\n' "$@"; }
echo
echo "walcore against the others (speed: ratio of wall times, same data):"
v=$(ratio "${wall[pgb-none]}" "${wall[w-take]}")
line "take speed / pg_basebackup -Ft uncompressed" "$v" "target >= 0.95: $(target "$v" '>=' 0.95)"
v=$(ratio "${wall[p-take]}" "${wall[w-take]}")
line "take speed / pgBackRest backup process-max=2" "$v" "target >= 1.4: $(target "$v" '>=' 1.4)"
v=$(ratio "${wall[p-restore]}" "${wall[w-restore]}")
line "restore speed / pgBackRest restore process-max=2" "$v" "target >= 1.25: $(target "$v" '>=' 1.25)"
v=$(printf '%s\n' "${rss[w-take]}" "${rss[w-restore]}" | maximum)
v=$(awk -v k="$v" 'BEGIN { printf "%.1f", k / 1024 }')
line "peak RSS MiB, take and restore" "$v" "target < 256: $(target "$v" '<' 256)"
line "take speed / pg_basebackup client-zstd:1" "$(ratio "${wall[pgb-zstd]}" "${wall[w-take]}")" ""
line "restore speed / tar -xf base.tar" "$(ratio "${wall[untar]}" "${wall[w-restore]}")" ""
v=$(ratio "${wall[w-restore]}" "${wall[w-verify]}")
line "verify --full speed / walcore restore (same backup)" "$v" "target >= 1: $(target "$v" '>=' 1)"
line "backup size / pgBackRest's" "$(ratio "$(col w-take size | median)" "$(col p-take size | median)")" ""
