#!/usr/bin/env bash
# Times the archive and restore hooks as PostgreSQL calls them (one call per segment), for
# walcore and for pgBackRest (the distribution's package, 2.45), on the same real WAL and the
# same disk, in one run, and prints a markdown table of per-call latency, throughput, peak RSS
# of any single process and CPU per GiB (detached background workers included), then the
# repository sizes and the walcore/pgBackRest ratios against their targets.
#
#   benches/hooks-vs-pgbackrest.sh [SEGMENTS]     (default 64 real 16 MiB segments)
#
# Modes, interleaved walcore / pgBackRest so that drift affects both:
#   archive: walcore sync (WALCORE_LOOKAHEAD=0, plain directory), pgBackRest sync,
#            walcore look-ahead (default settings), pgBackRest archive-async process-max=2;
#   restore: walcore sync (WALCORE_PREFETCH=0), pgBackRest sync,
#            walcore prefetch (default settings), pgBackRest archive-async process-max=2.
# The look-ahead / async / prefetch modes run in a fake data directory the way PostgreSQL's
# archiver and startup process use one: `pg_wal/archive_status/SEG.ready` for every segment at
# the start, `cd DATA && sh -c 'HOOK pg_wal/SEG'` oldest first, `.ready` renamed to `.done` after
# each 0; restores into `pg_wal/RECOVERYXLOG`, which is then taken away (and compared with the
# source afterwards: every restored file of every mode must be byte-identical). The page cache
# is dropped before every restore mode (as root).
#
# Then, unless LIVE=0, a live run: the same initial pgbench database (scale 20) copied afresh for
# each of (after a warm-up run that is not counted): archiving off, archive_command=/bin/true,
# walcore (default look-ahead), pgBackRest sync, pgBackRest async process-max=2;
# pgbench writes as fast as it can for LIVE_SECONDS (default 20); prints tps, tps against
# archiving off, the largest .ready backlog (sampled every 100 ms) and how long after pgbench
# ends the backlog takes to reach 0.
#
# Both tools compress with zstd at level 3 and encrypt (walcore AES-256-GCM; pgBackRest
# aes-256-cbc, its only cipher). Environment: SEGMENTS, LIVE, LIVE_SECONDS, LIVE_PGBENCH
# (pgbench options, default "-c 4 -j 2 -N"), PGBIN, CPU_ACCOUNTING=proc (skip cgroups), KEEP=1
# (keep the work directory).
# Runs as root (PostgreSQL and the hooks then run as user postgres) or as a normal user.
set -euo pipefail
shopt -s nullglob
export LC_ALL=C
cd "$(dirname "$0")/.."
segments=${1:-${SEGMENTS:-64}}
live=${LIVE:-1}
live_seconds=${LIVE_SECONDS:-20}
live_pgbench=${LIVE_PGBENCH:--c 4 -j 2 -N}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
case $segments in '' | *[!0-9]*) echo "SEGMENTS must be a number" >&2; exit 2 ;; esac

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v pgbackrest >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest >/dev/null
fi
[ -x /usr/bin/time ] || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
cargo build --release --bins -q

work=$(mktemp -d /tmp/walcore-hooks-bench.XXXXXX)
if [ "$(id -u)" = 0 ]; then
  pg_user=(runuser -u postgres --)
  chown postgres: "$work"
else
  pg_user=()
fi
as_pg() { "${pg_user[@]}" "$@"; }
chmod 755 "$work"
res=$work/results
as_pg mkdir "$res"
cg_base='' cg_kind=''

# The processes of ours that are still alive: the hooks and their workers (by their name, and
# by $work in their command line, so nothing outside this run is ever touched).
tool_pids() {
  local d comm
  local -a argv
  for d in /proc/[0-9]*; do
    { read -r comm < "$d/comm"; } 2>/dev/null || continue
    case $comm in walcore-archiv* | walcore-restor* | pgbackrest) ;; *) continue ;; esac
    { mapfile -d '' -t argv < "$d/cmdline"; } 2>/dev/null || continue
    if [[ "${argv[*]}" == *"$work"* ]]; then echo "${d#/proc/}"; fi
  done
}
pg_stop() { # data directory
  [ -f "$1/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$1" -m "${2:-fast}" -w stop >/dev/null 2>&1
  return 0
}
cleanup() {
  local pid pids g
  set +e
  pg_stop "$work/data" immediate
  pg_stop "$work/live" immediate
  pids=$(tool_pids)
  if [ -n "$pids" ]; then
    for pid in $pids; do kill "$pid" 2>/dev/null; done
    sleep 1
    for pid in $(tool_pids); do kill -9 "$pid" 2>/dev/null; done
  fi
  if [ -n "$cg_base" ]; then
    for g in "$cg_base"/*/; do rmdir "$g" 2>/dev/null; done
    rmdir "$cg_base" 2>/dev/null
  fi
  if [ "${KEEP:-0}" = 0 ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cp target/release/walcore-archive target/release/walcore-restore "$work/"

echo "== making $segments real WAL segments with pgbench"
as_pg "$PGBIN/initdb" -D "$work/data" -A trust >/dev/null
as_pg mkdir "$work/sock" "$work/wal" "$work/out"
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
count_segments() { find "$work/wal" -maxdepth 1 -name '[0-9A-F]*' | grep -c '/[0-9A-F]\{24\}$' || true; }
while [ "$(count_segments)" -lt $((segments + 2)) ]; do
  as_pg "$PGBIN/pgbench" -h "$work/sock" -c 2 -j 2 -T 5 postgres >/dev/null 2>&1
done
# the newest copy may still be in progress: left out
mapfile -t segs < <(find "$work/wal" -maxdepth 1 -name '[0-9A-F]*' -printf '%f\n' | grep '^[0-9A-F]\{24\}$' | sort \
  | tail -n $((segments + 1)) | head -n "$segments")
printf '%s\n' "${segs[@]}" > "$work/segs.list"
bytes=$((segments * 16 * 1024 * 1024))

key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
pgbr_conf() { # file repository pg1-path [more [global] lines]
  local file=$1 repo=$2 pgpath=$3
  shift 3
  printf '%s\n' "[global]" "repo1-path=$repo" "repo1-cipher-type=aes-256-cbc" "repo1-cipher-pass=$key" \
    "compress-type=zst" "compress-level=3" "log-level-console=warn" "log-level-file=off" \
    "lock-path=$work/pgbr-lock" "$@" "[bench]" "pg1-path=$pgpath" "pg1-socket-path=$work/sock" > "$file"
  chmod 644 "$file"
}
async_opts() { printf '%s\n' archive-async=y process-max=2 "spool-path=$work/$1"; }
# A fresh repository per pgBackRest mode. stanza-create needs the running cluster in pg1-path, so
# each repository has a config for it; the hooks use a second config, same repository and stanza,
# whose pg1-path is the fake data directory they run in (pgBackRest resolves a relative %p
# against pg1-path and the async modes read pg1-path/pg_wal/archive_status).
for r in pgbr-repo-sync pgbr-repo-async walcore-repo-sync walcore-repo-la; do as_pg mkdir "$work/$r"; done
pgbr_conf "$work/pgbr-sync.conf" "$work/pgbr-repo-sync" "$work/data"
pgbr_conf "$work/pgbr-async-stanza.conf" "$work/pgbr-repo-async" "$work/data"
# shellcheck disable=SC2046 # one option per line
pgbr_conf "$work/pgbr-push-async.conf" "$work/pgbr-repo-async" "$work/fakeP" $(async_opts pgbr-spool-push)
pgbr_conf "$work/pgbr-get-sync.conf" "$work/pgbr-repo-sync" "$work/fakeRP"
# shellcheck disable=SC2046
pgbr_conf "$work/pgbr-get-async.conf" "$work/pgbr-repo-sync" "$work/fakeRPA" $(async_opts pgbr-spool-get)
# shellcheck disable=SC2046
pgbr_conf "$work/pgbr-get-async-paced.conf" "$work/pgbr-repo-sync" "$work/fakeRPAp" $(async_opts pgbr-spool-get-paced)
as_pg pgbackrest --config="$work/pgbr-sync.conf" --stanza=bench stanza-create >/dev/null
as_pg pgbackrest --config="$work/pgbr-async-stanza.conf" --stanza=bench stanza-create >/dev/null
pg_stop "$work/data"

# A fake data directory: global/pg_control and PG_VERSION of the real cluster, pg_wal/ and
# pg_wal/archive_status/; with "ready", every segment hard-linked into pg_wal/ and marked .ready.
make_fake() { # directory [ready]
  # shellcheck disable=SC2016 # expanded by the inner shell
  as_pg bash -c 'set -e; mkdir -p "$1/global" "$1/pg_wal/archive_status"
    cp "$2/global/pg_control" "$1/global/"; cp "$2/PG_VERSION" "$1/"
    if [ "$3" = ready ]; then while read -r s; do
      ln "$4/$s" "$1/pg_wal/$s"; : > "$1/pg_wal/archive_status/$s.ready"; done < "$5"; fi' \
    make_fake "$1" "$work/data" "${2:-}" "$work/wal" "$work/segs.list"
}

# One call per segment, as PostgreSQL makes them: sh -c "TEMPLATE" with %f and %p replaced, in
# DIRECTORY, under /usr/bin/time (peak RSS, CPU of the foreground call). In the cgroup mode the
# loop joins CGROUP_PROCS once, before the first call, so every call and everything it starts,
# detached or not, is accounted there. (Joining per call would put a cgroup migration, which
# waits for an RCU grace period, 10-20 ms, into every call's latency.) The loop's own CPU is
# measured by a no-op hook first and subtracted. Writes OUT.calls (µs, KiB, user s, sys s per call) and
# OUT.wall (µs from the start of the first call until the last one returned).
cat > "$work/hookloop.sh" <<'LOOP'
#!/usr/bin/env bash
set -euo pipefail
export LC_ALL=C
out=$1 dir=$2 cgprocs=$3 kind=$4 template=$5 keep=$6 seglist=$7
mapfile -t segs < "$seglist"
pace=''
# PACE_MS: a pause after each restore call, like PostgreSQL replaying the segment before it asks
# for the next one (so that a prefetched call's own latency is measured, not the worker's speed).
[ -z "${PACE_MS:-}" ] || pace=$(awk -v m="$PACE_MS" 'BEGIN { printf "%.3f", m / 1000 }')
[ -z "$cgprocs" ] || echo $$ > "$cgprocs"
cd "$dir"
: > "$out.calls"
first=${EPOCHREALTIME/./}
t1=$first
for f in "${segs[@]}"; do
  cmd=${template//'%f'/$f}
  cmd=${cmd//'%p'/pg_wal/$f}
  t0=${EPOCHREALTIME/./}
  if ! /usr/bin/time -f '%M %U %S' -o "$out.time" sh -c "exec $cmd" < /dev/null >> "$out.log" 2>&1; then
    echo "call failed: $cmd" >&2
    tail -n 5 "$out.log" "$out.time" >&2
    exit 1
  fi
  t1=${EPOCHREALTIME/./}
  read -r rss user sys < "$out.time"
  echo "$((t1 - t0)) $rss $user $sys" >> "$out.calls"
  if [ "$kind" = get ]; then
    [ -f pg_wal/RECOVERYXLOG ] || { echo "exit 0 but no pg_wal/RECOVERYXLOG for $f" >&2; exit 1; }
    mv pg_wal/RECOVERYXLOG "$keep/$f"
    [ -z "$pace" ] || sleep "$pace"
  elif [ -e "pg_wal/archive_status/$f.ready" ]; then
    mv "pg_wal/archive_status/$f.ready" "pg_wal/archive_status/$f.done"
  fi
done
echo "$((t1 - first))" > "$out.wall"
LOOP
chmod 644 "$work/hookloop.sh"

# CPU of the detached workers. They are not children of the call (they outlive it and are
# reparented to init), so /usr/bin/time, which sees only the rusage of the children it reaps,
# misses them. As root, each mode gets its own cgroup (v1 cpuacct, or v2): the call's shell moves
# itself in before exec'ing the hook, every process forked from there on (setsid/setpgid do not
# change the cgroup) is charged to it, exited processes included, and the mode's CPU is the
# group's usage once the group is empty again, i.e. once the last worker has exited. The harness
# itself (loop, time, mv, sampler) sits in a sibling group and is not charged. Otherwise
# (CPU_ACCOUNTING=proc, no root, no cgroup) the CPU is the calls' own (time) plus, for each
# background process (a hook process with another process group than ours: the workers walcore
# and pgBackRest detach, and pgBackRest's local processes under them), its utime+stime sampled
# from /proc/PID/stat every 20 ms until it exits: that undercounts each worker by at most one
# sampling interval of CPU.
if [ "${CPU_ACCOUNTING:-cgroup}" != proc ] && [ "$(id -u)" = 0 ]; then
  for k in /sys/fs/cgroup/cpuacct:v1 /sys/fs/cgroup:v2; do
    d=${k%:*}
    if { [ "${k#*:}" = v1 ] && [ -f "$d/cpuacct.usage" ]; } || { [ "${k#*:}" = v2 ] && [ -f "$d/cgroup.controllers" ]; }; then
      if mkdir "$d/walcore-bench-$$" 2>/dev/null; then cg_base=$d/walcore-bench-$$ cg_kind=${k#*:}; break; fi
    fi
  done
fi
cg_new() { # name: a group the hooks, running as postgres, may move themselves into
  mkdir "$cg_base/$1"
  chown postgres "$cg_base/$1/cgroup.procs"
}
if [ -n "$cg_base" ]; then
  # v2 lets a process move itself only if it may write cgroup.procs of the common ancestor.
  chown postgres "$cg_base/cgroup.procs"
  mkdir "$cg_base/harness"
  cg_new probe
  # shellcheck disable=SC2016
  if ! sh -c 'echo $$ > "$1/harness/cgroup.procs" && exec runuser -u postgres -- sh -c "echo \$\$ > $1/probe/cgroup.procs"' \
    probe "$cg_base" 2>/dev/null; then
    rmdir "$cg_base/probe" "$cg_base/harness" "$cg_base"
    cg_base='' cg_kind=''
  else
    rmdir "$cg_base/probe"
  fi
fi
cg_busy() { # cgroup.procs hides exiting processes; tasks lists them (and threads) until they are gone
  { read -r _ < "$1/cgroup.procs"; } 2>/dev/null || { read -r _ < "$1/tasks"; } 2>/dev/null
}
cg_usage_ns() {
  if [ "$cg_kind" = v1 ]; then cat "$1/cpuacct.usage"; else awk '$1 == "usage_usec" { print $2 * 1000 }' "$1/cpu.stat"; fi
}
if [ -n "$cg_base" ]; then acct="cgroup $cg_kind"; else acct="/proc sampling"; fi

mkfifo "$work/tick"
exec {tick_fd}<> "$work/tick"
tick() { read -r -t "$1" -u "$tick_fd" _ || true; } # sleeps without a fork
my_pgid=$(awk '{ sub(/.*\) /, ""); print $3 }' /proc/$$/stat)

# Peak RSS of background processes: VmHWM of every process of the mode (cgroup members, or our
# hook processes), every 20 ms until told to stop; also, without a cgroup, the CPU of background
# processes (see above). Writes "peak KiB, background CPU s" to FILE.
sampler() { # file stop-file [cgroup]
  local file=$1 stop=$2 group=${3:-} peak=0 pid key val line hz total=0
  local -a pids fields
  local -A cpu=()
  hz=$(getconf CLK_TCK)
  while [ ! -e "$stop" ]; do
    if [ -n "$group" ]; then mapfile -t pids < "$group/cgroup.procs"; else mapfile -t pids < <(tool_pids); fi
    for pid in "${pids[@]}"; do
      { while read -r key val _; do
        if [ "$key" = VmHWM: ]; then
          if [ "$val" -gt "$peak" ]; then peak=$val; fi
          break
        fi
      done < "/proc/$pid/status"; } 2>/dev/null || true
      if [ -n "$group" ]; then continue; fi
      { read -r line < "/proc/$pid/stat"; } 2>/dev/null || continue
      read -r -a fields <<< "${line##*) }"
      if [ "${fields[2]}" != "$my_pgid" ]; then cpu[$pid]=$((fields[11] + fields[12])); fi
    done
    tick 0.02
  done
  for val in "${cpu[@]}"; do total=$((total + val)); done
  echo "$peak $(awk -v t="$total" -v hz="$hz" 'BEGIN { printf "%.3f", t / hz }')" > "$file"
}

declare -A label med mean mbs rss cpug bgcpu workwait cg_total cg_fg
label=([noop]="no-op hook (harness floor)" [w-sync]="walcore archive sync" [p-sync]="pgBackRest push sync"
  [w-la]="walcore archive look-ahead" [p-async]="pgBackRest push async"
  [w-get]="walcore restore sync" [p-get]="pgBackRest get sync"
  [w-pf]="walcore restore prefetch" [p-getasync]="pgBackRest get async"
  [w-pfp]="walcore prefetch, paced" [p-getasyncp]="pgBackRest async, paced")
drop_caches() {
  sync
  { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null || sudo -n sh -c 'echo 3 > /proc/sys/vm/drop_caches' 2>/dev/null \
    || echo "   (page cache not dropped: needs root)"
}

run_mode() { # id directory push|get template [VAR=value...]
  local id=$1 dir=$2 kind=$3 template=$4 group='' procs='' keep='' spid start waited killed=''
  local peak bg cpu_ns fg n md mn wall fgrss pid s
  shift 4
  echo "== ${label[$id]}"
  if [ -n "$cg_base" ]; then cg_new "$id"; group=$cg_base/$id procs=$group/cgroup.procs; fi
  if [ "$kind" = get ]; then keep=$work/out/$id; as_pg mkdir "$keep"; fi
  sampler "$res/$id.sample" "$res/$id.stop" "$group" &
  spid=$!
  local -a launch=("${pg_user[@]}" env "$@" bash "$work/hookloop.sh" "$res/$id" "$dir" "$procs" "$kind" "$template" "$keep" "$work/segs.list")
  # shellcheck disable=SC2016 # expanded by sh
  if [ -n "$cg_base" ]; then launch=(sh -c 'echo $$ > "$0/harness/cgroup.procs" && exec "$@"' "$cg_base" "${launch[@]}"); fi
  "${launch[@]}" || { touch "$res/$id.stop"; exit 1; }
  # Wait for the detached workers to exit (walcore's restore worker idles ~30 s first).
  start=${EPOCHREALTIME/./}
  while if [ -n "$group" ]; then cg_busy "$group"; else [ -n "$(tool_pids)" ]; fi; do
    if [ -z "$killed" ] && [ $((${EPOCHREALTIME/./} - start)) -gt 120000000 ]; then
      killed=$(tool_pids | tr '\n' ' ')
      echo "   workers still running 120 s after the last call, killed: $killed"
      for pid in $killed; do kill "$pid" 2>/dev/null || true; done
    fi
    tick 0.1
  done
  waited=$(((${EPOCHREALTIME/./} - start) / 100000))
  workwait[$id]=$((waited / 10)).$((waited % 10))
  touch "$res/$id.stop"
  wait "$spid"
  read -r peak bg < "$res/$id.sample"
  read -r wall < "$res/$id.wall"
  read -r n md mn fg fgrss < <(sort -n "$res/$id.calls" | awk '
    { a[NR] = $1; s += $1; c += $3 + $4; if ($2 > m) m = $2 }
    END { md = NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
          printf "%d %.2f %.2f %.2f %d\n", NR, md / 1000, s / NR / 1000, c, m }')
  [ "$n" = "$segments" ] || { echo "${label[$id]}: $n calls of $segments"; exit 1; }
  if [ -n "$group" ]; then
    cpu_ns=$(cg_usage_ns "$group")
    bg=$(awk -v t="$cpu_ns" -v f="$fg" 'BEGIN { b = t / 1e9 - f; printf "%.2f", b < 0 ? 0 : b }')
    for _ in 1 2 3 4 5 6 7 8 9 10; do rmdir "$group" 2>/dev/null && break; tick 0.2; done # else at exit
  else
    cpu_ns=$(awk -v b="$bg" -v f="$fg" 'BEGIN { printf "%.0f", (b + f) * 1e9 }')
  fi
  if [ -n "$group" ]; then
    cg_total[$id]=$cpu_ns cg_fg[$id]=$fg
    if [ -n "${cg_total[noop]:-}" ] && [ "$id" != noop ]; then
      # Take away the harness (loop, time, sh) as the no-op hook measured it, per call.
      cpu_ns=$(awk -v t="$cpu_ns" -v h="${cg_total[noop]}" -v n="$n" -v s="$segments" \
        'BEGIN { v = t - h / s * n; printf "%.0f", v < 0 ? 0 : v }')
      fg=$(awk -v f="$fg" -v h="${cg_fg[noop]}" -v n="$n" -v s="$segments" \
        'BEGIN { v = f - h / s * n; printf "%.2f", v < 0 ? 0 : v }')
      bg=$(awk -v t="$cpu_ns" -v f="$fg" 'BEGIN { b = t / 1e9 - f; printf "%.2f", b < 0 ? 0 : b }')
    fi
  fi
  if [ "$fgrss" -gt "$peak" ]; then peak=$fgrss; fi
  med[$id]=$md mean[$id]=$mn bgcpu[$id]=$bg rss[$id]=$((peak / 1024))
  mbs[$id]=$(awk -v b="$bytes" -v w="$wall" 'BEGIN { printf "%.1f", b / 1048576 / (w / 1e6) }')
  cpug[$id]=$(awk -v c="$cpu_ns" -v b="$bytes" 'BEGIN { printf "%.2f", c / 1e9 * 1073741824 / b }')
  if [ "$kind" = get ]; then # every restored segment byte-identical to its source
    for s in "${segs[@]}"; do
      cmp -s "$work/wal/$s" "$keep/$s" || { echo "MISMATCH in ${label[$id]}: $s"; exit 1; }
    done
    rm -rf "$keep"
  fi
}

W=$work/walcore-archive R=$work/walcore-restore
wenv=(WALCORE_REPO="file://$work/walcore-repo-sync" WALCORE_ENCRYPTION_KEY="$key")
make_fake "$work/fakeW" ready
make_fake "$work/fakeP" ready
for d in fakeR fakeRF fakeRP fakeRPA fakeRFp fakeRPAp; do make_fake "$work/$d"; done
pace_ms=${PACE_MS:-40}
pgbr() { echo "pgbackrest --config=$work/pgbr-$1.conf --stanza=bench"; }

echo "== timing ($segments segments; CPU accounting: $acct)"
run_mode noop "$work/wal" push "true %f"
run_mode w-sync "$work/wal" push "$W %f" "${wenv[@]}" WALCORE_LOOKAHEAD=0
run_mode p-sync "$work/wal" push "$(pgbr sync) archive-push $work/wal/%f"
run_mode w-la "$work/fakeW" push "$W %p" WALCORE_REPO="file://$work/walcore-repo-la" WALCORE_ENCRYPTION_KEY="$key"
run_mode p-async "$work/fakeP" push "$(pgbr push-async) archive-push $work/fakeP/%p"
drop_caches
run_mode w-get "$work/fakeR" get "$R %f pg_wal/RECOVERYXLOG" "${wenv[@]}" WALCORE_PREFETCH=0
drop_caches
run_mode p-get "$work/fakeRP" get "$(pgbr get-sync) archive-get %f pg_wal/RECOVERYXLOG"
drop_caches
run_mode w-pf "$work/fakeRF" get "$R %f pg_wal/RECOVERYXLOG" "${wenv[@]}"
drop_caches
run_mode p-getasync "$work/fakeRPA" get "$(pgbr get-async) archive-get %f pg_wal/RECOVERYXLOG"
hits=$(grep -c prefetched "$res/w-pf.log" || true)
# The same, with a pause after each call as if PostgreSQL replayed the segment: the latency of a
# call that finds its segment prepared.
drop_caches
run_mode w-pfp "$work/fakeRFp" get "$R %f pg_wal/RECOVERYXLOG" "${wenv[@]}" PACE_MS="$pace_ms"
drop_caches
run_mode p-getasyncp "$work/fakeRPAp" get "$(pgbr get-async-paced) archive-get %f pg_wal/RECOVERYXLOG" PACE_MS="$pace_ms"
hits_paced=$(grep -c prefetched "$res/w-pfp.log" || true)

# ---- live: pgbench against a server archiving with each tool -----------------------------------
declare -A ltps lwal lback ldrain
live_modes=(off noop walcore pgbr-sync pgbr-async)
declare -A llabel=([warmup]="warm-up (archiving off)" [off]="archiving off" [noop]="no-op (/bin/true)" [walcore]="walcore"
  [pgbr-sync]="pgBackRest sync" [pgbr-async]="pgBackRest async")
if [ "$live" != 0 ]; then
  echo "== live: pgbench $live_pgbench -T $live_seconds, scale 20"
  L=$work/live
  as_pg "$PGBIN/initdb" -D "$L" -A trust >/dev/null
  cat >> "$L/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$work/sock'
wal_level = replica
archive_mode = off
synchronous_commit = off
max_wal_size = 4GB
min_wal_size = 1GB
wal_keep_size = 0
checkpoint_timeout = 1h
checkpoint_completion_target = 0.9
CONF
  as_pg "$PGBIN/pg_ctl" -D "$L" -l "$work/live.log" -w start >/dev/null
  as_pg "$PGBIN/pgbench" -h "$work/sock" -i -s 20 -q postgres >/dev/null 2>&1
  as_pg "$PGBIN/psql" -h "$work/sock" -qAtc checkpoint postgres
  pg_stop "$L"
  as_pg cp -a "$L" "$work/live-template"
  for r in walcore-repo-live pgbr-repo-live-sync pgbr-repo-live-async; do as_pg mkdir "$work/$r"; done
  pgbr_conf "$work/pgbr-live-sync.conf" "$work/pgbr-repo-live-sync" "$L"
  # shellcheck disable=SC2046
  pgbr_conf "$work/pgbr-live-async.conf" "$work/pgbr-repo-live-async" "$L" $(async_opts pgbr-spool-live)
  ready_count() { local -a f=("$L"/pg_wal/archive_status/*.ready); echo "${#f[@]}"; }
  sql() { as_pg "$PGBIN/psql" -h "$work/sock" -qAtc "$1" postgres; }
  live_run() { # id [pgBackRest config to stanza-create] [postgresql.conf lines...]
    local id=$1 conf=$2 bench_pid n max=0 t_end lsn0 wal drain
    shift 2
    echo "== live: ${llabel[$id]}"
    rm -rf "$L"
    as_pg cp -a "$work/live-template" "$L"
    printf '%s\n' "$@" >> "$L/postgresql.conf"
    sync
    as_pg "$PGBIN/pg_ctl" -D "$L" -l "$work/live.log" -w start >/dev/null
    [ -z "$conf" ] || as_pg pgbackrest --config="$conf" --stanza=bench stanza-create >/dev/null
    lsn0=$(sql 'select pg_current_wal_lsn()')
    # shellcheck disable=SC2086 # a list of options
    as_pg "$PGBIN/pgbench" -h "$work/sock" $live_pgbench -T "$live_seconds" postgres > "$res/live-$id.out" 2>&1 &
    bench_pid=$!
    while kill -0 "$bench_pid" 2>/dev/null; do
      n=$(ready_count)
      if [ "$n" -gt "$max" ]; then max=$n; fi
      tick 0.1
    done
    wait "$bench_pid" || { echo "pgbench failed:"; tail -5 "$res/live-$id.out"; exit 1; }
    t_end=${EPOCHREALTIME/./}
    wal=$(sql "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0')")
    while n=$(ready_count); [ "$n" -gt 0 ]; do
      if [ "$n" -gt "$max" ]; then max=$n; fi
      if [ $((${EPOCHREALTIME/./} - t_end)) -gt 600000000 ]; then echo "   backlog still $n 600 s after pgbench"; break; fi
      tick 0.1
    done
    drain=$(((${EPOCHREALTIME/./} - t_end) / 100000))
    pg_stop "$L"
    n=0
    while [ -n "$(tool_pids)" ] && [ "$n" -lt 600 ]; do tick 0.1; n=$((n + 1)); done # workers' idle exit
    ltps[$id]=$(awk '/^tps = / { printf "%.0f", $3 }' "$res/live-$id.out")
    [ -n "${ltps[$id]}" ] || { echo "no tps in the pgbench output:"; cat "$res/live-$id.out"; exit 1; }
    lwal[$id]=$(awk -v b="$wal" 'BEGIN { printf "%.0f", b / 1048576 }')
    lback[$id]=$max ldrain[$id]=$((drain / 10)).$((drain % 10))
  }
  # The first run after the set-up is slower whatever it archives with: a warm-up, not reported.
  live_run warmup ''
  live_run off ''
  live_run noop '' "archive_mode = on" "archive_command = '/bin/true'"
  live_run walcore '' "archive_mode = on" \
    "archive_command = 'WALCORE_REPO=file://$work/walcore-repo-live WALCORE_ENCRYPTION_KEY=$key $W %p'"
  live_run pgbr-sync "$work/pgbr-live-sync.conf" "archive_mode = on" \
    "archive_command = '$(pgbr live-sync) archive-push %p'"
  live_run pgbr-async "$work/pgbr-live-async.conf" "archive_mode = on" \
    "archive_command = '$(pgbr live-async) archive-push %p'"
fi

# ---- report -----------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'; }
target() { # value <=|>= bound
  awk -v v="$1" -v op="$2" -v b="$3" 'BEGIN {
    if (v == "n/a") print "n/a"; else if ((op == "<=" && v <= b) || (op == ">=" && v >= b)) print "met"; else print "NOT met" }'
}
line() { printf '  %-48s %6s  %s\n' "$@"; }
echo
echo "$segments segments of 16 MiB, $(nproc) cores, pgBackRest $(pgbackrest version | awk '{ print $2 }'); ms per call as PostgreSQL"
echo "sees it; MiB/s from the first call until the last returned; CPU includes detached workers ($acct);"
echo "peak RSS of the largest single process, workers included"
echo
printf '| %-26s | %14s | %12s | %7s | %12s | %9s |\n' mode "median ms/call" "mean ms/call" "MiB/s" "peak RSS MiB" "CPU s/GiB"
echo "|---|---:|---:|---:|---:|---:|"
for id in noop w-sync p-sync w-la p-async w-get p-get w-pf p-getasync w-pfp p-getasyncp; do
  printf '| %-26s | %14s | %12s | %7s | %12s | %9s |\n' "${label[$id]}" "${med[$id]}" "${mean[$id]}" "${mbs[$id]}" "${rss[$id]}" "${cpug[$id]}"
done
echo
echo "detached workers: CPU s (included above); exit after the last call"
for id in w-la p-async w-pf p-getasync; do printf '  %-28s %6s s  %6s s\n' "${label[$id]}" "${bgcpu[$id]}" "${workwait[$id]}"; done
echo "  walcore restore prefetch: $hits of $segments calls served from the prefetch spool ($hits_paced paced, ${pace_ms} ms after each call; MiB/s of paced rows include the pauses)"

wsize=$(du -sb "$work/walcore-repo-sync/wal" | cut -f1)
wsize2=$(du -sb "$work/walcore-repo-la/wal" | cut -f1)
psize=$(du -sb "$work/pgbr-repo-sync/archive" | cut -f1)
psize2=$(du -sb "$work/pgbr-repo-async/archive" | cut -f1)
echo
echo "repository size: walcore $((wsize / 1048576)) MiB (look-ahead run $((wsize2 / 1048576)) MiB)," \
  "pgBackRest $((psize / 1048576)) MiB (async run $((psize2 / 1048576)) MiB); walcore/pgBackRest" \
  "$(awk -v a="$wsize" -v b="$psize" 'BEGIN { printf "%.3f", a / b }'); vs raw: walcore" \
  "$(ratio "$bytes" "$wsize")x, pgBackRest $(ratio "$bytes" "$psize")x"
echo
echo "walcore / pgBackRest:"
v=$(ratio "${med[w-sync]}" "${med[p-sync]}")
line "sync archive latency (median)" "$v" "target <= 0.5: $(target "$v" '<=' 0.5)"
v=$(ratio "${mbs[w-la]}" "${mbs[p-async]}")
line "push MiB/s, look-ahead / async" "$v" "target >= 1.5: $(target "$v" '>=' 1.5)"
for pair in w-sync:p-sync w-la:p-async w-get:p-get w-pf:p-getasync; do
  v=$(ratio "${cpug[${pair%%:*}]}" "${cpug[${pair#*:}]}")
  line "CPU s/GiB, ${label[${pair%%:*}]#walcore }" "$v" "target <= 0.6: $(target "$v" '<=' 0.6)"
done
v=$(ratio "${med[w-get]}" "${med[p-get]}")
line "sync restore latency (median)" "$v" ""
v=$(ratio "${mbs[w-pf]}" "${mbs[p-getasync]}")
line "get MiB/s, prefetch / async" "$v" "target >= 2: $(target "$v" '>=' 2)"
v=${med[w-pfp]}
line "prefetched restore, paced: median ms per call (walcore)" "$v" "target <= 3: $(target "$v" '<=' 3)"

if [ "$live" != 0 ]; then
  echo
  echo "live: pgbench $live_pgbench -T $live_seconds, scale 20, synchronous_commit=off; every run from the same database"
  echo
  printf '| %-18s | %6s | %6s | %7s | %10s | %19s |\n' archiving tps "vs off" "WAL MiB" "max .ready" "backlog 0 after s"
  echo "|---|---:|---:|---:|---:|---:|"
  for id in "${live_modes[@]}"; do
    printf '| %-18s | %6s | %6s | %7s | %10s | %19s |\n' "${llabel[$id]}" "${ltps[$id]}" \
      "$(ratio "${ltps[$id]}" "${ltps[off]}")" "${lwal[$id]}" "${lback[$id]}" "${ldrain[$id]}"
  done
  echo
  echo "(a warm-up run before these, archiving off, not counted: ${ltps[warmup]} tps)"
fi
