#!/usr/bin/env bash
# Times `walcore expire` on a large repository and counts what it asks of the store: a
# synthetic repository of WAL=100000 WAL objects (timeline 1, then timeline 2 after a switch at
# 60 %) and BACKUPS=1000 complete backups, one a day, is written through the library
# (`expire_repo`, benches/src/bin/expire_repo.rs), then
#   walcore expire --dry-run --keep-last KEEP      (the plan only)
#   walcore expire --keep-last KEEP --json         (the plan and its execution)
# run as the release binaries a user runs, with KEEP = BACKUPS / 10: 90 % of the backups go,
# and the WAL before the oldest kept backup, about 90 % of the WAL.
#
#   benches/expire-scale.sh                    (file:// and S3 on moto)
#   STORES=file benches/expire-scale.sh        (one of them: file or s3)
#   WAL=10000 BACKUPS=100 benches/expire-scale.sh   (a quick trial)
#
# Stores: file:// is a directory on the disk of /tmp; s3:// is a bucket on moto's S3 server
# (WALCORE_TEST_MOTO_SERVER or target/test-tools/moto/bin/moto_server, which scripts/test
# installs), started on loopback by this script with its access log kept.
#
# Columns:
#   wall s     of the command, /usr/bin/time's %e;
#   peak RSS   of the command, /usr/bin/time's %M;
#   CPU s      user + system seconds of the command (%U + %S): on S3 what walcore itself spent,
#              the rest of the wall time is spent waiting for the store;
#   requests   S3 only: the HTTP requests moto logged while the command ran, by kind: LIST
#              (a listing page of up to 1000 keys), GET, HEAD, PUT, DEL (DeleteObjects, up to
#              1000 keys) and DEL1 (single deletes). A file system has no requests: its figure
#              is the time;
#   budget     the issue's bound on requests: objects deleted / 1000 + listing pages + 2 x
#              backups (a catalog record read per backup and its share of the rest).
# After `expire`, the objects left are counted and checked against the plan: what it deleted
# is gone, nothing else is.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
root=$(pwd)
wal=${WAL:-100000}
backups=${BACKUPS:-1000}
stores=${STORES:-file s3}
keep=$((backups / 10))
[ "$keep" -ge 1 ] || { echo "BACKUPS must be at least 10" >&2; exit 2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
[ -x /usr/bin/time ] || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
cargo build --release -q -p walcore-benches --bin expire_repo -p basebackup --bin walcore
bin=$root/target/release

work=$(mktemp -d /tmp/walcore-expire-bench.XXXXXX)
moto_pid=''
cleanup() {
  [ -z "$moto_pid" ] || kill "$moto_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
unset WALCORE_CONFIG WALCORE_ENCRYPTION_KEY WALCORE_COMPRESSION
export WALCORE_LOG=warn

# count_requests LOG FROM_LINE: the requests logged after line FROM_LINE, by kind.
count_requests() {
  tail -n +"$(($2 + 1))" "$1" | sed 's/\x1b\[[0-9;]*m//g' | awk '
    /"(GET|HEAD|PUT|POST|DELETE) / {
      split($0, q, "\""); split(q[2], r, " "); m = r[1]; p = r[2]
      if (m == "GET" && p ~ /[?&](list-type|prefix|delimiter)=/) k = "LIST"
      else if (m == "POST" && p ~ /[?&]delete/) k = "DEL"
      else if (m == "DELETE") k = "DEL1"
      else k = m
      n[k]++; total++
    }
    END {
      printf "%d", total
      for (k in n) printf " %s=%d", k, n[k]
      printf "\n"
    }'
}

# objects STORE: how many objects the repository holds.
objects() {
  case $1 in
    file) find "$work/file-repo" -type f ! -name '.walcore-tmp*' | wc -l ;;
    s3) python3 - "$endpoint/$bucket" <<'EOF'
import re, sys, urllib.parse, urllib.request
n, token = 0, None
while True:
    url = sys.argv[1] + "?list-type=2"
    if token:
        url += "&continuation-token=" + urllib.parse.quote(token)
    page = urllib.request.urlopen(url).read().decode()
    n += page.count("<Key>")
    m = re.search(r"<NextContinuationToken>([^<]+)</NextContinuationToken>", page)
    if not m:
        break
    token = m.group(1)
print(n)
EOF
      ;;
  esac
}

# measure ARGS...: runs `walcore ARGS...` (stdout to report.json) and sets wall, rss_kib, cpu
# and, on S3, requests.
measure() {
  local from=0
  [ "$store" = s3 ] && from=$(wc -l <"$work/moto.log")
  status=0
  /usr/bin/time -f '%e %M %U %S' -o "$work/time" "$bin/walcore" "$@" >"$work/report.json" || status=$?
  read -r wall rss_kib cpu_user cpu_sys <"$work/time"
  cpu=$(awk -v u="$cpu_user" -v s="$cpu_sys" 'BEGIN { printf "%.2f", u + s }')
  requests=n/a
  if [ "$store" = s3 ]; then
    sleep 0.5 # the log line of the last request
    requests=$(count_requests "$work/moto.log" "$from")
  fi
}

rows=()
for store in $stores; do
  case $store in
    file)
      mkdir -p "$work/file-repo"
      export WALCORE_REPO="file://$work/file-repo"
      ;;
    s3)
      moto=${WALCORE_TEST_MOTO_SERVER:-$root/target/test-tools/moto/bin/moto_server}
      [ -x "$moto" ] || { echo "no moto_server at $moto (run scripts/test once, or set WALCORE_TEST_MOTO_SERVER)" >&2; exit 2; }
      port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      "$moto" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
      moto_pid=$!
      endpoint=http://127.0.0.1:$port
      for _ in $(seq 100); do curl -sf "$endpoint/" >/dev/null && break; sleep 0.2; done
      bucket=expire-bench
      curl -sf -X PUT --data-binary '' "$endpoint/$bucket" >/dev/null
      export WALCORE_REPO="s3://$bucket/repo" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
        AWS_REGION=us-east-1 AWS_ENDPOINT_URL=$endpoint AWS_ALLOW_HTTP=true
      ;;
    *) echo "unknown store '$store' (file or s3)" >&2; exit 2 ;;
  esac
  echo "== $store: building $wal WAL objects and $backups backups" >&2
  "$bin/expire_repo" --wal "$wal" --backups "$backups" --verified >&2
  before=$(objects "$store")

  # `list` before any index exists (every catalog record read, the index written), then again
  # (the catalog listed, the index read): what the index saves every command that reads the
  # catalog (list, show, restore plans, expire, verify).
  for mode in cold indexed; do
    measure list --json
    listed=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))))' "$work/report.json")
    [ "$listed" -eq "$backups" ] || { echo "FAILED: list showed $listed of $backups backups" >&2; exit 1; }
    echo "== $store list ($mode): ${wall}s (CPU ${cpu}s), peak RSS $((rss_kib / 1024)) MiB, requests $requests" >&2
    rows+=("| $store | list ($mode) | $before | 0 | $wall | $cpu | $((rss_kib / 1024)) | $requests | - |")
  done
  # A restore's plan (the catalog, the histories, the end of the archive).
  measure restore --dry-run --json -D "$work/restored"
  [ "$status" = 0 ] || { echo "FAILED: restore --dry-run exited $status" >&2; exit 1; }
  echo "== $store restore plan: ${wall}s (CPU ${cpu}s), peak RSS $((rss_kib / 1024)) MiB, requests $requests" >&2
  rows+=("| $store | restore --dry-run | $before | 0 | $wall | $cpu | $((rss_kib / 1024)) | $requests | - |")
  # status twice: the first builds the WAL part of the index (every log directory listed
  # once), the second reads it, as every status after the first does.
  for mode in cold indexed; do
    measure status --json
    read -r sbackups sgaps < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(r["backups"], len(r["window"]["gaps"]))' "$work/report.json")
    [ "$status" = 0 ] && [ "$sbackups" = "$backups" ] && [ "$sgaps" = 0 ] || { echo "FAILED: status exited $status, $sbackups backups, $sgaps gaps" >&2; exit 1; }
    echo "== $store status ($mode): ${wall}s (CPU ${cpu}s), peak RSS $((rss_kib / 1024)) MiB, requests $requests" >&2
    rows+=("| $store | status ($mode) | $before | 0 | $wall | $cpu | $((rss_kib / 1024)) | $requests | - |")
  done
  # verify: the full listing, then the WAL through the index (as a daily run on a large
  # store would); the builder's ledger says everything was verified, so nothing is read.
  for mode in listing index; do
    args=(verify --json)
    [ "$mode" = index ] && args+=(--index)
    measure "${args[@]}"
    read -r vread vproblems < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(r["objects_read"], len(r["problems"]))' "$work/report.json")
    [ "$status" = 0 ] && [ "$vproblems" = 0 ] || { echo "FAILED: ${args[*]} exited $status with $vproblems problems" >&2; exit 1; }
    echo "== $store verify ($mode): ${wall}s (CPU ${cpu}s), peak RSS $((rss_kib / 1024)) MiB, read $vread objects, requests $requests" >&2
    rows+=("| $store | verify, $mode ($vread read) | $before | 0 | $wall | $cpu | $((rss_kib / 1024)) | $requests | - |")
  done
  before=$(objects "$store")

  for mode in dry-run expire; do
    args=(expire --keep-last "$keep" --json)
    [ "$mode" = dry-run ] && args+=(--dry-run)
    measure "${args[@]}"
    budget=n/a
    deleted=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))["deleted"]
print(d["backups"] + d["backup_objects"] + d["orphan_objects"] + d["wal_objects"])' "$work/report.json")
    planned=$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
gone = sum(1 for b in r["plan"]["backups"] if b["verdict"] == "expire")
print(gone, r["wal"]["delete"])' "$work/report.json")
    if [ "$store" = s3 ]; then
      pages=$(sed -n 's/.*LIST=\([0-9]*\).*/\1/p' <<<"$requests")
      budget=$((deleted / 1000 + ${pages:-0} + 2 * backups))
    fi
    after=$(objects "$store")
    echo "== $store $mode: ${wall}s (CPU ${cpu}s), peak RSS $((rss_kib / 1024)) MiB, objects $before -> $after, deleted $deleted, plan (backups, WAL) that go: $planned, requests $requests (budget $budget)" >&2
    rows+=("| $store | $mode | $before | $deleted | $wall | $cpu | $((rss_kib / 1024)) | $requests | $budget |")
    if [ "$mode" = expire ] && [ $((before - deleted)) -ne "$after" ]; then
      echo "FAILED: $before objects - $deleted deleted should leave $((before - deleted)), found $after" >&2
      exit 1
    fi
    before=$after
  done
  [ "$store" = s3 ] && { kill "$moto_pid"; wait "$moto_pid" 2>/dev/null || true; moto_pid=''; }
done

echo
echo "WAL objects: $wal, backups: $backups, policy: --keep-last $keep ($(nproc) cores, $(date -u +%F))"
echo
echo "| store | command | objects before | objects deleted | wall s | CPU s | peak RSS MiB | requests (by kind) | request budget |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
