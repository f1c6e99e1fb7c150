#!/usr/bin/env bash
# debian13.sh - install and run onnx-neq on Debian 13 (trixie): Python 3.13, stock onnxruntime,
# no onnxruntime-training.
#
# What it does
#   * builds once a Debian 13 userland with
#     `debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates trixie`
#     (debootstrap is apt-get installed on the host if missing), with the host's resolv.conf and CA
#     bundle copied in so pip can reach PyPI;
#   * copies this repository's working tree (tracked and untracked files, not ignored ones; a fresh
#     copy every run) to /src in it;
#   * in a chroot (/proc and /dev mounted for the run, always unmounted again on exit):
#     makes a fresh venv with trixie's python3 (must be 3.13), runs README's install command
#     `pip install -e ".[data]"` in /src, checks that onnxruntime.training is absent and prints the
#     versions of python, onnxruntime, onnx and numpy; then runs, printing each command and its wall time:
#       onnx-neq prepare /src/onnx_neq/models/mobilenet_v2_035_fmnist04.onnx --num-classes 10 -o /tmp/art
#       onnx-neq train /tmp/art --data digits --epochs 2 --train-limit 256 --out /tmp/run
#       onnx-neq eval /tmp/run --data digits
#       onnx-neq train --epochs 2          (README's main command, short; in /tmp/main)
#     and prints "debian13: PASS" (exit status 0); the first failure stops it (exit status 1; 2 for
#     a setup error).
#
# Usage
#   .ci/debian13.sh [run] [--keep]    everything above (the default)
#   .ci/debian13.sh setup             only build (or check) the cached userland
#   --keep                            leave the chroot's /tmp (outputs: /tmp/art, /tmp/run, /tmp/main,
#                                     /tmp/xdg-cache) after the run; /src and the venv are always left
#                                     (the next run starts afresh all the same: new copy, new venv, empty /tmp)
#
# Cache
#   ${ONNX_NEQ_DEBIAN13_DIR:-$HOME/.cache/onnx-neq/debian13}:
#     rootfs/    the trixie userland (marker rootfs/.onnx-neq-debian13-done; delete it to rebuild);
#                pip's cache lives inside it (/var/cache/onnx-neq-pip; it stays empty behind a proxy
#                that drops PyPI's Cache-Control headers, as on the machine measured below)
#     *.log      debootstrap and apt logs
#   Everything needs root (debootstrap, mount, chroot).
#
# Time (measured on a 2-core x86_64 bookworm VM, deb.debian.org and PyPI reachable; the larger
# numbers while another test suite shared the cores):
#   first `setup`: ~80 s (apt-get install debootstrap 9 s, debootstrap 70 s; a 246 MB userland);
#   a later `setup`: <0.1 s.
#   `run` with the userland cached: 111-163 s over four runs, plus 15-50 s removing the last run's venv:
#   copying the tree 1 s, venv 4-6 s, pip install 44-70 s (22 packages from PyPI), versions 0.5-1.2 s,
#   prepare 1.8-3.2 s, train (256 images, 2 epochs) 12-22 s, eval 3-6 s, the default run (1,078
#   images, 2 epochs, preparing the shipped model first) 34-57 s. tests/test_debian13.py: 3-4 min.
#
# Environment
#   ONNX_NEQ_DEBIAN13_DIR     cache directory (see above)
#   ONNX_NEQ_DEBIAN13_MIRROR  Debian mirror for debootstrap (default: the deb.debian.org-style
#                             mirror in /etc/apt/sources.list*, else http://deb.debian.org/debian)

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
CACHE_DIR="${ONNX_NEQ_DEBIAN13_DIR:-${HOME:-/root}/.cache/onnx-neq/debian13}"
SUITE=trixie
PY_WANT=3.13
INCLUDE=python3,python3-venv,python3-pip,ca-certificates
MODEL=/src/onnx_neq/models/mobilenet_v2_035_fmnist04.onnx
VENV=/opt/venv
PIP_CACHE=/var/cache/onnx-neq-pip
HOST_CA=/etc/ssl/certs/ca-certificates.crt
CHROOT_CA=/etc/ssl/certs/onnx-neq-host-ca-certificates.crt  # the host's bundle, as copied in
OUTPUTS=(/tmp/art /tmp/run /tmp/main /tmp/xdg-cache)          # inside the chroot
KEEP=0
ROOTFS=""
MOUNTS=()   # mount points this run made, in mounting order
TIMINGS=()  # "SECONDS  WHAT" per timed step

T0=$SECONDS
log() { printf '[debian13 %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { printf 'debian13.sh: error: %s\n' "$*" >&2; exit 2; }
fail() { printf 'debian13.sh: FAIL: %s\n' "$*" >&2; exit 1; }

need_root() {  # need_root WHAT
    [[ $(id -u) -eq 0 ]] || die "$1 needs root (debootstrap, mount, chroot); re-run as root: sudo $0 ${CMD:-run}"
}

need_apt() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs a Debian-like host (apt-get, debootstrap)"
}

# The Debian archive mirror the host already uses (not the security one); as benchmarks/arm64_board.sh.
debian_mirror() {
    if [[ -n ${ONNX_NEQ_DEBIAN13_MIRROR:-} ]]; then echo "${ONNX_NEQ_DEBIAN13_MIRROR%/}"; return; fi
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

elapsed() {  # elapsed START (from `date +%s.%N`): seconds since, one decimal
    awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

# ---- mounts -------------------------------------------------------------------------------------

mounts_under() {  # mounts_under PATH: mount points at or below PATH, deepest first
    awk -v p="$1" '$2 == p || index($2, p "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}

unmount() {  # unmount MOUNTPOINT: lazily if busy, so that nothing stays in the mount table
    umount "$1" 2>/dev/null || umount -l "$1" || log "warning: could not unmount $1"
}

unmount_all() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do unmount "${MOUNTS[i]}"; done
    MOUNTS=()
}

# Mounts a killed (SIGKILL) earlier run left under the cache; the lock says no other run owns them.
unmount_stale() {
    local m
    while IFS= read -r m; do
        [[ -n $m ]] || continue
        log "unmounting $m (left by an earlier run)"
        unmount "$m"
    done < <(mounts_under "$CACHE_DIR")
}

safe_rm() {  # safe_rm PATH: rm -rf, but never across a mount
    local m
    m=$(mounts_under "$1")
    [[ -z $m ]] || die "refusing to rm -rf $1: mounted under it: $(echo "$m" | tr '\n' ' ')"
    rm -rf "$1"
}

mount_chroot() {
    local d
    for d in proc dev; do mkdir -p "$ROOTFS/$d"; done
    mount -t proc proc "$ROOTFS/proc" || die "mount -t proc proc $ROOTFS/proc failed"
    MOUNTS+=("$ROOTFS/proc")
    mount --bind /dev "$ROOTFS/dev" || die "mount --bind /dev $ROOTFS/dev failed"
    MOUNTS+=("$ROOTFS/dev")
}

cleanup() {
    local rc=$?
    unmount_all
    # the outputs go unless --keep; /src and the venv stay until the next run replaces them
    if [[ -n $ROOTFS && $KEEP -eq 0 && -d $ROOTFS/tmp && -z $(mounts_under "$ROOTFS") ]]; then
        find "$ROOTFS/tmp" -mindepth 1 -delete || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM
trap 'exit 129' HUP

# ---- userland -----------------------------------------------------------------------------------

apt_install_debootstrap() {
    need_root "installing debootstrap"
    need_apt
    log "apt-get install -y debootstrap"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >"$CACHE_DIR/apt.log" 2>&1; then
        # Other (third-party) sources may be unreachable; a partial update is fine if debootstrap is found.
        DEBIAN_FRONTEND=noninteractive apt-get update >"$CACHE_DIR/apt-update.log" 2>&1 \
            || log "warning: apt-get update reported errors (log: $CACHE_DIR/apt-update.log); trying anyway"
        DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >"$CACHE_DIR/apt.log" 2>&1 \
            || die "apt-get install -y debootstrap failed (log: $CACHE_DIR/apt.log)"
    fi
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap installed but not on PATH (PATH=$PATH)"
}

ensure_userland() {
    local marker="$ROOTFS/.onnx-neq-debian13-done"
    if [[ -f $marker && -x $ROOTFS/usr/bin/python3 ]]; then
        log "userland: $ROOTFS (cached, built $(cat "$marker"))"
        return 0
    fi
    need_root "building the Debian $SUITE userland"
    command -v debootstrap >/dev/null 2>&1 || apt_install_debootstrap
    local mirror tmp="$ROOTFS.partial" t
    mirror=$(debian_mirror)
    safe_rm "$tmp"
    log "debootstrap --variant=minbase --include=$INCLUDE $SUITE $tmp $mirror (about a minute)"
    t=$(date +%s.%N)
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$tmp" "$mirror" >"$CACHE_DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE_DIR/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE_DIR/debootstrap.log)"; }
    [[ -x $tmp/usr/bin/python3 ]] || die "debootstrap made no usr/bin/python3 in $tmp"
    [[ -z $(mounts_under "$tmp") ]] || die "debootstrap left mounts under $tmp: $(mounts_under "$tmp" | tr '\n' ' ')"
    rm -rf "$tmp"/var/cache/apt/archives/*.deb
    TIMINGS+=("$(elapsed "$t")  debootstrap $SUITE")
    safe_rm "$ROOTFS"
    mv "$tmp" "$ROOTFS"
    date -u +%FT%TZ >"$marker"
    log "userland ready: $ROOTFS ($(du -sh "$ROOTFS" | cut -f1))"
}

# Network settings and certificates change on the host; copied in on every run.
copy_host_files() {
    [[ -f /etc/resolv.conf ]] && cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    [[ -f $HOST_CA ]] || die "no CA bundle at $HOST_CA on the host (install ca-certificates)"
    cp -L "$HOST_CA" "$ROOTFS$CHROOT_CA"
}

# ---- the chroot ---------------------------------------------------------------------------------

# in_chroot CWD CMD...: CMD in the chroot with a clean environment (the host's PIP_*, VIRTUAL_ENV,
# PYTHONPATH etc. stay out; proxies pass through), the venv first on PATH.
in_chroot() {
    local cwd=$1 v
    shift
    local envs=(
        PATH="$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        HOME=/root LANG=C.UTF-8 TMPDIR=/tmp TERM="${TERM:-dumb}"
        PIP_CERT="$CHROOT_CA" SSL_CERT_FILE="$CHROOT_CA" REQUESTS_CA_BUNDLE="$CHROOT_CA"
        PIP_CACHE_DIR="$PIP_CACHE" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-60}"
        XDG_CACHE_HOME=/tmp/xdg-cache PYTHONUNBUFFERED=1
    )
    for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
        [[ -n ${!v:-} ]] && envs+=("$v=${!v}")
    done
    chroot "$ROOTFS" /usr/bin/env -i -C "$cwd" "${envs[@]}" "$@"
}

# step CWD CMD...: print the command (or $LABEL), run it in the chroot, print its wall time; stop on failure
step() {
    local cwd=$1 t rc=0 dt what
    shift
    what=${LABEL:-$*}
    printf '\n$ %s    (debian13 chroot, in %s)\n' "$what" "$cwd"
    t=$(date +%s.%N)
    in_chroot "$cwd" "$@" || rc=$?
    dt=$(elapsed "$t")
    if [[ $rc -ne 0 ]]; then
        fail "exit status $rc after $dt s: $what"
    fi
    printf '%s s: %s\n' "$dt" "$what"
    TIMINGS+=("$dt  $what")
}

copy_source() {
    git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "$REPO_ROOT is not a git working tree (git is needed to list its files)"
    safe_rm "$ROOTFS/src"
    mkdir -p "$ROOTFS/src"
    # tracked and untracked-but-not-ignored files; tracked files deleted in the work tree are skipped
    git -C "$REPO_ROOT" ls-files -z -co --exclude-standard \
        | (cd "$REPO_ROOT" && while IFS= read -r -d '' f; do if [[ -e $f || -L $f ]]; then printf '%s\0' "$f"; fi; done) \
        | tar -C "$REPO_ROOT" --null -T - -cf - \
        | tar -C "$ROOTFS/src" -xf - \
        || die "copying the working tree to $ROOTFS/src failed"
    log "copied the working tree to /src ($(find "$ROOTFS/src" -type f | wc -l) files, $(git -C "$REPO_ROOT" log --oneline -1 2>/dev/null || echo 'no commit'))"
}

PROBE='
import importlib.metadata as md, sys
print("python:", sys.version.split()[0], "(" + sys.executable + ")")
for name in ("onnxruntime", "onnx", "numpy"):
    print(name + ":", __import__(name).__version__)
try:
    import onnxruntime.training  # noqa: F401
except ImportError as e:
    print("onnxruntime.training: absent (" + type(e).__name__ + ": " + str(e) + ")")
else:
    sys.exit("onnxruntime.training is importable: onnxruntime-training must not be installed here")
for dist in ("onnxruntime-training", "onnxruntime-training-cpu"):
    try:
        sys.exit(dist + " " + md.version(dist) + " is installed: it must not be")
    except md.PackageNotFoundError:
        pass
if not sys.version.startswith("'"$PY_WANT"'."):
    sys.exit("python is " + sys.version.split()[0] + ", not '"$PY_WANT"'")
'

cmd_setup() {
    need_root "$0 setup"
    ensure_userland
    local py
    py=$(chroot "$ROOTFS" /usr/bin/python3 -c 'import sys; print(sys.version.split()[0])') || die "the userland's python3 does not run"
    [[ $py == "$PY_WANT".* ]] || die "the $SUITE userland's python3 is $py, not $PY_WANT (delete $ROOTFS to rebuild)"
    log "python3 in the userland: $py"
}

cmd_run() {
    cmd_setup
    copy_host_files
    copy_source
    # a fresh venv and an empty /tmp (outputs of an earlier --keep run, leftovers of a killed one)
    if [[ -e $ROOTFS$VENV ]]; then
        local t
        t=$(date +%s.%N)
        safe_rm "$ROOTFS$VENV"
        log "removed the previous run's venv in $(elapsed "$t") s"
    fi
    safe_rm "$ROOTFS/tmp"
    mkdir -m 1777 "$ROOTFS/tmp"
    mkdir -p "$ROOTFS/tmp/main" "$ROOTFS$PIP_CACHE"
    mount_chroot

    step / python3 -m venv "$VENV"
    step /src pip install -e ".[data]"
    LABEL="python -c PROBE  (versions; onnxruntime.training must be absent)" step / python -c "$PROBE"

    # --num-classes 10 (digits' classes): train then trains these artifacts, not ones it prepares itself
    step / onnx-neq prepare "$MODEL" --num-classes 10 -o /tmp/art
    step / onnx-neq train /tmp/art --data digits --epochs 2 --train-limit 256 --out /tmp/run
    step / onnx-neq eval /tmp/run --data digits
    step /tmp/main onnx-neq train --epochs 2

    unmount_all
    printf '\nwall times (s):\n'
    printf '  %s\n' "${TIMINGS[@]}"
    [[ $KEEP -eq 1 ]] && printf 'kept in %s: %s\n' "$ROOTFS" "${OUTPUTS[*]}"
    echo "debian13: PASS"
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed -n '/^# Usage/,/^# Cache/p' | sed '$d; s/^# \{0,1\}//' >&2; }

main() {
    CMD=run
    local a
    for a in "$@"; do
        case "$a" in
            run | setup) CMD=$a ;;
            --keep) KEEP=1 ;;
            -h | --help | help) usage; exit 0 ;;
            *) usage; die "unknown argument '$a' (run | setup, --keep)" ;;
        esac
    done
    need_root "$0 $CMD"
    command -v chroot >/dev/null 2>&1 || die "chroot not found (coreutils)"
    mkdir -p "$CACHE_DIR"
    CACHE_DIR=$(cd "$CACHE_DIR" && pwd -P)
    ROOTFS="$CACHE_DIR/rootfs"
    exec 9>"$CACHE_DIR/.lock"
    flock -n 9 || { log "another debian13.sh (or a process a killed one left running) holds $CACHE_DIR/.lock; waiting"; flock 9; }
    unmount_stale
    local t=$SECONDS
    case "$CMD" in
        setup) cmd_setup; log "setup done in $((SECONDS - t)) s: $ROOTFS" ;;
        run) cmd_run; log "run done in $((SECONDS - t)) s" ;;
    esac
}

main "$@"
