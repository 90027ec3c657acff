#!/usr/bin/env bash
# The GPU check (issue 20): on the lent GPU machine (one H200, no network, torch and transformers
# of its own, none of deepspeed, datasets, wandb), in one command of at most 10 minutes.
#
#   scripts/gpu_check.sh --make-wheels DIR [--no-wandb] [--also NAME,NAME]
#       HERE, with network, in the project's venv, before a device session: only what the GPU
#       machine lacks, for its CPython 3.12 on x86-64: DeepSpeed built into a pure-Python wheel,
#       datasets, wandb and those of their dependencies the machine does not have (the list in
#       scripts/gpu_check.py), at this venv's versions; about 26 MiB. Never numpy, pandas,
#       pyarrow, matplotlib, torch or transformers. Use an ignored folder (.cache/gpu-wheels).
#
#   scripts/gpu_check.sh --wheels DIR [--target DIR] [--budget S] [--logs DIR]
#       ON THE GPU MACHINE: pip-installs DIR's wheels offline with --no-deps into --target
#       (default /tmp/gpu_check/site), puts it on PYTHONPATH and its bin/ (the deepspeed launcher)
#       on PATH, refuses in one sentence a torch or transformers older than dsinstab needs, and runs
#       the checks of scripts/gpu_check.py, each printing one `PASS <name> (<s>s): <figure>` or
#       `FAIL <name>: <reason>` line, all within --budget seconds (default 540, install included).
#       summary.txt and logs.tar.gz go to --logs (default $OUT, else the work folder).
#
#   scripts/gpu_check.sh --dry-run [--wheels DIR]
#       HERE: print every command the check runs and check each one: its script exists, its flags
#       are in the script's --help, train.py --dry-run resolves each run's config. With --wheels,
#       also install DIR's wheels for CPython 3.12 into a temporary folder as the machine will.
#
#   scripts/gpu_check.sh --rehearse [--budget S]
#       HERE: the whole check on this CPU, the small runs on a tiny shape (minutes on 2 cores).
#
# PYTHON picks the interpreter (default python3: the machine's, or the activated venv's).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
HELPER="$ROOT/scripts/gpu_check.py"
START=$(date +%s)

die() { printf 'gpu_check: %s\n' "$1" >&2; exit "${2:-2}"; }
usage="usage: scripts/gpu_check.sh --make-wheels DIR [--no-wandb] [--also N,N] | --wheels DIR [--target DIR] [--budget S] [--logs DIR] | --dry-run [--wheels DIR] | --rehearse [--budget S]"

# pip install DIR/*.whl into TARGET, offline, nothing resolved (each wheel is named); extra pip
# arguments after the two (the dry run's --python-version 3.12 ...)
install_wheels() {
    local dir=$1 target=$2
    shift 2
    compgen -G "$dir/*.whl" >/dev/null || die "$dir holds no wheels; make them here with scripts/gpu_check.sh --make-wheels $dir."
    "$PY" "$HELPER" verify-wheels "$dir" >&2 || die "the wheels in $dir are incomplete for the GPU machine (above)."
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$@" "$dir"/*.whl \
        || die "pip could not install $dir's wheels into $target." 1
    [[ -x $target/bin/deepspeed ]] || die "$target/bin/deepspeed is missing after the install." 1
}

mode=${1:-}
[[ -n $mode ]] || die "$usage"
shift
case "$mode" in
--make-wheels)
    [[ $# -ge 1 ]] || die "$usage"
    exec "$PY" "$HELPER" make-wheels "$@"
    ;;
--rehearse)
    exec "$PY" "$HELPER" check --rehearse "$@"
    ;;
--dry-run)
    wheels=""
    if [[ ${1:-} == --wheels ]]; then
        wheels=${2:?--wheels needs DIR}
        shift 2
    fi
    [[ $# == 0 ]] || die "$usage"
    if [[ -n $wheels ]]; then
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        plat=(--python-version 3.12 --implementation cp --only-binary=:all:)
        for p in manylinux_2_17 manylinux_2_28 manylinux2014 manylinux1 linux; do plat+=(--platform "${p}_x86_64"); done
        plat+=(--platform any)
        install_wheels "$wheels" "$tmp/site" "${plat[@]}"
        printf 'gpu_check: the wheels in %s install for CPython 3.12 (%s, %s files; bin/deepspeed there)\n' \
            "$wheels" "$(du -sh "$wheels" | cut -f1)" "$(find "$tmp/site" -type f | wc -l)"
    fi
    exec "$PY" "$HELPER" check --dry-run
    ;;
--wheels)
    [[ $# -ge 1 ]] || die "$usage"
    wheels=$1
    shift
    target=/tmp/gpu_check/site budget=540 logs=${OUT:-}
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --target) target=${2:?--target needs DIR}; shift 2 ;;
        --budget) budget=${2:?--budget needs seconds}; shift 2 ;;
        --logs) logs=${2:?--logs needs DIR}; shift 2 ;;
        *) die "$usage" ;;
        esac
    done
    printf 'gpu_check: installing %s (%s) into %s\n' "$wheels" "$(du -sh "$wheels" | cut -f1)" "$target"
    install_wheels "$wheels" "$target"
    export PYTHONPATH="$ROOT:$target${PYTHONPATH:+:$PYTHONPATH}" PATH="$target/bin:$PATH"
    exec "$PY" "$HELPER" check --start "$START" --budget "$budget" --target "$target" \
        --work /tmp/gpu_check/work ${logs:+--logs "$logs"}
    ;;
*)
    die "$usage"
    ;;
esac
