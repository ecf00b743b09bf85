#!/usr/bin/env bash
# scripts/bench.sh - Tally's throughput and latency as a fraction of the raw-SQL ceiling.
#
# Starts a throwaway PostgreSQL on a free loopback port (durability at the defaults:
# fsync=on, synchronous_commit=on; only initdb skips its fsyncs), measures with pgbench the
# raw ceiling of the Reserve+Commit pair (scripts/pgbench/baseline/pair_cte.sql: a verbatim copy
# of the yardstick of ../shared/bench/pg-baseline.sh, so a fresh clone needs nothing beside it;
# the script says so when a ../shared copy next to the repository differs) and of Tally's own writes for that pair done
# by hand (scripts/pgbench/tally_pair.sql on the schema `tally migrate` creates: the ceiling
# of Tally's data model without Tally), then runs `tally serve` on that same server
# and on SQLite and drives it with `tally bench` (real gRPC over loopback). Prints the
# machine and commit, then one table: every figure as a ratio of the raw figure of the same
# distribution, plus start-up time to SERVING, resident memory (idle and under load) and the
# p99 Reserve latency at half of the peak load. Everything binds 127.0.0.1; PostgreSQL,
# the servers and the data directories are stopped/removed at the end, also on Ctrl-C.
# The default matrix takes about 4 minutes on a quiet 2-core machine (bounded < 10 min;
# funding the 10,000 accounts through Grant is part of it; waiting for a quiet machine is
# capped by QUIET_BUDGET, so a busy machine adds at most that).
#
# Knobs (environment):
#   DURATION=10        seconds measured per case (pgbench -T, tally bench --duration)
#   WARMUP=2           tally bench --warmup seconds (pgbench has none; see the header line)
#   CLIENTS=64         the load client count (N in the case lists below)
#   CONNECTIONS=8      HTTP/2 connections tally bench spreads its clients over
#   ACCOUNTS=10000     accounts of the uniform distribution ("hot" = one account)
#   RAW_CASES="uniform:N hot:N uniform:1"       pgbench pair_cte cases (dist:clients)
#   MODEL_CASES="uniform:N hot:N uniform:1"     pgbench tally_pair cases (dist:clients)
#   PG_CASES="reserve-commit:uniform:N reserve-commit:hot:N check-balance:uniform:N reserve-refund:uniform:N reserve-commit:uniform:1"
#   SQLITE_CASES="reserve-commit:uniform:N reserve-commit:hot:N check-balance:uniform:N"
#                      Tally cases (workload:dist:clients); an empty list skips that backend
#   HALF_LOAD="postgres"  backends that get the open-loop run at half their measured
#                      reserve-commit:uniform:N peak (--rate), reporting Reserve p99 ("" = none)
#   OVERLOAD="postgres"   backends that get a closed-loop run far past their peak after the
#                      cases: OVERLOAD_CLIENTS clients (default 2000) doing reserve-commit
#                      uniform; reports goodput as a fraction of the reserve-commit:uniform:N
#                      peak, the accepted calls' p99 and the refusals/s ("" = none)
#   REPLICAS="postgres"   backends that get a run on two `tally serve` replicas of one database
#                      (reserve-commit uniform, N/2 clients on each), against the one-replica
#                      reserve-commit:uniform:N peak ("" = none)
#   DB_MAX_CONNECTIONS=32   tally serve --db-max-connections
#   SERVER_RUST_LOG=warn    RUST_LOG of tally serve (info logs one line per request: slower)
#   SERVER_FLAGS=""    more `tally serve` flags for every server, e.g. "--db-group-workers 3"
#                      (split on spaces; no quoting)
#   EVENTS=0           1: every server gets an outbound-events endpoint (the built-in catalog
#                      plus [events.endpoints.bench] -> a python3 receiver on loopback answering
#                      204), to measure the outbox's cost against a run with EVENTS=0
#   WATCHERS=0         live balance streams `tally bench --watchers` keeps open (and reads)
#                      during every tally case, one per account first: the cost of watchers
#                      against a run with WATCHERS=0
#   QUIET_WAIT=30      before each case wait up to this many seconds for the machine to be idle
#                      (<15% busy); the "other" CPU column shows what still ran beside the case
#   QUIET_BUDGET=90    seconds of such waiting in the whole run; spent, cases start at once
#   NICE=0             run PostgreSQL, tally and the load generators under `nice -n NICE`
#   PIN=0              1: PostgreSQL on CPU 0 only, tally serve and the load generators (pgbench's
#                      client too) on CPU 1 only (taskset): the database gets one core of its
#                      own, as if the callers ran on other machines; needs 2+ CPUs. SQLite
#                      cases then run the server and its load on one core.
#   RESULTS=<file>     TSV of all cases (default ${TMPDIR:-/tmp}/tally-bench.<time>.tsv)
#   KEEP=1             keep the scratch dir (data dirs, logs, per-case output) and print it
#   BASE=<dir>         scratch dir (default: mktemp -d); PGBIN=<dir> PostgreSQL binaries
#   SQLDIR=<dir>       the yardstick's pgbench scripts (default scripts/pgbench/baseline)
#   TALLY_BIN=<file>   server binary (default target/release/tally, built if missing)
#
# Columns: ops/s = pairs/s for reserve-commit / reserve-refund / pair_cte, calls/s for
# check-balance; ratio = ops/s / raw pair_cte ops/s of the same distribution and client count
# (the N-client figure when that count has no raw case); model = ops/s / raw tally_pair ops/s
# likewise (Tally against its own writes done by hand); p50/p99 = per operation (pair), ms;
# cpu% = share of the whole machine (100 = all cores) used during the case by the tally
# server, PostgreSQL (all its processes), the load generator (tally bench or pgbench) and
# anything else; RSS = tally server's max VmRSS sampled every 0.5 s (N-client cases only);
# WAL/op = bytes of PostgreSQL write-ahead log per operation (about the same on a slow and a fast
# machine: only the full-page images after the case's checkpoint are spread over more or fewer).
set -euo pipefail

T_START=$SECONDS
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SQLDIR=${SQLDIR:-$ROOT/scripts/pgbench/baseline}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CLIENTS=${CLIENTS:-64}
CONNECTIONS=${CONNECTIONS:-8}
ACCOUNTS=${ACCOUNTS:-10000}
RAW_CASES=${RAW_CASES-"uniform:N hot:N uniform:1"}
MODEL_CASES=${MODEL_CASES-"uniform:N hot:N uniform:1"}
MODEL_SQL=$ROOT/scripts/pgbench
PG_CASES=${PG_CASES-"reserve-commit:uniform:N reserve-commit:hot:N check-balance:uniform:N reserve-refund:uniform:N reserve-commit:uniform:1"}
SQLITE_CASES=${SQLITE_CASES-"reserve-commit:uniform:N reserve-commit:hot:N check-balance:uniform:N"}
HALF_LOAD=${HALF_LOAD-postgres}
OVERLOAD=${OVERLOAD-postgres}
OVERLOAD_CLIENTS=${OVERLOAD_CLIENTS:-2000}
REPLICAS=${REPLICAS-postgres}
DB_MAX_CONNECTIONS=${DB_MAX_CONNECTIONS:-32}
SERVER_RUST_LOG=${SERVER_RUST_LOG:-warn}
read -r -a SERVER_FLAGS_A <<<"${SERVER_FLAGS:-}"
EVENTS=${EVENTS:-0}
WATCHERS=${WATCHERS:-0}
QUIET_WAIT=${QUIET_WAIT:-30}
QUIET_BUDGET=${QUIET_BUDGET:-90}
NICE=${NICE:-0}
PIN=${PIN:-0}
KEEP=${KEEP:-0}
RESULTS=${RESULTS:-${TMPDIR:-/tmp}/tally-bench.$(date +%Y%m%d-%H%M%S).tsv}
BIN_SRC=${TALLY_BIN:-$ROOT/target/release/tally}
# The servers must see only the flags below, not a caller's TALLY_* environment.
for v in $(compgen -e); do case $v in TALLY_*) unset "$v" ;; esac; done

die() { echo "bench.sh: $*" >&2; exit 2; }
# How each side runs: PostgreSQL (ON_DB) and everything that calls it (ON_APP).
ON_DB=(nice -n "$NICE") ON_APP=(nice -n "$NICE")
if [ "$PIN" = 1 ]; then
    [ "$(nproc)" -ge 2 ] || die "PIN=1 needs at least 2 CPUs"
    command -v taskset >/dev/null || die "PIN=1 needs taskset (util-linux)"
    ON_DB=(taskset -c 0 nice -n "$NICE") ON_APP=(taskset -c 1 nice -n "$NICE")
fi
note() { echo "$*" >&2; }

# ---- prerequisites --------------------------------------------------------------------------
for f in pair_cte.sql schema.sql reset.sql reserve_cte.sql; do
    [ -f "$SQLDIR/$f" ] || die "missing $SQLDIR/$f: the raw-SQL yardstick (pg-baseline.sh's pgbench scripts; set SQLDIR)"
    shared=$ROOT/../shared/bench/pgbench/$f
    if [ -f "$shared" ] && ! cmp -s "$shared" "$SQLDIR/$f"; then
        note "bench.sh: note: $SQLDIR/$f differs from $shared (the yardstick changed? copy it over)"
    fi
done
if [ -z "${PGBIN:-}" ] || [ ! -x "$PGBIN/initdb" ]; then
    PGBIN=$(pg_config --bindir 2>/dev/null || true)
    [ -x "$PGBIN/initdb" ] || PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
fi
[ -n "$PGBIN" ] && [ -x "$PGBIN/initdb" ] || die "no PostgreSQL server binaries (apt-get install postgresql, or set PGBIN)"
PGBENCH=$PGBIN/pgbench; [ -x "$PGBENCH" ] || PGBENCH=$(command -v pgbench) || die "no pgbench"
command -v curl >/dev/null || die "needs curl (start-up probe)"
if command -v jq >/dev/null; then JSON=jq; elif command -v python3 >/dev/null; then JSON=python3; else die "needs jq or python3"; fi
HZ=$(getconf CLK_TCK)

# ---- scratch dir, cleanup -------------------------------------------------------------------
if [ -n "${BASE:-}" ]; then mkdir -p "$BASE"; BASE_OWNED=0; else BASE=$(mktemp -d "${TMPDIR:-/tmp}/tally-bench.XXXXXX"); BASE_OWNED=1; fi
PGDATA_DIR=$BASE/pgdata
RUNAS=()
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' user"
    chown postgres "$BASE"
    RUNAS=(runuser -u postgres --)
fi
SRV_PID="" CHILD="" SAMPLER_PID="" RECEIVER_PID=""
stop_pid() { # pid: TERM, wait up to 15 s, then KILL (only processes this script started)
    local p=$1 i
    kill -TERM "$p" 2>/dev/null || return 0
    for i in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    set +e
    [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null
    if [ -n "$CHILD" ]; then pkill -TERM -P "$CHILD" 2>/dev/null; kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD" 2>/dev/null; fi
    [ -n "$SRV_PID" ] && stop_pid "$SRV_PID"
    [ -n "$RECEIVER_PID" ] && stop_pid "$RECEIVER_PID"
    [ -f "$PGDATA_DIR/postmaster.pid" ] && "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w stop >/dev/null 2>&1
    if [ "$KEEP" = 1 ]; then
        note "kept: $BASE"
    elif [ "$BASE_OWNED" = 1 ]; then
        rm -rf "$BASE"
    else
        rm -rf "$PGDATA_DIR" "$BASE"/bench.db* "$BASE"/tally "$BASE"/run.* "$BASE"/*.log
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the binary (copied, so a rebuild during the run cannot swap it) ------------------------
if [ ! -x "$BIN_SRC" ] && [ -z "${TALLY_BIN:-}" ]; then
    for i in $(seq 60); do   # a build in progress (cargo running)? wait for it first
        [ -x "$BIN_SRC" ] || ! pgrep -x cargo >/dev/null || { sleep 5; continue; }
        break
    done
    if [ ! -x "$BIN_SRC" ]; then
        note "== building $BIN_SRC (cargo build --release --locked --bin tally)"
        (cd "$ROOT" && cargo build --release --locked --bin tally) >&2
    fi
fi
[ -x "$BIN_SRC" ] || die "no tally binary at $BIN_SRC"
for i in 1 2 3 4 5 6; do   # retry: the file may be mid-rewrite by a concurrent build
    cp "$BIN_SRC" "$BASE/tally" 2>/dev/null && "$BASE/tally" --version >/dev/null 2>&1 && break
    [ "$i" = 6 ] && die "cannot copy a working binary from $BIN_SRC"
    sleep 10
done
TALLY=$BASE/tally
BIN_INFO="$("$TALLY" --version) (binary built $(date -r "$BIN_SRC" '+%Y-%m-%d %H:%M'))"

# ---- helpers --------------------------------------------------------------------------------
USED_PORTS=" "
port_busy() { # PORT: something listens there, or a socket still holds it as its local port (a
    # client's ephemeral port, a TIME-WAIT left by the previous case: PostgreSQL cannot bind it)
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    command -v ss >/dev/null && [ -n "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]
}
free_port() { # VAR START: first port >= START that is not busy and we did not hand out
    local p=$2
    while [[ $USED_PORTS == *" $p "* ]] || port_busy "$p"; do p=$((p + 1)); done
    USED_PORTS+="$p "
    printf -v "$1" %s "$p"
}
# machine: busy ticks (user+nice+system+irq+softirq), total ticks, process ticks (user+nice+system),
# steal ticks (time the hypervisor gave this VM's vCPUs to someone else)
cpu_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8, $2+$3+$4, $9}' /proc/stat; }
proc_ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
pg_pm() { head -1 "$PGDATA_DIR/postmaster.pid"; }
pg_ticks() { # this PostgreSQL: postmaster incl. reaped backends + live children
    local pm t f
    [ -f "$PGDATA_DIR/postmaster.pid" ] || { echo 0; return; }
    pm=$(pg_pm)
    t=$(awk '{print $14+$15+$16+$17}' "/proc/$pm/stat")
    for f in $(pgrep -P "$pm" 2>/dev/null); do t=$((t + $(proc_ticks "$f"))); done
    echo "$t"
}
pg_nchildren() { pgrep -P "$(pg_pm)" 2>/dev/null | wc -l; }
wait_backends_gone() { local i; for i in $(seq 60); do [ "$(pg_nchildren)" -le "$1" ] && return 0; sleep 0.05; done; }
QUIET_MISSES=0
wait_quiet() {
    local waited=0 a b
    while [ "$waited" -lt "$QUIET_WAIT" ] && [ "$QUIET_BUDGET" -gt 0 ]; do
        a=$(cpu_busy); sleep 1; b=$(cpu_busy)
        awk -v a="$a" -v b="$b" 'BEGIN{split(a,x," ");split(b,y," "); d=y[2]-x[2]; exit !(d>0 && (y[1]-x[1])/d < 0.15)}' && return 0
        waited=$((waited + 1)) QUIET_BUDGET=$((QUIET_BUDGET - 1))
    done
    [ "$waited" = 0 ] && return 0 # the budget is spent: not checked, not a miss
    QUIET_MISSES=$((QUIET_MISSES + 1))
    note "   (machine still busy after ${waited}s of waiting; see the 'other' cpu column)"
}
pct() { awk -v n="$1" -v d="$2" 'BEGIN{ if (d>0) printf "%.0f", 100*n/d; else print 0 }'; }
rss_kib() { awk '/^VmRSS/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN{ if (k>0) printf "%.1f", k/1024; else print "-" }'; }
now_ns() { date +%s%N; }
parse_json() { # bench JSON -> ops_s p50 p90 p99 max reserve_p99 ops errors (tab-separated)
    if [ "$JSON" = jq ]; then
        tail -n 1 "$1" | jq -r '[.ops_per_s, .latency_ms.p50, .latency_ms.p90, .latency_ms.p99, .latency_ms.max,
            (.rpc_latency_ms.Reserve.p99 // "-"), .ops,
            ((.errors // {}) | to_entries | map("\(.key):\(.value)") | join(",") | if . == "" then "none" else . end)] | @tsv'
    else
        python3 - "$1" <<'EOF'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
l = r["latency_ms"]; e = r.get("errors") or {}
res = r.get("rpc_latency_ms", {}).get("Reserve", {}).get("p99", "-")
print("\t".join(map(str, [r["ops_per_s"], l["p50"], l["p90"], l["p99"], l["max"], res, r["ops"],
                          ",".join(f"{k}:{v}" for k, v in e.items()) or "none"])))
EOF
    fi
}

declare -A RAW            # dist:clients -> raw pairs/s
declare -A MODEL          # dist:clients -> raw tally_pair pairs/s
ROWS=()                   # printed table rows
printf 'backend\tworkload\tdist\tclients\ttarget_rate\tops\tops_per_s\tunit\tratio\tmodel_ratio\tp50_ms\tp90_ms\tp99_ms\tmax_ms\treserve_p99_ms\terrors\tcpu_machine_pct\tcpu_tally_pct\tcpu_pg_pct\tcpu_client_pct\tcpu_other_pct\tcpu_steal_pct\trss_max_kib\twal_bytes_per_op\n' > "$RESULTS"

# CPU accounting around one case: snap_begin; ...; snap_end CLIENT_CPU_FILE -> CPU_* globals
# WAL/op: PostgreSQL's write-ahead log position, read before and after a case while
# PostgreSQL runs (pg_start sets WAL_ON, pg_stop clears it).
WAL_ON=0
wal_lsn() { "${PSQL[@]}" -d postgres -Atc "SELECT pg_current_wal_lsn()"; }
snap_begin() {
    S_C0=$(cpu_busy); S_P0=$(pg_ticks); S_T0=0; [ -n "$SRV_PID" ] && S_T0=$(proc_ticks "$SRV_PID")
    S_W0=""; [ "$WAL_ON" = 1 ] && S_W0=$(wal_lsn)
    return 0
}
wal_per_op() { # ops -> WAL_OP (bytes of WAL per operation since snap_begin, or -), S_W1 (the end)
    WAL_OP=-
    [ -n "$S_W0" ] || return 0
    local b
    IFS='|' read -r S_W1 b < <("${PSQL[@]}" -d postgres -Atc \
        "SELECT l, pg_wal_lsn_diff(l, '$S_W0')::bigint FROM pg_current_wal_lsn() AS l")
    WAL_OP=$(awk -v b="$b" -v n="$1" 'BEGIN{ if (n>0) printf "%.0f", b/n; else print "-" }')
}
# The same WAL by record kind, after wal_per_op (pg_waldump over S_W0..S_W1; its segments stay
# until the next case's checkpoint): ops label run-dir -> a SUMMARY line (pg_waldump's table in
# run-dir/wal-stats.txt, kept with KEEP=1). Autovacuum's records, when it ran during the case,
# are in the bytes (and so in the full-page share) but not in the counts.
wal_records() {
    [ -n "$S_W0" ] && [ "${1:-0}" -gt 0 ] || return 0
    local line
    "${RUNAS[@]}" "$PGBIN/pg_waldump" --stats=record -p "$PGDATA_DIR/pg_wal" -s "$S_W0" -e "$S_W1" >"$3/wal-stats.txt" 2>&1 || return 0
    echo "operations: $1" >>"$3/wal-stats.txt"
    line=$(awk -v n="$1" '
        /^[A-Z][A-Za-z0-9]*\/[A-Z_+]+ / { gsub(/\([^)]*\)/, ""); c[$1] = $2; fpi += $4; tot += $5 }
        END { if (tot == 0) exit 1
              printf "%.2f commits, %.2f heap inserts, %.2f HOT updates, %.2f other updates, %.2f row locks, %.2f B-tree leaf inserts; full-page images %.0f%% of the bytes\n",
                  c["Transaction/COMMIT"] / n, (c["Heap/INSERT"] + c["Heap/INSERT+INIT"]) / n, c["Heap/HOT_UPDATE"] / n,
                  (c["Heap/UPDATE"] + c["Heap/UPDATE+INIT"]) / n, c["Heap/LOCK"] / n, c["Btree/INSERT_LEAF"] / n, 100 * fpi / tot }' "$3/wal-stats.txt") || return 0
    SUMMARY+=("WAL records per pair, $2: $line")
}
snap_end() {
    local c1 p1 t1=0 cl
    c1=$(cpu_busy); p1=$(pg_ticks); [ -n "$SRV_PID" ] && t1=$(proc_ticks "$SRV_PID")
    cl=$(awk -v hz="$HZ" 'NF==2{t=($1+$2)*hz} END{printf "%.0f", t+0}' "$1" 2>/dev/null || echo 0)
    read -r CPU_ALL CPU_TALLY CPU_PG CPU_CLIENT CPU_OTHER CPU_STEAL < <(awk -v a="$S_C0" -v b="$c1" \
        -v pg="$((p1 - S_P0))" -v tl="$((t1 - S_T0))" -v cl="$cl" 'BEGIN{
        split(a,x," "); split(b,y," "); d=y[2]-x[2]; if (d<=0) d=1;
        o=(y[3]-x[3]) - pg - tl - cl; if (o<0) o=0;
        printf "%.0f %.0f %.0f %.0f %.0f %.0f\n", 100*(y[1]-x[1])/d, 100*tl/d, 100*pg/d, 100*cl/d, 100*o/d,
            100*(y[4]-x[4])/(d+y[4]-x[4]) }')
    if [ "$CPU_STEAL" -gt "$MAX_STEAL" ]; then MAX_STEAL=$CPU_STEAL; fi
}
MAX_STEAL=0
ratio_of() { # dist clients ops_s [ref-array name, default RAW]
    local -n refs=${4:-RAW}
    local ref=${refs[$1:$2]:-${refs[$1:$CLIENTS]:-}}
    [ -n "$ref" ] && awk -v o="$3" -v r="$ref" 'BEGIN{ if (r>0) printf "%.2f", o/r; else print "-" }' || echo "-"
}
add_row() { # label ops_s unit ratio model p50 p99 errors all tally pg client other rss_kib wal_per_op
    local rss=-; [ "${14}" != 0 ] && rss=$(mib "${14}")
    ROWS+=("$(printf '%-42s %8.0f %-5s %5s %5s %7.2f %7.2f  %-18s %4s %5s %4s %6s %5s  %6s %6s' \
        "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$9" "${10}" "${11}" "${12}" "${13}" "$rss" "${15}")")
    note "   ${ROWS[-1]}"
}
expand_n() { echo "${1//N/$CLIENTS}"; }

# ---- PostgreSQL -----------------------------------------------------------------------------
PSQL=()
pg_start() {
    free_port PGPORT 55432
    PSQL=("$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -X -q -v ON_ERROR_STOP=1)
    note "== PostgreSQL: initdb + start on 127.0.0.1:$PGPORT"
    "${RUNAS[@]}" "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync \
        >"$BASE/initdb.log" 2>&1 || { cat "$BASE/initdb.log" >&2; die "initdb failed"; }
    cat >> "$PGDATA_DIR/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$BASE'
max_connections = 200
shared_buffers = 1GB
max_wal_size = 8GB
checkpoint_timeout = 30min
# durability left at defaults: fsync=on, synchronous_commit=on, full_page_writes=on
EOF
    "${ON_DB[@]}" "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$BASE/postgres.log" -w -t 60 start >/dev/null \
        || { tail -20 "$BASE/postgres.log" >&2; die "PostgreSQL did not start"; }
    PG_SETTINGS=$("${PSQL[@]}" -d postgres -Atc "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings WHERE name IN ('fsync','synchronous_commit','full_page_writes','wal_sync_method')")
    "${PSQL[@]}" -d postgres -f "$SQLDIR/schema.sql" >/dev/null 2>&1
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE tally" >/dev/null
    # warm-up as pg-baseline.sh does: WAL segments created once, later runs recycle them
    "$PGBENCH" -h 127.0.0.1 -p "$PGPORT" -U postgres -n -M prepared -f "$SQLDIR/reserve_cte.sql" -D naccounts=10000 -D n=0 \
        -c 8 -j 2 -T 8 postgres >/dev/null 2>&1 || true
    WAL_ON=1
}
pg_stop() {
    WAL_ON=0
    "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w stop >/dev/null 2>&1 || true
}

# The database of the tally_pair cases: Tally's schema (`tally migrate`), $ACCOUNTS accounts
# "raw-1".. funded as Grant leaves them (one grant each). Dropped again before Tally runs.
model_setup() {
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE rawmodel" >/dev/null
    "$TALLY" migrate --database-url "postgres://postgres@127.0.0.1:$PGPORT/rawmodel" >/dev/null
    "${PSQL[@]}" -d rawmodel -v naccounts="$ACCOUNTS" -f "$MODEL_SQL/tally_seed.sql" >/dev/null
}
# Tally's own ledger reconciliation over the hand-written books (a server on that database
# runs it once): the raw script must keep the books Tally keeps, or its figure means nothing.
model_audit() {
    local ok="" i
    tally_start model "postgres://postgres@127.0.0.1:$PGPORT/rawmodel" --audit-interval 1s
    for i in $(seq 100); do
        ok=$(curl -s "$SRV_METRICS/metrics" | awk '/^tally_ledger_audits_total\{/ {print}')
        [ -n "$ok" ] && break
        sleep 0.1
    done
    tally_stop
    case $ok in
        *'result="ok"'*) SUMMARY+=("raw tally_pair: Tally's ledger reconciliation over its books found no violation") ;;
        *) die "the ledger reconciliation over the raw tally_pair books did not pass: ${ok:-no audit ran}" ;;
    esac
}
MODEL_RUNS=0
raw_case() { # script (pair_cte | tally_pair) dist clients
    local script=$1 dist=$2 c=$3 nacc=$ACCOUNTS rc=0
    [ "$dist" = hot ] && nacc=1
    local run=$BASE/run.raw.$script.$dist.$c
    rm -rf "$run"; mkdir -p "$run"
    [ "$(id -u)" = 0 ] && chown postgres "$run"
    local db=postgres file=$SQLDIR/pair_cte.sql vars=(-D naccounts="$nacc" -D n=0)
    if [ "$script" = tally_pair ]; then
        MODEL_RUNS=$((MODEL_RUNS + 1))   # keys and hold ids stay unique across the cases
        db=rawmodel file=$MODEL_SQL/tally_pair.sql vars+=(-D run="$MODEL_RUNS")
        # every case starts from a checkpoint, as pair_cte's (reset.sql) and Tally's do: the
        # first change of each page after one logs the whole page (full_page_writes)
        "${PSQL[@]}" -d postgres -c CHECKPOINT >/dev/null
    else
        "${PSQL[@]}" -d postgres -f "$SQLDIR/reset.sql" >/dev/null
    fi
    note "== raw pgbench $script $dist ${c}c (${DURATION}s)"
    wait_quiet
    local n0; n0=$(pg_nchildren)
    snap_begin
    ( TIMEFORMAT='%U %S'; time "${ON_APP[@]}" "$PGBENCH" -h 127.0.0.1 -p "$PGPORT" -U postgres -n -M prepared \
        -f "$file" "${vars[@]}" -c "$c" -j 2 -T "$DURATION" \
        --log --log-prefix="$run/tx" "$db" >"$run/pgbench.out" 2>&1 ) 2>"$run/cpu" &
    CHILD=$!; wait "$CHILD" || rc=$?; CHILD=""
    wait_backends_gone "$n0"
    snap_end "$run/cpu"
    local tps failed status=ok
    tps=$(awk '/^tps = /{print $3}' "$run/pgbench.out"); tps=${tps:-0}
    failed=$(awk '/number of failed transactions/{print $5}' "$run/pgbench.out"); failed=${failed:-0}
    grep -q 'Run was aborted' "$run/pgbench.out" && status=ABORTED
    [ "$rc" -ne 0 ] && [ "$status" = ok ] && status="rc=$rc"
    local errs="none"
    [ "$failed" != 0 ] && errs="failed:$failed"
    [ "$status" != ok ] && errs="$status,failed:$failed"
    local done_tx; done_tx=$(awk '/number of transactions actually processed/{print $6}' "$run/pgbench.out")
    wal_per_op "$done_tx"
    [ "$dist:$c" = "uniform:$CLIENTS" ] && wal_records "${done_tx:-0}" "raw $script uniform ${c}c" "$run"
    local p50 p90 p99 mx
    read -r p50 p90 p99 mx < <(cat "$run"/tx.* 2>/dev/null | awk '$3 ~ /^[0-9]+$/ {print $3}' | sort -n | awk '
        {v[NR]=$1} END { if (NR==0) {print "0 0 0 0"; exit}
          q[1]=0.50; q[2]=0.90; q[3]=0.99; for (k=1;k<=3;k++) { i=int((NR-1)*q[k]+0.5)+1; r[k]=v[i]/1000 }
          printf "%.3f %.3f %.3f %.3f\n", r[1], r[2], r[3], v[NR]/1000 }')
    rm -f "$run"/tx.*
    local model=-
    if [ "$script" = tally_pair ]; then MODEL[$dist:$c]=$tps; model=1.00; else RAW[$dist:$c]=$tps; fi
    local ratio; ratio=$(ratio_of "$dist" "$c" "$tps")
    printf 'raw-pgbench\t%s\t%s\t%s\t0\t-\t%.1f\tpairs\t%s\t%s\t%s\t%s\t%s\t%s\t-\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t0\t%s\n' \
        "$script" "$dist" "$c" "$tps" "$ratio" "$model" "$p50" "$p90" "$p99" "$mx" "$errs" "$CPU_ALL" "$CPU_TALLY" "$CPU_PG" "$CPU_CLIENT" "$CPU_OTHER" "$CPU_STEAL" "$WAL_OP" >> "$RESULTS"
    add_row "raw pgbench $script $dist ${c}c" "$tps" pairs "$ratio" "$model" "$p50" "$p99" "$errs" \
        "$CPU_ALL" - "$CPU_PG" "$CPU_CLIENT" "$CPU_OTHER" 0 "$WAL_OP"
}

# ---- Tally ----------------------------------------------------------------------------------
if [ "$EVENTS" = 1 ]; then
    # A receiver that answers 204 to every POST, and a catalog that sends every event to it.
    free_port RECEIVER_PORT 58500
    python3 -c '
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass
ThreadingHTTPServer.request_queue_size = 256
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
' "$RECEIVER_PORT" >/dev/null 2>&1 &
    RECEIVER_PID=$!
    "$TALLY" catalog print-default >"$BASE/catalog-events.toml"
    printf '\n[events.endpoints.bench]\nurl = "http://127.0.0.1:%s/hooks"\nsecret_env = "BENCH_EVENTS_SECRET"\n' \
        "$RECEIVER_PORT" >>"$BASE/catalog-events.toml"
    export BENCH_EVENTS_SECRET=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo=
    SERVER_FLAGS_A+=(--catalog "$BASE/catalog-events.toml" --events-allow-private)
fi
SRV_URL="" SRV_METRICS=""
tally_start() { # backend database-url [extra serve flags] -> STARTUP_MS
    local backend=$1 url=$2 p1 p2 p3 t0 code i=0
    shift 2
    free_port p1 50051; free_port p2 58080; free_port p3 59090
    SRV_URL=http://127.0.0.1:$p1 SRV_METRICS=http://127.0.0.1:$p3
    t0=$(now_ns)
    RUST_LOG=$SERVER_RUST_LOG "${ON_APP[@]}" "$TALLY" serve --database-url "$url" \
        --listen "127.0.0.1:$p1" --http-listen "127.0.0.1:$p2" --metrics-listen "127.0.0.1:$p3" \
        --rate-limit-rps 0 --admin-rate-limit-rps 0 --max-concurrent-requests 512 \
        --db-max-connections "$DB_MAX_CONNECTIONS" --log-format json "${SERVER_FLAGS_A[@]}" "$@" >>"$BASE/tally-$backend.log" 2>&1 &
    SRV_PID=$!
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$SRV_METRICS/readyz" 2>/dev/null || true)
        [ "$code" = 200 ] && break
        kill -0 "$SRV_PID" 2>/dev/null || { tail -5 "$BASE/tally-$backend.log" >&2; SRV_PID=""; die "tally serve ($backend) exited during start-up"; }
        i=$((i + 1)); [ "$i" -gt 6000 ] && die "tally serve ($backend) not ready after 60 s"
        sleep 0.01
    done
    STARTUP_MS=$(( ($(now_ns) - t0) / 1000000 ))
}
# CreditService calls the server has answered (its tally_rpc_requests_total, every code)
credit_calls() {
    { curl -s --max-time 2 "$SRV_METRICS/metrics" || true; } \
        | awk '/^tally_rpc_requests_total\{.*rpc="tally\.v1\.CreditService\// {s += $NF} END {printf "%.0f\n", s}'
}
tally_stop() { [ -n "$SRV_PID" ] && stop_pid "$SRV_PID"; SRV_PID=""; }

dist_args() { # dist -> bench args selecting the account set (one prefix per set, funded once per server)
    if [ "$1" = hot ]; then echo "--hot --prefix hot"; else echo "--accounts $ACCOUNTS --prefix uni"; fi
}
fund() { # dist -> FUND_S
    local t0 rc=0 out=$BASE/run.fund.$1
    # shellcheck disable=SC2046
    "$TALLY" bench --server "$SRV_URL" --workload check-balance --clients 1 --connections 1 --count 1 \
        --warmup 0s --duration 5s $(dist_args "$1") --json >"$out" 2>&1 &
    CHILD=$!; t0=$(now_ns); wait "$CHILD" || rc=$?; CHILD=""
    FUND_S=$(awk -v n="$(( $(now_ns) - t0 ))" 'BEGIN{printf "%.1f", n/1e9}')
    [ "$rc" = 0 ] || { cat "$out" >&2; die "funding the $1 accounts failed"; }
    [ "$EVENTS" = 1 ] && drain_events
    return 0
}
drain_events() { # EVENTS=1: wait until the funding's events are delivered (cases measure the job path)
    local i pending
    for i in $(seq 600); do
        pending=$(curl -s --max-time 2 "$SRV_METRICS/metrics" | awk '$1 == "tally_events_pending" {print $2}')
        [ "$pending" = 0 ] && { note "events: the outbox is empty"; return 0; }
        sleep 1
    done
    die "EVENTS=1: the funding's events were not delivered within 600 s"
}

tally_case() { # backend workload dist clients rate -> C_OPS C_RES_P99 C_P99 C_ERRS
    local backend=$1 w=$2 dist=$3 c=$4 rate=${5:-0} rc=0
    local tag=$backend.$w.$dist.$c; [ "$rate" != 0 ] && tag+=.rate$rate
    local run=$BASE/run.$tag
    rm -rf "$run"; mkdir -p "$run"
    local args=(bench --server "$SRV_URL" --workload "$w" --clients "$c" --connections "$CONNECTIONS"
        --duration "${DURATION}s" --warmup "${WARMUP}s" --no-setup --json)
    # shellcheck disable=SC2207
    args+=($(dist_args "$dist"))
    [ "$rate" != 0 ] && args+=(--rate "$rate")
    [ "$WATCHERS" != 0 ] && args+=(--watchers "$WATCHERS")
    [ "$backend" = postgres ] && "${PSQL[@]}" -d postgres -c CHECKPOINT >/dev/null
    local at=""; [ "$rate" != 0 ] && at=" at $rate/s"
    note "== tally/$backend $w $dist ${c}c$at (${WARMUP}s + ${DURATION}s)"
    wait_quiet
    snap_begin
    local calls0; calls0=$(credit_calls)
    if [ "$c" = "$CLIENTS" ]; then
        ( m=0; while kill -0 "$SRV_PID" 2>/dev/null; do
              r=$(rss_kib "$SRV_PID"); [ "${r:-0}" -gt "$m" ] && { m=$r; echo "$m" > "$run/rss"; }
              sleep 0.5
          done ) &
        SAMPLER_PID=$!
    fi
    ( TIMEFORMAT='%U %S'; time timeout $((DURATION + WARMUP + 60)) "${ON_APP[@]}" "$TALLY" "${args[@]}" \
        >"$run/out.json" 2>"$run/stderr" ) 2>"$run/cpu" &
    CHILD=$!; wait "$CHILD" || rc=$?; CHILD=""
    if [ -n "$SAMPLER_PID" ]; then kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=""; fi
    snap_end "$run/cpu"
    local rss=0; [ -f "$run/rss" ] && rss=$(cat "$run/rss")
    local ops_s=0 p50=0 p90=0 p99=0 mx=0 resp99=- ops=0 errs
    if [ "$rc" = 0 ] && [ -s "$run/out.json" ]; then
        IFS=$'\t' read -r ops_s p50 p90 p99 mx resp99 ops errs < <(parse_json "$run/out.json")
    else
        errs="FAILED(rc=$rc): $(head -c 60 "$run/stderr" | tr '\n\t' '  ')"
    fi
    local unit=pairs; [ "$w" = check-balance ] && unit=calls
    # the WAL of the warm-up too: the server's count of CreditService calls over the whole run
    local per_op=2; [ "$unit" = calls ] && per_op=1
    local all_ops; all_ops=$(( ($(credit_calls) - calls0) / per_op ))
    wal_per_op "$all_ops"
    [ "$w:$dist:$c:$rate" = "reserve-commit:uniform:$CLIENTS:0" ] && wal_records "$all_ops" "tally/$backend reserve-commit uniform ${c}c" "$run"
    local ratio model; ratio=$(ratio_of "$dist" "$c" "$ops_s"); model=$(ratio_of "$dist" "$c" "$ops_s" MODEL)
    [ "$unit" = calls ] && model=-   # no hand-written check-balance case
    if [ "$rate" != 0 ]; then ratio=- model=-; fi   # a paced run measures latency at a chosen load, not a capacity
    printf 'tally-%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$backend" "$w" "$dist" "$c" \
        "$rate" "$ops" "$ops_s" "$unit" "$ratio" "$model" "$p50" "$p90" "$p99" "$mx" "$resp99" "$errs" \
        "$CPU_ALL" "$CPU_TALLY" "$CPU_PG" "$CPU_CLIENT" "$CPU_OTHER" "$CPU_STEAL" "$rss" "$WAL_OP" >> "$RESULTS"
    local label="$backend $w $dist ${c}c"; [ "$rate" != 0 ] && label="$backend $w $dist ${c}c @${rate}/s"
    [ "$unit" = calls ] && ratio="$ratio*"
    local pgc=$CPU_PG; [ "$backend" = postgres ] || pgc=-
    add_row "$label" "$ops_s" "$unit" "$ratio" "$model" "$p50" "$p99" "$errs" "$CPU_ALL" "$CPU_TALLY" "$pgc" "$CPU_CLIENT" "$CPU_OTHER" "$rss" "$WAL_OP"
    if [ "$rss" -gt "${LOAD_RSS:-0}" ]; then LOAD_RSS=$rss; fi
    C_OPS=$ops_s C_RES_P99=$resp99 C_P99=$p99 C_ERRS=$errs
}

# Two replicas of `tally serve` on one database, CLIENTS/2 clients on each at once.
replicas_case() { # backend url one-replica-peak -> prints the summary line
    local backend=$1 url=$2 peak=$3 u1 p1 u2 p2 o1 o2 rc=0 half=$((CLIENTS / 2))
    local conns=$(( CONNECTIONS / 2 > 0 ? CONNECTIONS / 2 : 1 ))
    tally_start "$backend" "$url"; u1=$SRV_URL p1=$SRV_PID
    tally_start "$backend" "$url"; u2=$SRV_URL p2=$SRV_PID; SRV_PID=""
    note "== tally/$backend reserve-commit uniform on 2 replicas, ${half}c each (${WARMUP}s + ${DURATION}s)"
    wait_quiet
    o1=$BASE/run.$backend.replicas.1.json o2=$BASE/run.$backend.replicas.2.json
    local args=(bench --workload reserve-commit --clients "$half" --connections "$conns"
        --duration "${DURATION}s" --warmup "${WARMUP}s" --no-setup --json --accounts "$ACCOUNTS" --prefix uni)
    "${ON_APP[@]}" "$TALLY" "${args[@]}" --server "$u1" >"$o1" 2>&1 & local b1=$!
    "${ON_APP[@]}" "$TALLY" "${args[@]}" --server "$u2" >"$o2" 2>&1 & local b2=$!
    wait "$b1" || rc=$?; wait "$b2" || rc=$?
    stop_pid "$p1"; stop_pid "$p2"
    if [ "$rc" != 0 ]; then echo "2 replicas: FAILED (rc=$rc)"; return 0; fi
    local a b e1 e2
    IFS=$'\t' read -r a _ _ _ _ _ _ e1 < <(parse_json "$o1")
    IFS=$'\t' read -r b _ _ _ _ _ _ e2 < <(parse_json "$o2")
    echo "2 replicas on one PostgreSQL (${half} clients each, reserve-commit uniform): $(printf '%.0f + %.0f' "$a" "$b") = $(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.0f", a+b}') pairs/s = $(awk -v a="$a" -v b="$b" -v p="$peak" 'BEGIN{printf "%.2f", (a+b)/p}')x one replica's ${CLIENTS}-client peak, errors $e1 / $e2"
}

SUMMARY=()
tally_backend() { # backend url cases
    local backend=$1 url=$2 cases=$3 cs w dist c peak=""
    note "== tally serve on $backend"
    tally_start "$backend" "$url"; local cold=$STARTUP_MS
    sleep 1; local idle; idle=$(rss_kib "$SRV_PID")
    LOAD_RSS=0
    local funded=" " fundinfo=""
    for cs in $cases; do
        IFS=: read -r w dist c <<<"$(expand_n "$cs")"
        if [[ $funded != *" $dist "* ]]; then
            fund "$dist"; funded+="$dist "
            [ "$dist" = uniform ] && fundinfo="$ACCOUNTS accounts funded (Grant, 32 in flight) in ${FUND_S}s"
        fi
        tally_case "$backend" "$w" "$dist" "$c" 0
        if [ "$w:$dist:$c" = "reserve-commit:uniform:$CLIENTS" ]; then peak=$C_OPS; fi
    done
    local half=""
    if [[ " $HALF_LOAD " == *" $backend "* ]]; then
        if [ -n "$peak" ] && awk -v p="$peak" 'BEGIN{exit !(p>0)}'; then
            [[ $funded == *" uniform "* ]] || fund uniform
            local rate; rate=$(awk -v p="$peak" 'BEGIN{printf "%.0f", p/2}')
            tally_case "$backend" reserve-commit uniform "$CLIENTS" "$rate"
            half="half load (open loop, ${CLIENTS} clients paced to ${rate} pairs/s = peak/2): Reserve p99 $(printf '%.2f' "$C_RES_P99") ms, pair p99 $(printf '%.2f' "$C_P99") ms, achieved $(printf '%.0f' "$C_OPS")/s, errors $C_ERRS"
        else
            half="half load: skipped (no reserve-commit:uniform:$CLIENTS peak measured)"
        fi
    fi
    local over=""
    if [[ " $OVERLOAD " == *" $backend "* ]] && [ -n "$peak" ]; then
        [[ $funded == *" uniform "* ]] || fund uniform
        tally_case "$backend" reserve-commit uniform "$OVERLOAD_CLIENTS" 0
        local oj=$BASE/run.$backend.reserve-commit.uniform.$OVERLOAD_CLIENTS/out.json refused="-" cp99="-"
        if [ -s "$oj" ]; then
            if [ "$JSON" = jq ]; then
                read -r refused cp99 < <(tail -n 1 "$oj" | jq -r '[(.refused_per_s // 0), (.rpc_latency_ms.Commit.p99 // "-")] | @tsv')
            else
                read -r refused cp99 < <(python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print(r.get("refused_per_s",0), r.get("rpc_latency_ms",{}).get("Commit",{}).get("p99","-"))' "$oj")
            fi
        fi
        over="overload ($OVERLOAD_CLIENTS closed-loop clients, reserve-commit uniform): goodput $(printf '%.0f' "$C_OPS") pairs/s = $(awk -v a="$C_OPS" -v p="$peak" 'BEGIN{printf "%.2f", a/p}')x the ${CLIENTS}-client peak, accepted calls p99 Reserve $(printf '%.2f' "$C_RES_P99") ms / Commit $cp99 ms, refused $(printf '%.0f' "$refused")/s (waited out as RetryInfo asks), errors $C_ERRS"
    fi
    sleep 2; local after; after=$(rss_kib "$SRV_PID")
    tally_stop
    tally_start "$backend" "$url"; local warm=$STARTUP_MS
    tally_stop
    local two=""
    if [[ " $REPLICAS " == *" $backend "* ]] && [ -n "$peak" ]; then
        two=$(replicas_case "$backend" "$url" "$peak")
    fi
    # server warnings beyond the expected start-up one (no callers file: auth off on loopback)
    local lw; lw=$(grep -E '"level":"(WARN|ERROR)"' "$BASE/tally-$backend.log" | grep -v 'no callers configured' \
        | grep -o '"message":"[^"]*"' | cut -c12- | tr -d '"' | sort | uniq -c | sort -rn | head -3 \
        | awk '{n=$1; $1=""; printf "%s%dx%s", (NR>1?"; ":""), n, $0}' || true)
    SUMMARY+=("tally/$backend: start-up to SERVING (spawn -> /readyz 200) ${cold} ms on a new database (migrations), ${warm} ms on restart")
    SUMMARY+=("tally/$backend: RSS idle $(mib "$idle") MiB, ${CLIENTS}-client load max $(mib "$LOAD_RSS") MiB, idle after the runs $(mib "$after") MiB${fundinfo:+; $fundinfo}")
    [ -n "$half" ] && SUMMARY+=("tally/$backend: $half")
    [ -n "$over" ] && SUMMARY+=("tally/$backend: $over")
    [ -n "$two" ] && SUMMARY+=("tally/$backend: $two")
    [ -n "$lw" ] && SUMMARY+=("tally/$backend: server log WARN/ERROR: $lw")
    return 0
}

# ---- header ---------------------------------------------------------------------------------
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || COMMIT+=" (+ uncommitted changes)"
CPU_MODEL=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
MEM=$(awk '/^MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)
FS=$(df -PT "$BASE" | awk 'NR==2{print $2" on "$1}')
note "== scratch $BASE; results $RESULTS"

# ---- run ------------------------------------------------------------------------------------
PG_SETTINGS=""
if [ -n "$RAW_CASES$MODEL_CASES$PG_CASES" ]; then
    pg_start
    for cs in $RAW_CASES; do IFS=: read -r dist c <<<"$(expand_n "$cs")"; raw_case pair_cte "$dist" "$c"; done
    "${PSQL[@]}" -d postgres -f "$SQLDIR/reset.sql" >/dev/null
    if [ -n "$MODEL_CASES" ]; then
        model_setup
        for cs in $MODEL_CASES; do IFS=: read -r dist c <<<"$(expand_n "$cs")"; raw_case tally_pair "$dist" "$c"; done
        model_audit
        "${PSQL[@]}" -d postgres -c "DROP DATABASE rawmodel" >/dev/null
    fi
    if [ -n "$PG_CASES" ]; then tally_backend postgres "postgres://postgres@127.0.0.1:$PGPORT/tally" "$PG_CASES"; fi
    pg_stop   # before SQLite: no autovacuum beside it
fi
if [ -n "$SQLITE_CASES" ]; then tally_backend sqlite "sqlite://$BASE/bench.db" "$SQLITE_CASES"; fi

# ---- report ---------------------------------------------------------------------------------
echo "Tally bench $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, $BIN_INFO"
echo "machine: $(nproc) CPUs ($CPU_MODEL), $MEM RAM, Linux $(uname -r), scratch on $FS"
echo "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') ${PG_SETTINGS:+($PG_SETTINGS, shared_buffers=1GB)}; SQLite: WAL, synchronous=FULL"
echo "each case: ${DURATION}s measured; tally bench: +${WARMUP}s warm-up, clients over $CONNECTIONS HTTP/2 connections, closed loop"
echo "  unless @rate; pgbench -M prepared -j 2, no warm-up; uniform = $ACCOUNTS accounts, hot = 1 account"
echo "tally serve: --db-max-connections $DB_MAX_CONNECTIONS${SERVER_FLAGS:+ $SERVER_FLAGS}, rate limits off, RUST_LOG=$SERVER_RUST_LOG (per-request info logs off: they cost throughput)"
if [ "$EVENTS" = 1 ]; then echo "EVENTS=1: every server had an outbound-events endpoint (a local receiver answering 204)"; fi
if [ "$PIN" = 1 ]; then echo "pinned (PIN=1): PostgreSQL on CPU 0; tally serve, tally bench and pgbench's client on CPU 1"; fi
echo
printf '%-42s %8s %-5s %5s %5s %7s %7s  %-18s %4s %5s %4s %6s %5s  %6s %6s\n' case ops/s unit ratio model p50ms p99ms errors cpu% tally pg client other RSSMiB WAL/op
for r in "${ROWS[@]}"; do echo "$r"; done
echo
echo "ratio = ops/s / raw pgbench pair_cte ops/s of the same distribution (same client count when measured)"
echo "model = ops/s / raw pgbench tally_pair ops/s likewise: Tally's own writes of the pair, by hand (scripts/pgbench)"
echo "  * check-balance is calls/s of one read RPC against raw pairs/s of two write transactions: for scale only"
echo "cpu% = share of all $(nproc) cores during the case: total, tally server, PostgreSQL, load generator, other"
echo "  (of the CPU time the VM got: the most any case lost to hypervisor steal was ${MAX_STEAL}%)"
echo "WAL/op = bytes of PostgreSQL write-ahead log per operation (pair or call), each case from a fresh checkpoint"
echo "  (so with its full-page images); Tally's cases count their warm-up's operations too (the server's call count)"
for s in "${SUMMARY[@]}"; do echo "$s"; done
[ "$QUIET_MISSES" -gt 0 ] && echo "WARNING: $QUIET_MISSES case(s) started on a busy machine (see the 'other' column)"
echo "total run time $((SECONDS - T_START)) s; results: $RESULTS"
