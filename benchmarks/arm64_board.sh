#!/usr/bin/env bash
# arm64_board.sh - an emulated aarch64 Linux "edge board" for onnx-neq.
#
# What it does
#   Builds, on a Debian bookworm x86_64 host, a user-mode emulated aarch64 board:
#     * qemu-user-static from bookworm-backports (QEMU 10; bookworm's own QEMU 7.2
#       segfaults while importing onnxruntime), installed with apt;
#     * a Debian bookworm arm64 userland (python3.11 and its libs), made with
#       `debootstrap --foreign --variant=minbase --include=python3` whose downloaded
#       .debs are then unpacked into the tree (the foreign second stage is not run);
#     * a "site" directory of aarch64 wheels (stock onnxruntime, numpy, click, onnx, onnx-ir
#       and their dependencies; no onnxruntime-training), installed with the host's pip for
#       --platform manylinux_2_28_aarch64 --python-version 3.11;
#   and runs the arm64 python3.11 under qemu-aarch64 with the site and this
#   repository's root on PYTHONPATH (working directory preserved).
#
# Usage
#   benchmarks/arm64_board.sh setup            build (or check) qemu, userland, site
#   benchmarks/arm64_board.sh python ARGS...   run the board's python3.11 with ARGS, e.g.
#       benchmarks/arm64_board.sh python -m onnx_neq.cli train --backend portable ...
#   benchmarks/arm64_board.sh check            smoke test: platform.machine() must be aarch64;
#                                              a Conv+ConvTranspose+MatMul model built on the host
#                                              is run by the board's onnxruntime and the host's
#                                              onnxruntime; outputs must agree to 1e-5 (relative);
#                                              prints PASS/FAIL (exit status 0/1)
#   benchmarks/arm64_board.sh train [OPTIONS...]
#                                              the portable training backend on host and board:
#                                              prepares the shipped MobileNetV2 (10-class head) on the
#                                              host, exports digits to an .npz (the board has no
#                                              scikit-learn), runs the same tiny
#                                              `python -m onnx_neq.cli train ART --backend portable
#                                              --data npz:FILE --epochs 2 --train-limit 128 --batch-size 16
#                                              --warmup-epochs 1 --threads 1 OPTIONS...` on the host and on
#                                              the board, and compares per-epoch train_loss (relative
#                                              difference <= 1e-4) and train/val/test top-1 (equal); prints
#                                              a side-by-side table, versions, wall times and PASS/FAIL
#                                              (exit status 0/1); OPTIONS (e.g. --epochs 3) override those
#   benchmarks/arm64_board.sh prepare-train [OPTIONS...]
#                                              prepare AND train on the board (stock onnxruntime, no
#                                              onnxruntime-training: onnx-neq's own gradient builder) and the
#                                              same on the host: `python -m onnx_neq.cli prepare MODEL
#                                              --num-classes 10 -o ART` of the shipped MobileNetV2 on each
#                                              side, then `train ART --backend portable --data npz:FILE
#                                              --epochs 1 --train-limit 64 --batch-size 16 --warmup-epochs 1
#                                              --threads 1 OPTIONS...` on each side's own artifacts; both
#                                              import one snapshot of onnx_neq/ (taken at the start, so edits
#                                              during the run do not split host and board); compares the
#                                              artifacts (portable_training_model.onnx and eval_model.onnx
#                                              byte-identical, eval_model's input order aside, which the
#                                              host's onnxruntime-training sets; else the same graph;
#                                              parameters.npz arrays and manifest.json equal) and the
#                                              training as `train` does; prints tables, versions, wall times
#                                              and PASS/FAIL (exit status 0/1)
#   benchmarks/arm64_board.sh info             print paths and versions
#
# Cache
#   Everything lives under ${ONNX_NEQ_BOARD_DIR:-$HOME/.cache/onnx-neq/arm64-board}:
#     rootfs/   the arm64 userland      (marker rootfs/.onnx-neq-userland-done)
#     site/     the aarch64 wheels      (marker site/.onnx-neq-site-<hash of the wheel list>;
#               a non-default wheel list gets its own site-<hash>/)
#   Re-running skips finished steps; delete a directory (or its marker) to rebuild it.
#   Building needs root (apt-get, debootstrap); running an already built board does not.
#
# Time (measured on a 2-core x86_64 bookworm VM, deb.debian.org and PyPI reachable):
#   first `setup`: ~55 s (apt update + qemu 10 s, debootstrap 21 s, unpacking 110 .debs 3 s,
#   wheels 18 s; ~225 MB userland + ~294 MB site, sympy the largest); a later `setup`: <0.1 s;
#   `check`: ~10 s (mostly importing onnxruntime under emulation); `train`: ~3 min
#   (host: prepare 5-7 s, digits 2 s, training 4-5 s; board: the same training 150-205 s: imports
#   ~10 s, 4+2 session creations ~35 s, two epochs ~95-110 s, exporting model.onnx ~45 s of which
#   importing onnx_ir (sympy) ~20 s), 166-219 s in all over three runs. Emulation cost, measured:
#   a pure-python loop ~16x and float32 numpy matmul ~50x slower than natively;
#   `import onnx_neq.training.train` (with onnx + onnx-ir in the site) ~12 s.
#   `prepare-train` (measured with the host busy, load average ~5 on its 2 cores; an idle host is
#   faster): ~5.5-7.5 min in all; host prepare 10.8-13.0 s, host train 8.0-9.9 s; board prepare
#   104-127 s (in-process 97-120 s), board train 204-289 s (in-process 198-279 s: 1 epoch of 64
#   images 45-71 s, the rest imports, session creations, evaluation and exporting model.onnx).
#   With onnx 1.23.2 in the site, the board's `train` passed as before (309 s, host load ~5).
#
# Notes
#   * qemu -L: the guest sees the host's filesystem, except that a path which exists under
#     rootfs/ (e.g. /etc/..., /usr/...) is the board's. rootfs/tmp, /root, /home are empty, so
#     the host's files there (and the current directory) are visible as usual.
#   * No binfmt_misc registration is assumed: the guest cannot exec aarch64 programs
#     (subprocess.run([sys.executable, ...]) from the board fails); run python in-process.
#   * The board's onnxruntime prints "cpuid_info warning: Unknown CPU vendor" once; harmless.
#
# Environment
#   ONNX_NEQ_BOARD_DIR           cache directory (see above)
#   ONNX_NEQ_BOARD_MIRROR        Debian mirror for debootstrap/backports
#                                (default: the deb.debian.org-style mirror in /etc/apt/sources.list*)
#   ONNX_NEQ_BOARD_WHEELS        wheels for the site (default: "onnxruntime numpy click onnx==1.23.2
#                                onnx-ir==1.1.0"; onnx and onnx-ir are what onnx_neq's prepare and training
#                                paths import besides the others; they bring protobuf, ml_dtypes, sympy, ...;
#                                onnx is the current release, as `pip install onnx-neq` (onnx>=1.17) gets on
#                                a board; onnx==1.17.0, the reference environment's, passes `prepare-train`
#                                too, with byte-identical artifacts)
#   ONNX_NEQ_BOARD_EXTRA_WHEELS  more wheels appended to that list (e.g. "scipy")
#   ONNX_NEQ_BOARD_TRAIN_DIR     `train`'s work directory (artifacts, digits.npz, hostrun/, boardrun/),
#                                kept; default: a fresh $BOARD_DIR/train.XXXXXX, removed after a PASS
#   ONNX_NEQ_BOARD_PREPARE_DIR   `prepare-train`'s work directory (src/ snapshot, hostart/, boardart/,
#                                digits.npz, hostrun/, boardrun/, logs), kept; default: a fresh
#                                $BOARD_DIR/prepare.XXXXXX, removed after a PASS
#   ONNX_NEQ_BOARD_TEST_IMAGES   test images `train`/`prepare-train` keep of digits' 450 (default 150; 0: all)
#   ONNX_NEQ_BOARD_TRAIN_RTOL    `train`'s/`prepare-train`'s train-loss tolerance, relative (default 1e-4)
#   ONNX_NEQ_BOARD_TOP1_ATOL     `train`'s/`prepare-train`'s top-1 tolerance, absolute (default 0: equal)
#   PYTHON                       host python with pip, onnx, onnxruntime(-training), scikit-learn
#                                (default: python3)
#
# Adding a subcommand: call ensure_board (or the ensure_* steps) and then
# `board_python ARGS...` (runs in the current directory) next to host-side `"$PYTHON" ...`.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
BOARD_DIR="${ONNX_NEQ_BOARD_DIR:-${HOME:-/root}/.cache/onnx-neq/arm64-board}"
ROOTFS="$BOARD_DIR/rootfs"
SUITE=bookworm
BOARD_PY=python3.11
BOARD_PY_VERSION=3.11
QEMU_MIN_MAJOR=8
PYTHON="${PYTHON:-python3}"
DEFAULT_WHEELS="onnxruntime numpy click onnx==1.23.2 onnx-ir==1.1.0"
BOARD_WHEELS=$(printf '%s %s' "${ONNX_NEQ_BOARD_WHEELS:-$DEFAULT_WHEELS}" "${ONNX_NEQ_BOARD_EXTRA_WHEELS:-}" \
    | tr -s '[:space:]' ' ' | sed 's/^ //; s/ $//')  # one space between requirements
QEMU=""
CLEANUP_DIRS=()
cleanup() { local d; for d in "${CLEANUP_DIRS[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

T0=$SECONDS
log() { printf '[arm64-board %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { printf 'arm64_board.sh: error: %s\n' "$*" >&2; exit 2; }

need_root() {  # need_root WHAT
    [[ $(id -u) -eq 0 ]] || die "$1 needs root (apt-get/debootstrap); re-run as root: sudo $0 setup"
}

need_apt() {
    if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
        die "apt-get/dpkg not found: this script needs a Debian (bookworm) host"
    fi
}

# The Debian archive mirror the host already uses (not the security one).
debian_mirror() {
    if [[ -n ${ONNX_NEQ_BOARD_MIRROR:-} ]]; then echo "${ONNX_NEQ_BOARD_MIRROR%/}"; return; fi
    local f uri=""
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        uri=$(grep -hE '^[[:space:]]*(URIs:|deb[[:space:]])' "$f" \
            | sed -E 's/^[[:space:]]*(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?//' | tr ' ' '\n' \
            | grep -E '^(https?|file)://[^ ]*/debian/?$' | head -n1 || true)
        [[ -n $uri ]] && break
    done
    uri=${uri:-http://deb.debian.org/debian}
    echo "${uri%/}"
}

apt_install() {  # apt_install [apt-get install options] PKG... ; returns apt-get's status
    need_root "installing $*"
    need_apt
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >"$BOARD_DIR/apt.log" 2>&1
}

apt_update() {
    # Other (third-party) sources may be unreachable here; a partial update is fine as long
    # as the install that follows finds its packages.
    DEBIAN_FRONTEND=noninteractive apt-get update >"$BOARD_DIR/apt-update.log" 2>&1 \
        || log "warning: apt-get update reported errors (log: $BOARD_DIR/apt-update.log); trying anyway"
}

qemu_binary() {  # prints the path of a usable qemu-aarch64 (static) or nothing
    local q
    for q in qemu-aarch64-static qemu-aarch64; do
        command -v "$q" 2>/dev/null && return 0
    done
    return 0
}

qemu_major() {  # qemu_major BINARY
    "$1" --version 2>/dev/null | sed -nE '1s/.*version ([0-9]+)\..*/\1/p'
}

ensure_qemu() {
    local q major
    q=$(qemu_binary)
    if [[ -n $q ]]; then
        major=$(qemu_major "$q")
        if [[ -n $major && $major -ge $QEMU_MIN_MAJOR ]]; then QEMU=$q; return 0; fi
        log "found $q (QEMU ${major:-?}), need >= $QEMU_MIN_MAJOR (QEMU 7.2 segfaults in onnxruntime)"
    fi
    need_root "installing qemu-user-static"
    need_apt
    local codename
    codename=$(sed -nE 's/^VERSION_CODENAME="?([^"]*)"?$/\1/p' /etc/os-release 2>/dev/null || true)
    [[ $codename == "$SUITE" ]] || die "host is '${codename:-unknown}', not Debian $SUITE: install QEMU >= $QEMU_MIN_MAJOR user-mode (qemu-aarch64-static) yourself"
    if ! grep -rqsE "^[^#]*$SUITE-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        local mirror
        mirror=$(debian_mirror)
        log "adding deb $mirror $SUITE-backports main to /etc/apt/sources.list.d/onnx-neq-backports.list"
        echo "deb $mirror $SUITE-backports main" >/etc/apt/sources.list.d/onnx-neq-backports.list
    fi
    log "apt-get update"
    apt_update
    log "apt-get install -t $SUITE-backports qemu-user-static"
    apt_install -t "$SUITE-backports" qemu-user-static \
        || die "apt-get install -t $SUITE-backports qemu-user-static failed (log: $BOARD_DIR/apt.log)"
    q=$(qemu_binary)
    [[ -n $q ]] || die "qemu-user-static installed but no qemu-aarch64(-static) on PATH"
    major=$(qemu_major "$q")
    [[ -n $major && $major -ge $QEMU_MIN_MAJOR ]] || die "$q is QEMU ${major:-?}, need >= $QEMU_MIN_MAJOR"
    QEMU=$q
    log "qemu: $("$QEMU" --version | head -n1)"
}

ensure_userland() {
    local marker="$ROOTFS/.onnx-neq-userland-done"
    [[ -f $marker && -x $ROOTFS/usr/bin/$BOARD_PY ]] && return 0
    need_root "building the arm64 userland"
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "apt-get install debootstrap"
        apt_install debootstrap || { apt_update; apt_install debootstrap; } \
            || die "apt-get install debootstrap failed (log: $BOARD_DIR/apt.log)"
    fi
    local mirror tmp
    mirror=$(debian_mirror)
    tmp="$ROOTFS.partial"
    rm -rf "$tmp"
    log "debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 $SUITE ($mirror)"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 "$SUITE" "$tmp" "$mirror" \
        >"$BOARD_DIR/debootstrap.log" 2>&1 || die "debootstrap failed (log: $BOARD_DIR/debootstrap.log)"
    local debs=("$tmp"/var/cache/apt/archives/*.deb) deb n=0
    [[ -e ${debs[0]} ]] || die "debootstrap downloaded no .debs into $tmp/var/cache/apt/archives"
    log "unpacking ${#debs[@]} .debs into the userland (instead of the foreign second stage)"
    for deb in "${debs[@]}"; do
        # like `dpkg -x`, but keep the merged-/usr symlinks (/lib -> usr/lib, /bin -> usr/bin)
        dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink --no-same-owner -C "$tmp" \
            || die "unpacking $deb failed"
        n=$((n + 1))
    done
    [[ -x $tmp/usr/bin/$BOARD_PY ]] || die "no usr/bin/$BOARD_PY in the unpacked userland"
    rm -f "$tmp"/var/cache/apt/archives/*.deb
    rm -rf "$ROOTFS"
    mv "$tmp" "$ROOTFS"
    date -u +%FT%TZ >"$marker"
    log "userland ready: $ROOTFS ($(du -sh "$ROOTFS" | cut -f1))"
}

site_hash() {
    printf '%s|%s|%s' "$BOARD_WHEELS" "$BOARD_PY_VERSION" "manylinux_2_28_aarch64" | sha256sum | cut -c1-12
}
# The default wheel list lives in site/, any other list in its own site-<hash>/ (so both stay cached).
if [[ $BOARD_WHEELS == "$DEFAULT_WHEELS" ]]; then SITE="$BOARD_DIR/site"; else SITE="$BOARD_DIR/site-$(site_hash)"; fi

ensure_site() {
    local marker
    marker="$SITE/.onnx-neq-site-$(site_hash)"
    [[ -f $marker ]] && return 0
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "host '$PYTHON -m pip' is not available (set PYTHON=...)"
    local tmp="$SITE.partial"
    rm -rf "$tmp"
    local wheels
    read -r -a wheels <<<"$BOARD_WHEELS"
    log "pip install --target ${SITE##*/} (aarch64, cp311): $BOARD_WHEELS"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --target "$tmp" --only-binary=:all: \
        --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
        --implementation cp --python-version "$BOARD_PY_VERSION" --abi cp311 \
        "${wheels[@]}" >"$BOARD_DIR/pip.log" 2>&1 || die "pip install of aarch64 wheels failed (log: $BOARD_DIR/pip.log)"
    rm -rf "$SITE"
    mv "$tmp" "$SITE"
    # pip --target writes dist-info dirs; record the list for humans
    local d
    for d in "$SITE"/*.dist-info; do d=${d##*/}; echo "${d%.dist-info}"; done >"$SITE/.wheels"
    date -u +%FT%TZ >"$marker"
    log "site ready: $SITE ($(tr '\n' ' ' <"$SITE/.wheels"))"
}

ensure_board() {
    mkdir -p "$BOARD_DIR"
    exec 9>"$BOARD_DIR/.lock"
    flock 9  # one builder at a time
    ensure_qemu
    ensure_userland
    ensure_site
    flock -u 9
}

# board_python ARGS... : the board's python3.11 under qemu, in the current directory.
# The host environment passes through to the guest (as qemu-user does) minus the host's
# Python settings; PYTHONPATH is the tree holding onnx_neq ($BOARD_SRC: the repository root, or
# prepare-train's snapshot of it) and then the wheel site.
BOARD_SRC=$REPO_ROOT
board_python() {
    [[ -n $QEMU ]] || QEMU=$(qemu_binary)
    [[ -n $QEMU && -x $ROOTFS/usr/bin/$BOARD_PY && -d $SITE ]] || die "board not built; run: $0 setup"
    env -u PYTHONHOME -u PYTHONSTARTUP -u VIRTUAL_ENV -u PYTHONUSERBASE -u LD_LIBRARY_PATH -u LD_PRELOAD \
        PYTHONPATH="$BOARD_SRC:$SITE" PYTHONNOUSERSITE=1 \
        "$QEMU" -L "$ROOTFS" "$ROOTFS/usr/bin/$BOARD_PY" "$@"
}

cmd_setup() {
    local t=$SECONDS
    ensure_board
    log "setup done in $((SECONDS - t)) s: $BOARD_DIR"
}

cmd_info() {
    ensure_board
    echo "board dir: $BOARD_DIR"
    echo "qemu:      $QEMU ($("$QEMU" --version | head -n1))"
    echo "python:    $ROOTFS/usr/bin/$BOARD_PY ($(board_python -c 'import sys; print(sys.version.split()[0])'))"
    echo "site:      $SITE ($(tr '\n' ' ' <"$SITE/.wheels"))"
}

cmd_check() {
    local t=$SECONDS
    ensure_board
    local work
    work=$(mktemp -d "${TMPDIR:-/tmp}/onnx-neq-arm64-check.XXXXXX")
    CLEANUP_DIRS+=("$work")
    local check_py="$SCRIPT_DIR/arm64_board_check.py"
    log "host: building the model and running it on the host's onnxruntime"
    (cd "$REPO_ROOT" && PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$check_py" host "$work")
    log "board: running it on the board's onnxruntime (under qemu)"
    board_python "$check_py" board "$work"
    log "comparing"
    local rc=0
    "$PYTHON" "$check_py" compare "$work" || rc=$?
    log "check done in $((SECONDS - t)) s"
    return "$rc"
}

# Host paths are visible to the guest unless the same path exists under rootfs/ (qemu -L).
need_board_visible() {  # need_board_visible PATH
    [[ ! -e $ROOTFS$1 ]] || die "$1 also exists under $ROOTFS, so the board would see that one; pick another directory"
}

TRAIN_ARGS=(--backend portable --epochs 2 --train-limit 128 --batch-size 16 --warmup-epochs 1 --threads 1)

cmd_train() {  # cmd_train [extra `onnx-neq train` options]
    local t=$SECONDS
    ensure_board
    local work keep=1
    if [[ -n ${ONNX_NEQ_BOARD_TRAIN_DIR:-} ]]; then
        work=$ONNX_NEQ_BOARD_TRAIN_DIR
        mkdir -p "$work"
        work=$(cd "$work" && pwd)
        rm -rf "$work/artifacts" "$work/digits.npz" "$work/hostrun" "$work/boardrun" "$work"/{host,board}_info.json
    else
        work=$(mktemp -d "$BOARD_DIR/train.XXXXXX")
        keep=0
    fi
    need_board_visible "$work"
    local helper="$SCRIPT_DIR/arm64_board_train.py" model="$REPO_ROOT/onnx_neq/models/mobilenet_v2_035_fmnist04.onnx"
    local host_env=(env PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}")
    log "work directory: $work"
    log "host: onnx-neq prepare ${model#"$REPO_ROOT"/} --num-classes 10 (fresh, so never stale artifacts)"
    (cd "$REPO_ROOT" && "${host_env[@]}" "$PYTHON" -m onnx_neq.cli prepare "$model" --num-classes 10 -o "$work/artifacts" >"$work/prepare.log" 2>&1) \
        || { cat "$work/prepare.log" >&2; die "prepare failed (log: $work/prepare.log)"; }
    [[ -f $work/artifacts/portable_training_model.onnx && -f $work/artifacts/parameters.npz ]] \
        || die "prepare wrote no portable_training_model.onnx/parameters.npz into $work/artifacts"
    log "host: digits -> $work/digits.npz"
    (cd "$REPO_ROOT" && "${host_env[@]}" "$PYTHON" "$helper" data "$work/digits.npz" "${ONNX_NEQ_BOARD_TEST_IMAGES:-150}") >&2
    local args=(train "$work/artifacts" --data "npz:$work/digits.npz" "${TRAIN_ARGS[@]}" "$@")
    local rc_host=0 rc_board=0 t_host t_board
    log "host: python -m onnx_neq.cli ${args[*]} --out $work/hostrun"
    t_host=$(date +%s.%N)
    (cd "$REPO_ROOT" && "${host_env[@]}" "$PYTHON" "$helper" run "$work/host_info.json" "${args[@]}" --out "$work/hostrun") \
        >"$work/host.log" 2>&1 || rc_host=$?
    t_host=$(awk -v a="$t_host" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    log "host: exit status $rc_host, ${t_host} s (log: $work/host.log)"
    log "board: the same with --out $work/boardrun (under qemu; a few minutes)"
    t_board=$(date +%s.%N)
    (cd "$REPO_ROOT" && board_python "$helper" run "$work/board_info.json" "${args[@]}" --out "$work/boardrun") \
        >"$work/board.log" 2>&1 || rc_board=$?
    t_board=$(awk -v a="$t_board" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    log "board: exit status $rc_board, ${t_board} s (log: $work/board.log)"
    local side
    for side in host board; do
        echo "==== $side: python -m onnx_neq.cli ${args[*]} --out $work/${side}run"
        grep -v 'cpuid_info warning' "$work/$side.log" || true
    done
    echo "==== comparison"
    local rc=0
    [[ -f $work/host_info.json && -f $work/board_info.json ]] || rc=1
    if [[ $rc -eq 0 ]]; then
        (cd "$REPO_ROOT" && "${host_env[@]}" "$PYTHON" "$helper" compare "$work" \
            "${ONNX_NEQ_BOARD_TRAIN_RTOL:-1e-4}" "${ONNX_NEQ_BOARD_TOP1_ATOL:-0}") || rc=$?
    else
        echo "a run died before writing its info file (host status $rc_host, board status $rc_board); see the logs above"
        echo "FAIL"
    fi
    echo "wall time: host run ${t_host} s, board run ${t_board} s (with python start-up; the board under qemu-aarch64)"
    if [[ $rc -eq 0 && $keep -eq 0 ]]; then
        CLEANUP_DIRS+=("$work")
    else
        echo "kept: $work"
    fi
    log "train done in $((SECONDS - t)) s"
    return "$rc"
}

# prepare-train: `onnx-neq prepare` and then `onnx-neq train` on each side, each training its own artifacts.
PREPARE_ARGS=(--num-classes 10)
PREPARE_TRAIN_ARGS=(--backend portable --epochs 1 --train-limit 64 --batch-size 16 --warmup-epochs 1 --threads 1)

elapsed() {  # elapsed START (from date +%s.%N): seconds since, one decimal
    awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

cmd_prepare_train() {  # cmd_prepare_train [extra `onnx-neq train` options]
    local t=$SECONDS
    ensure_board
    local work keep=1
    if [[ -n ${ONNX_NEQ_BOARD_PREPARE_DIR:-} ]]; then
        work=$ONNX_NEQ_BOARD_PREPARE_DIR
        mkdir -p "$work"
        work=$(cd "$work" && pwd)
        rm -rf "$work/src" "$work/hostart" "$work/boardart" "$work/digits.npz" "$work/hostrun" "$work/boardrun" \
            "$work"/{host,board}_{info,prepare}.json "$work"/{host,board}{,_prepare}.log "$work"/.{host,board}art.partial-*
    else
        work=$(mktemp -d "$BOARD_DIR/prepare.XXXXXX")
        keep=0
    fi
    need_board_visible "$work"
    local helper="$SCRIPT_DIR/arm64_board_train.py"
    # One snapshot of onnx_neq for both sides: the repository's tree may change while the board works.
    mkdir -p "$work/src"
    tar -C "$REPO_ROOT" --exclude=__pycache__ -cf - onnx_neq | tar -C "$work/src" -xf -
    local model="$work/src/onnx_neq/models/mobilenet_v2_035_fmnist04.onnx" dirty
    dirty=$(git -C "$REPO_ROOT" status --porcelain -- onnx_neq 2>/dev/null | wc -l || echo "?")
    BOARD_SRC="$work/src"
    local host_env=(env PYTHONPATH="$work/src${PYTHONPATH:+:$PYTHONPATH}")
    log "work directory: $work"
    echo "onnx_neq: snapshot of $REPO_ROOT/onnx_neq at $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "with $dirty uncommitted change(s) under onnx_neq/ (tree hash $(cd "$work/src" && find onnx_neq -type f -print0 | sort -z \
        | xargs -0 sha256sum | sha256sum | cut -c1-12)) -> $work/src"
    echo "host: $(uname -m), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start (the board's times scale with it)"
    echo "board: qemu $("$QEMU" --version | sed -nE '1s/.*version ([^ ]+).*/\1/p'), python $BOARD_PY, site ${SITE##*/} ($(tr '\n' ' ' <"$SITE/.wheels" | sed 's/ $//'))"
    local pargs=(prepare "$model" "${PREPARE_ARGS[@]}")
    local rc_hp=0 rc_bp=0 rc_ht=0 rc_bt=0 s t_hp t_bp t_ht t_bt
    log "host: python -m onnx_neq.cli ${pargs[*]} -o $work/hostart"
    s=$(date +%s.%N)
    (cd "$work" && "${host_env[@]}" "$PYTHON" "$helper" run "$work/host_prepare.json" "${pargs[@]}" -o "$work/hostart") \
        >"$work/host_prepare.log" 2>&1 || rc_hp=$?
    t_hp=$(elapsed "$s")
    log "host: exit status $rc_hp, ${t_hp} s (log: $work/host_prepare.log)"
    log "board: the same with -o $work/boardart (under qemu; ~2.5 min)"
    s=$(date +%s.%N)
    (cd "$work" && board_python "$helper" run "$work/board_prepare.json" "${pargs[@]}" -o "$work/boardart") \
        >"$work/board_prepare.log" 2>&1 || rc_bp=$?
    t_bp=$(elapsed "$s")
    log "board: exit status $rc_bp, ${t_bp} s (log: $work/board_prepare.log)"
    local side
    for side in host board; do
        echo "==== $side: python -m onnx_neq.cli ${pargs[*]} -o $work/${side}art"
        grep -v 'cpuid_info warning' "$work/${side}_prepare.log" || true
    done
    echo "==== artifacts, host | board"
    local rc=0
    if [[ -f $work/host_prepare.json && -f $work/board_prepare.json ]]; then
        (cd "$work" && "${host_env[@]}" "$PYTHON" "$helper" artifacts "$work") || rc=$?
    else
        echo "a prepare died before writing its info file (host status $rc_hp, board status $rc_bp); see the logs above"
        rc=1
    fi
    if [[ $rc_hp -ne 0 || $rc_bp -ne 0 ]]; then
        echo "FAIL (prepare: host status $rc_hp, board status $rc_bp)"
        echo "kept: $work"
        return 1
    fi
    log "host: digits -> $work/digits.npz"
    (cd "$work" && "${host_env[@]}" "$PYTHON" "$helper" data "$work/digits.npz" "${ONNX_NEQ_BOARD_TEST_IMAGES:-150}") >&2
    local targs=(--data "npz:$work/digits.npz" "${PREPARE_TRAIN_ARGS[@]}" "$@")
    log "host: python -m onnx_neq.cli train $work/hostart ${targs[*]} --out $work/hostrun"
    s=$(date +%s.%N)
    (cd "$work" && "${host_env[@]}" "$PYTHON" "$helper" run "$work/host_info.json" train "$work/hostart" "${targs[@]}" --out "$work/hostrun") \
        >"$work/host.log" 2>&1 || rc_ht=$?
    t_ht=$(elapsed "$s")
    log "host: exit status $rc_ht, ${t_ht} s (log: $work/host.log)"
    log "board: python -m onnx_neq.cli train $work/boardart ... --out $work/boardrun (under qemu; ~2 min)"
    s=$(date +%s.%N)
    (cd "$work" && board_python "$helper" run "$work/board_info.json" train "$work/boardart" "${targs[@]}" --out "$work/boardrun") \
        >"$work/board.log" 2>&1 || rc_bt=$?
    t_bt=$(elapsed "$s")
    log "board: exit status $rc_bt, ${t_bt} s (log: $work/board.log)"
    for side in host board; do
        echo "==== $side: python -m onnx_neq.cli train $work/${side}art ${targs[*]} --out $work/${side}run"
        grep -v 'cpuid_info warning' "$work/$side.log" || true
    done
    echo "==== training, host | board (each on the artifacts it prepared)"
    local rc_t=0
    if [[ -f $work/host_info.json && -f $work/board_info.json ]]; then
        (cd "$work" && "${host_env[@]}" "$PYTHON" "$helper" compare "$work" \
            "${ONNX_NEQ_BOARD_TRAIN_RTOL:-1e-4}" "${ONNX_NEQ_BOARD_TOP1_ATOL:-0}") || rc_t=$?
    else
        echo "a run died before writing its info file (host status $rc_ht, board status $rc_bt); see the logs above"
        echo "FAIL"
        rc_t=1
    fi
    echo "==== summary"
    printf '%-8s %12s %12s   (wall seconds with python start-up; the board under qemu-aarch64)\n' "" prepare train
    printf '%-8s %12s %12s\n' host "$t_hp" "$t_ht" board "$t_bp" "$t_bt"
    echo "host load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "artifacts: $([[ $rc -eq 0 ]] && echo same || echo DIFFERENT); training: $([[ $rc_t -eq 0 ]] && echo PASS || echo FAIL)"
    [[ $rc -eq 0 ]] && rc=$rc_t
    echo "$([[ $rc -eq 0 ]] && echo PASS || echo FAIL)"
    if [[ $rc -eq 0 && $keep -eq 0 ]]; then
        CLEANUP_DIRS+=("$work")
    else
        echo "kept: $work"
    fi
    log "prepare-train done in $((SECONDS - t)) s"
    return "$rc"
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed -n '/^# Usage/,/^# Cache/p' | sed '$d; s/^# \{0,1\}//' >&2; }

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
        setup) cmd_setup ;;
        python)
            [[ -f $ROOTFS/.onnx-neq-userland-done && -f $SITE/.onnx-neq-site-$(site_hash) ]] || ensure_board
            board_python "$@"
            ;;
        check) cmd_check ;;
        train) cmd_train "$@" ;;
        prepare-train) cmd_prepare_train "$@" ;;
        info) cmd_info ;;
        -h | --help | help) usage ;;
        *) usage; die "unknown subcommand '${cmd}' (setup | python ARGS... | check | train [OPTIONS...] | prepare-train [OPTIONS...] | info)" ;;
    esac
}

main "$@"
