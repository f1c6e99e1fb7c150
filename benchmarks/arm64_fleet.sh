#!/usr/bin/env bash
# arm64_fleet.sh - an onnx-neq fleet (Flower deployment engine) with one SuperNode on the emulated aarch64 board.
#
# What it does
#   Runs `onnx-neq fleet app`'s Flower app for real, as separate processes on this machine:
#     * a SuperLink and two SuperNodes (partitions 0 and 1 of 3) on the host (x86_64), each a process group;
#     * a third SuperNode (partition 2) on the board of benchmarks/arm64_board.sh: flwr's `flower-supernode`
#       run by the board's python3.11 under qemu-aarch64, with its own node config
#           partition-id=2 num-partitions=3 data="npz:WORK/digits.npz" artifacts="WORK/artifacts" backend="portable"
#       (the board has no scikit-learn: digits is exported to an .npz on the host, the same split and order).
#   The board's SuperNode starts its SuperExec and each round's ClientApp as subprocesses by name
#   (`flower-superexec`, `flwr-clientapp`); the board cannot exec aarch64 programs (no binfmt_misc), so those
#   names resolve, on that SuperNode's PATH only, to host shell wrappers in WORK/boardbin/ that start the same
#   entry points (flwr.supercore.cli:flower_superexec, flwr.supernode.cli:flwr_clientapp) on the board again
#   (`arm64_board.sh python -c ...`). Every flwr process of the board node, and each of its ClientApps, is aarch64.
#   The board's site is arm64_board.sh's default wheels plus flwr==(the host's flwr version) and its dependencies
#   (no ray), i.e. ONNX_NEQ_BOARD_EXTRA_WHEELS+=" flwr==X"; `setup` builds it.
#   Then `flwr run` runs the fleet for --rounds 2 (--round-timeout generous: emulation is 20-50x slower), and the
#   script checks OUT/rounds.csv: in each round, updates (note column empty) from all three clients 0, 1 and 2;
#   the board's ClientApp ran once per round and exited 0; `onnx-neq eval OUT/model.onnx --data digits
#   --classes 0-4` scores the global model and agrees with round 2's global_top1 (1e-4).
#   Every process it started (their process groups and descendants, collected before any is stopped; the
#   SuperLink detaches its SuperExec into a session of its own) is stopped on exit, PASS, FAIL or interrupt.
#
# Usage
#   benchmarks/arm64_fleet.sh setup            the board (arm64_board.sh setup) with flwr in its site
#   benchmarks/arm64_fleet.sh [run] [OPTIONS...]
#                                              the fleet: prepares the shipped MobileNetV2 with a 5-class head
#                                              on the host, exports digits to an .npz, writes the app with
#                                              `onnx-neq fleet app WORK/app --artifacts WORK/artifacts --data digits
#                                              --classes 0-4 --clients 3 --rounds 2 --round-timeout 1800
#                                              --train-limit 64 --batch-size 16 --threads 1 --superlink
#                                              127.0.0.1:PORT OPTIONS...` (OPTIONS: more `fleet app` options,
#                                              e.g. --budget-ratio 0.3; they come last, so they override),
#                                              starts SuperLink, board SuperNode, host SuperNodes, `flwr run`, waits
#                                              for both rounds, checks (see above); prints rounds.csv, the board's
#                                              platform.machine(), wall times and PASS/FAIL (exit status 0/1)
#
# Time (measured on the 2-core x86_64 bookworm VM while the fleet benchmark ran beside it, load average ~7):
#   setup ~55 s the first time (board userland, site with flwr); a run ~12 min: the board SuperNode connects
#   after ~24 s, each round ~5.5 min, nearly all of it the board's ClientApp (~4.8-5.5 min under qemu, of which
#   python's start-up and flwr's imports are ~1 min).
#
# Environment
#   PYTHON                     host python with flwr and onnx-neq installed, whose bin/ holds flower-superlink,
#                              flower-supernode, flwr, onnx-neq (default: python3; e.g. `source /tmp/flvenv/bin/activate`)
#   ONNX_NEQ_FLEET_DIR         work directory (artifacts/, digits.npz, app/, out/, logs), kept; default: a fresh
#                              $BOARD_DIR/fleet.XXXXXX (see arm64_board.sh), removed after a PASS
#   ONNX_NEQ_FLEET_ROUND_TIMEOUT  --round-timeout (default 1800 seconds)
#   ONNX_NEQ_FLEET_BOARD_BACKEND  the board node's backend in its node config (default portable; specialized
#                              needs only stock onnxruntime too)
#   ONNX_NEQ_FLEET_STARTUP_GRACE  seconds the board's SuperNode gives a ClientApp to start (default 300; Flower's 30 s
#                              is shorter than python's start-up under qemu)
#   ONNX_NEQ_FLEET_CONNECT_TIMEOUT seconds the board SuperNode may take to connect to the SuperLink (default 600)
#   ONNX_NEQ_BOARD_*           as for arm64_board.sh (cache directory, mirror, wheels); flwr is appended to
#                              ONNX_NEQ_BOARD_EXTRA_WHEELS
#
# Measured (2026-12-05, flwr 1.42.0, qemu-aarch64 10.0.2, `benchmarks/arm64_fleet.sh run`): PASS
#   round 1: updates from clients 0, 1 and 2 (the board), 30.8% budget, ~138,100 parameters each, global top-1 0.4889
#   round 2: the same, global top-1 0.4578; `onnx-neq eval OUT/model.onnx` 0.4578; the board's 2 ClientApps exited 0
#   (288.7 s, 328.9 s); platform.machine() on the board: aarch64. Two runs gave the same rounds.csv.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
BOARD="$SCRIPT_DIR/arm64_board.sh"
BOARD_DIR="${ONNX_NEQ_BOARD_DIR:-${HOME:-/root}/.cache/onnx-neq/arm64-board}"
PYTHON="${PYTHON:-python3}"
ROUND_TIMEOUT="${ONNX_NEQ_FLEET_ROUND_TIMEOUT:-1800}"
BOARD_BACKEND="${ONNX_NEQ_FLEET_BOARD_BACKEND:-portable}"
CONNECT_TIMEOUT="${ONNX_NEQ_FLEET_CONNECT_TIMEOUT:-600}"
CLIENTS=3
ROUNDS=2
CLASSES=0-4
NUM_CLASSES=5
MODEL="$REPO_ROOT/onnx_neq/models/mobilenet_v2_035_fmnist04.onnx"
RECIPE=(--data digits --classes "$CLASSES" --train-limit 64 --batch-size 16 --threads 1)

T0=$SECONDS
log() { printf '[arm64-fleet %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { printf 'arm64_fleet.sh: error: %s\n' "$*" >&2; exit 2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }  # elapsed START

# The host's flwr tools: PYTHON's bin/ (a venv's), put first on PATH (the SuperLink starts flower-superexec by name).
FLBIN=""
host_tools() {
    local exe
    exe=$("$PYTHON" -c 'import sys; print(sys.executable)' 2>/dev/null) || die "PYTHON=$PYTHON does not run"
    FLBIN=$(dirname "$exe")
    local t
    for t in flower-superlink flower-supernode flower-superexec flwr onnx-neq; do
        [[ -x $FLBIN/$t ]] || die "$FLBIN/$t not found: set PYTHON to a python with flwr and onnx-neq (e.g. source /tmp/flvenv/bin/activate)"
    done
    FLWR_VERSION=$("$PYTHON" -c 'from importlib.metadata import version; print(version("flwr"))') \
        || die "flwr is not installed for $PYTHON"
    export PATH="$FLBIN:$PATH"
    # The board's site: arm64_board.sh's wheels plus the host's flwr (the same version on every node).
    export ONNX_NEQ_BOARD_EXTRA_WHEELS="${ONNX_NEQ_BOARD_EXTRA_WHEELS:+$ONNX_NEQ_BOARD_EXTRA_WHEELS }flwr==$FLWR_VERSION"
    export PYTHON
    # No network calls from flwr (telemetry, update checks): the board would wait on them under emulation.
    export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
}

cmd_setup() {
    host_tools
    log "board setup with flwr==$FLWR_VERSION in its site (arm64_board.sh setup)"
    "$BOARD" setup
}

# processes ------------------------------------------------------------------------------------------------
PIDS=()        # what this script started, each the leader of its own process group (setsid)
WORK=""
KEEP=1
RESULT=1

descendants() {  # descendants PID... : the PIDs and all their descendants (one per line)
    ps -e -o pid=,ppid= | awk -v roots="$*" '
        { parent[$1] = $2; pids[NR] = $1 }
        END {
            n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1
            do { more = 0; for (j in pids) { p = pids[j]; if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; more = 1 } } } while (more)
            for (p in keep) print p
        }'
}

stop_all() {
    [[ ${#PIDS[@]} -gt 0 ]] || return 0
    local tree pid groups=() left i
    # Collect the whole tree first: the SuperLink's SuperExec is in a session of its own and would be orphaned.
    tree=$(descendants "${PIDS[@]}" | sort -n | tr '\n' ' ')
    for pid in $tree; do groups+=("$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')"); done
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in $tree; do kill -TERM "$pid" 2>/dev/null || true; done
    for i in $(seq 1 40); do
        left=""
        for pid in $tree; do kill -0 "$pid" 2>/dev/null && left+=" $pid"; done
        [[ -z $left ]] && break
        sleep 0.5
    done
    if [[ -n $left ]]; then
        log "still running after 20 s, killing:$left"
        for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
        for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    PIDS=()
}

on_exit() {
    local rc=$?
    stop_all
    if [[ -n $WORK ]]; then
        if [[ $RESULT -eq 0 && $KEEP -eq 0 ]]; then rm -rf "$WORK"; else echo "kept: $WORK" >&2; fi
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

start() {  # start LOG CMD... : a process in its own session (and process group); appends its pid to PIDS
    local logf=$1
    shift
    setsid "$@" >"$logf" 2>&1 </dev/null &
    PIDS+=("$!")
}

alive() { kill -0 "$1" 2>/dev/null; }

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_port() {  # wait_port PORT SECONDS PID : until 127.0.0.1:PORT accepts, or the process died / time ran out
    local port=$1 limit=$2 pid=$3 start=$SECONDS
    while ((SECONDS - start < limit)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        alive "$pid" || return 1
        sleep 0.5
    done
    return 1
}

count() { grep -c "$1" "$WORK/board-exec.log" 2>/dev/null || true; }  # count PATTERN: lines of board-exec.log

round_done() {  # the last completed round in OUT/state.json (-1: none yet)
    "$PYTHON" -c 'import json, sys
try: print(json.load(open(sys.argv[1]))["round"])
except Exception: print(-1)' "$1/state.json"
}

# A SuperNode gives a ClientApp it starts HEARTBEAT_DEFAULT_INTERVAL (30 s) to claim its task before the token
# expires and the SuperExec starts another; under qemu, python and flwr's imports alone take longer than that, so
# the board's SuperNode (only it) allows STARTUP_GRACE seconds. A real aarch64 board starts a ClientApp in seconds.
STARTUP_GRACE="${ONNX_NEQ_FLEET_STARTUP_GRACE:-300}"
SLOW_START="import flwr.supercore.corestate.in_memory_corestate as m1, flwr.supercore.corestate.sql_corestate as m2
m1.HEARTBEAT_DEFAULT_INTERVAL = m2.HEARTBEAT_DEFAULT_INTERVAL = $STARTUP_GRACE
print(\"[board] task start-up grace\", m1.HEARTBEAT_DEFAULT_INTERVAL, \"s\", flush=True)"

# The board's wrappers: flwr starts these by name; they start the same entry point on the board.
write_wrapper() {  # write_wrapper NAME MODULE FUNCTION [PYTHON]: PYTHON runs first, in the same process
    local name=$1 module=$2 func=$3 pre=${4:-} f="$WORK/boardbin/$1"
    cat >"$f" <<EOF
#!/usr/bin/env bash
# Written by arm64_fleet.sh: flwr's \`$name\` on the emulated aarch64 board ($module:$func).
echo "[board-exec \$(date +%s.%N)] start $name pid \$\$: \$*" >>"$WORK/board-exec.log"
rc=0
ONNX_NEQ_BOARD_EXTRA_WHEELS="$ONNX_NEQ_BOARD_EXTRA_WHEELS" "$BOARD" python -c '
import platform, sys, time
t = time.time()
print("[board] $name on", platform.machine(), "python", platform.python_version(), flush=True)
sys.argv[0] = "$name"
$pre
from $module import $func
try:
    $func()
finally:
    print("[board] $name done after %.1f s" % (time.time() - t), flush=True)
' "\$@" || rc=\$?
echo "[board-exec \$(date +%s.%N)] end $name pid \$\$ rc \$rc" >>"$WORK/board-exec.log"
exit \$rc
EOF
    chmod +x "$f"
}

cmd_run() {
    host_tools
    local t_all
    t_all=$(now)
    if [[ -n ${ONNX_NEQ_FLEET_DIR:-} ]]; then
        mkdir -p "$ONNX_NEQ_FLEET_DIR"
        WORK=$(cd "$ONNX_NEQ_FLEET_DIR" && pwd)
        rm -rf "$WORK"/{artifacts,app,out,boardbin,flwr-board,flwr-host} "$WORK"/*.log "$WORK"/digits.npz "$WORK"/link.db
    else
        mkdir -p "$BOARD_DIR"
        WORK=$(mktemp -d "$BOARD_DIR/fleet.XXXXXX")
        KEEP=0
    fi
    [[ -e $BOARD_DIR/rootfs$WORK ]] && die "$WORK also exists under the board's rootfs; pick another ONNX_NEQ_FLEET_DIR"
    log "work directory: $WORK"
    echo "host: $(uname -m), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start; flwr $FLWR_VERSION ($FLBIN)"

    local s t_setup t_prep
    s=$(now)
    log "board setup (flwr==$FLWR_VERSION in the site)"
    "$BOARD" setup
    t_setup=$(elapsed "$s")

    # artifacts, data, app ---------------------------------------------------------------------------------
    s=$(now)
    log "host: onnx-neq prepare ${MODEL#"$REPO_ROOT"/} --num-classes $NUM_CLASSES -o $WORK/artifacts"
    "$FLBIN/onnx-neq" prepare "$MODEL" --num-classes "$NUM_CLASSES" -o "$WORK/artifacts" >"$WORK/prepare.log" 2>&1 \
        || { cat "$WORK/prepare.log" >&2; die "prepare failed (log: $WORK/prepare.log)"; }
    log "host: digits -> $WORK/digits.npz (150 test images)"
    (cd "$REPO_ROOT" && "$PYTHON" "$SCRIPT_DIR/arm64_board_train.py" data "$WORK/digits.npz" 150) >&2
    local port
    port=$(free_port)
    local app_args=("$WORK/app" --artifacts "$WORK/artifacts" "${RECIPE[@]}" --clients "$CLIENTS" --rounds "$ROUNDS"
        --round-timeout "$ROUND_TIMEOUT" --out "$WORK/out" --superlink "127.0.0.1:$port" "$@")
    log "host: onnx-neq fleet app ${app_args[*]}"
    "$FLBIN/onnx-neq" fleet app "${app_args[@]}" >"$WORK/fleet-app.log" 2>&1 \
        || { cat "$WORK/fleet-app.log" >&2; die "onnx-neq fleet app failed"; }
    sed 's/^/  | /' "$WORK/fleet-app.log"
    t_prep=$(elapsed "$s")
    mkdir -p "$WORK/boardbin" "$WORK/flwr-board"
    write_wrapper flower-supernode flwr.supernode.cli flower_supernode "$SLOW_START"
    write_wrapper flower-superexec flwr.supercore.cli flower_superexec
    write_wrapper flwr-clientapp flwr.supernode.cli flwr_clientapp

    # processes --------------------------------------------------------------------------------------------
    local host_env=(env FLWR_HOME="$WORK/app/.flwr")
    log "SuperLink on 127.0.0.1:$port"
    s=$(now)
    start "$WORK/link.log" "${host_env[@]}" "$FLBIN/flower-superlink" --insecure --disable-runtime-dependency-installation \
        --port "$port" --database "$WORK/link.db"
    local link_pid=${PIDS[-1]}
    wait_port "$port" 120 "$link_pid" || { tail -n 30 "$WORK/link.log" >&2; die "the SuperLink did not come up"; }
    local t_link
    t_link=$(elapsed "$s")

    local board_port board_config board_pid t_board_node
    board_port=$(free_port)
    board_config="partition-id=2 num-partitions=$CLIENTS data=\"npz:$WORK/digits.npz\" artifacts=\"$WORK/artifacts\" backend=\"$BOARD_BACKEND\""
    log "board: flower-supernode --insecure --superlink 127.0.0.1:$port --port $board_port --node-config '$board_config' (under qemu)"
    s=$(now)
    # Only this SuperNode sees WORK/boardbin first on its PATH; its FAB installs go to WORK/flwr-board.
    start "$WORK/node2-board.log" env PATH="$WORK/boardbin:$PATH" FLWR_HOME="$WORK/flwr-board" \
        "$WORK/boardbin/flower-supernode" --insecure --superlink "127.0.0.1:$port" --port "$board_port" --node-config "$board_config"
    board_pid=${PIDS[-1]}

    local i node_port
    for i in 0 1; do
        node_port=$(free_port)
        log "host: flower-supernode --insecure --superlink 127.0.0.1:$port --port $node_port --node-config 'partition-id=$i num-partitions=$CLIENTS'"
        start "$WORK/node$i.log" "${host_env[@]}" "$FLBIN/flower-supernode" --insecure --superlink "127.0.0.1:$port" \
            --port "$node_port" --node-config "partition-id=$i num-partitions=$CLIENTS"
    done

    log "waiting for the board SuperNode to connect (up to $CONNECT_TIMEOUT s)"
    while ! grep -q "SuperNode ID" "$WORK/node2-board.log" 2>/dev/null; do
        alive "$board_pid" || { tail -n 40 "$WORK/node2-board.log" >&2; fail_now "the board SuperNode exited"; return 1; }
        if (( $(awk -v a="$s" -v b="$(now)" 'BEGIN { print int(b - a) }') > CONNECT_TIMEOUT )); then
            tail -n 40 "$WORK/node2-board.log" >&2
            fail_now "the board SuperNode did not connect within $CONNECT_TIMEOUT s"
            return 1
        fi
        sleep 1
    done
    t_board_node=$(elapsed "$s")
    log "board SuperNode connected after ${t_board_node} s: $(grep -m1 '\[board\] flower-supernode on' "$WORK/node2-board.log" || true)"

    # the run ----------------------------------------------------------------------------------------------
    log "FLWR_HOME=$WORK/app/.flwr flwr run $WORK/app local"
    s=$(now)
    (cd "$WORK" && "${host_env[@]}" "$FLBIN/flwr" run "$WORK/app" local) >"$WORK/flwr-run.log" 2>&1 \
        || { cat "$WORK/flwr-run.log" >&2; fail_now "flwr run failed"; return 1; }
    local deadline=$((SECONDS + ROUNDS * ${ROUND_TIMEOUT%.*} + 600)) finished=-1 last=-1 t_round=() r_start
    r_start=$(now)
    while ((finished < ROUNDS)); do
        finished=$(round_done "$WORK/out")
        if ((finished > last)); then
            if ((finished >= 1)); then
                t_round[$finished]=$(elapsed "$r_start")
                r_start=$(now)
                log "round $finished done (${t_round[$finished]} s)"
            fi
            last=$finished
            continue
        fi
        alive "$link_pid" || { tail -n 40 "$WORK/link.log" >&2; fail_now "the SuperLink exited"; return 1; }
        ((SECONDS < deadline)) || { tail -n 40 "$WORK/link.log" >&2; fail_now "the run did not finish in time"; return 1; }
        sleep 2
    done
    local t_run t_board_first
    t_run=$(elapsed "$s")
    local machine
    machine=$(sed -nE 's/.*\[board\] flower-supernode on ([^ ]+) .*/\1/p' "$WORK/node2-board.log" | head -n1)
    # The server has the board's last reply before that ClientApp has exited (python's teardown under qemu).
    local w=$SECONDS
    while (($(count "end flwr-clientapp") < $(count "start flwr-clientapp") && SECONDS - w < 300)); do sleep 2; done
    log "both rounds done; stopping the SuperLink and SuperNodes"
    stop_all

    # checks -----------------------------------------------------------------------------------------------
    local s_eval t_eval top1 rc=0
    s_eval=$(now)
    "$FLBIN/onnx-neq" eval "$WORK/out/model.onnx" --data digits --classes "$CLASSES" >"$WORK/eval.log" 2>&1 || rc=$?
    t_eval=$(elapsed "$s_eval")
    cat "$WORK/eval.log"
    top1=$(sed -nE 's/.*top-1 ([0-9.]+).*/\1/p' "$WORK/eval.log" | head -n1)
    echo "==== the board's ClientApp runs (WORK/board-exec.log and node2-board.log)"
    grep -E '^\[board\] (flwr-clientapp|flower-superexec|flower-supernode)' "$WORK/node2-board.log" || true
    "$PYTHON" - "$WORK" "$ROUNDS" "$CLIENTS" "${top1:-nan}" "$rc" <<'EOF' || rc=1
import csv, math, re, sys
work, rounds, clients, top1, eval_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
rows = list(csv.DictReader(open(f"{work}/out/rounds.csv", newline="")))
print("==== OUT/rounds.csv (some columns)")
cols = ("round", "client", "examples", "updated_params", "bytes_received", "local_top1", "global_top1", "note")
print(" ".join(f"{c:>14}" for c in cols))
for row in rows:
    print(" ".join(f"{row[c]:>14}" for c in cols))
print("==== checks")
ok = True
for r in range(1, rounds + 1):
    merged = sorted(row["client"] for row in rows if row["round"] == str(r) and not row["note"])
    notes = [(row["client"], row["note"]) for row in rows if row["round"] == str(r) and row["note"]]
    good = merged == [str(c) for c in range(clients)]
    ok &= good
    print(f"round {r}: updates from clients {merged}{' (notes: %s)' % notes if notes else ''}: {'ok' if good else 'MISSING'}")
log = open(f"{work}/board-exec.log").read()
apps = re.findall(r"end flwr-clientapp pid \d+ rc (\d+)", log)
good = len(apps) == rounds and all(rc == "0" for rc in apps)
ok &= good
print(f"board ClientApp runs: {len(apps)} (exit statuses {apps}): {'ok' if good else 'UNEXPECTED'}")
last = [row for row in rows if row["round"] == str(rounds)]
want = float(last[0]["global_top1"]) if last else math.nan
good = eval_rc == 0 and abs(top1 - want) <= 1e-4
ok &= good
print(f"onnx-neq eval: top-1 {top1:.4f} (exit status {eval_rc}); round {rounds}'s global_top1 {want:.4f}: {'ok' if good else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
EOF
    echo "==== summary"
    echo "board: platform.machine() = ${machine:-?} (flwr $FLWR_VERSION under $(qemu-aarch64-static --version 2>/dev/null | head -n1 || echo qemu))"
    echo "board ClientApp wall times (start to exit, incl. python start-up and imports under qemu):"
    awk '/start flwr-clientapp/ { sub(/\]/, "", $2); sub(/:/, "", $6); s[$6] = $2 }
         /end flwr-clientapp/ { sub(/\]/, "", $2); printf "  pid %s: %.1f s (exit status %s)\n", $6, $2 - s[$6], $8 }' \
        "$WORK/board-exec.log" || true
    printf 'wall times (s): setup %s, prepare+digits+app %s, SuperLink up %s, board SuperNode connected %s,\n' \
        "$t_setup" "$t_prep" "$t_link" "$t_board_node"
    printf '  rounds: %s (flwr run to state.json round 1, then to round 2), run %s, eval %s, all %s\n' \
        "$(for r in $(seq 1 "$ROUNDS"); do printf '%s ' "${t_round[$r]:-?}"; done | sed 's/ $//')" "$t_run" "$t_eval" "$(elapsed "$t_all")"
    echo "host load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    RESULT=$rc
    echo "$([[ $rc -eq 0 ]] && echo PASS || echo FAIL)"
    return "$rc"
}

fail_now() {  # fail_now MESSAGE : report a run that could not finish (the EXIT trap stops the processes)
    echo "==== logs: $WORK (link.log, node0.log, node1.log, node2-board.log, board-exec.log, flwr-run.log)"
    echo "FAIL: $*"
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed -n '/^# Usage/,/^# Time/p' | sed '$d; s/^# \{0,1\}//' >&2; }

main() {
    local cmd="${1:-run}"
    case "$cmd" in
        setup) cmd_setup ;;
        run)
            if [[ $# -gt 0 ]]; then shift; fi
            cmd_run "$@"
            ;;
        -h | --help | help) usage ;;
        -*) cmd_run "$@" ;;
        *) usage; die "unknown subcommand '$cmd' (setup | run [OPTIONS...])" ;;
    esac
}

main "$@"
