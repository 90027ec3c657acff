#!/usr/bin/env bash
# The GPU check of a fresh checkout, without network (issue 10): install what the project needs
# beyond torch and transformers from a folder of wheels, run the GPU tests (tests/test_gpu.py) and
# `benchmarks/run.py --quick`, print a short summary. Under 8 minutes on one GPU.
#
#   scripts/gpu_check.sh --wheels DIR
#       On the GPU machine. Its Python (PYTHON, default python3) already has torch and
#       transformers; deepspeed, datasets, wandb, matplotlib, pytest and whatever of theirs is
#       missing are installed from DIR with `pip install --no-index`. Without a CUDA device the
#       installation still runs, the GPU tests report themselves skipped, and the script says so
#       and exits 3. Exit 0: every test passed and the benchmark ran.
#
#   scripts/gpu_check.sh --make-wheels DIR [--python-version X.Y] [--exclude NAME,NAME]
#       Here, with network: fills DIR. DeepSpeed is built into a pure-Python wheel by this Python
#       (which must have torch: the project's venv); everything else is downloaded as binary
#       wheels: the packages that the project's requirements and transformers need and torch does
#       not bring, at the versions pip resolves here, for this Python or for X.Y (the lent H200's is
#       3.12). --exclude leaves out packages the GPU machine already has (to keep DIR small).
#
# Time limits of the two steps (seconds): GPU_CHECK_TESTS_S (default 420), GPU_CHECK_BENCH_S (150).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
DEEPSPEED_VERSION=0.19.8

say() { printf 'gpu_check: %s\n' "$*"; }
die() { say "$1" >&2; exit "${2:-2}"; }

# The project's requirements (pyproject.toml) less torch and transformers (the machine's own) and
# tokenizers (transformers brings it), plus pytest from the dev extra.
requirements() {
    "$PY" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
deps = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1))
dev = re.search(r"^dev = \[(.*?)\]", text, re.M).group(1)
deps += [d for d in re.findall(r'"([^"]+)"', dev) if d.startswith("pytest")]
for d in deps:
    if re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() not in {"torch", "transformers", "tokenizers"}:
        print(d)
EOF
}

make_wheels() {
    local dir=$1 pyver=$2 exclude=$3
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    "$PY" -c "import torch" 2>/dev/null || die "--make-wheels: $PY has no torch; run it with the project's venv (deepspeed's build imports torch)."
    say "building deepspeed $DEEPSPEED_VERSION into a pure-Python wheel"
    "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$DEEPSPEED_VERSION" -w "$dir"
    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    local torch_v transformers_v
    torch_v=$("$PY" -c "import torch; print(torch.__version__)")
    transformers_v=$("$PY" -c "import transformers; print(transformers.__version__)")
    mapfile -t reqs < <(requirements)
    # Everything the requirements and transformers need, less torch and what it needs (both with
    # this Python's torch, so that neither side pulls another torch build): resolved by pip
    # (metadata only), the deepspeed wheel just built taking the place of its source release.
    # transformers' own needs stay in: a GPU machine's older transformers may not bring them all
    # (the lent H200's brings no pydantic, which deepspeed and wandb need).
    "$PY" -m pip install -q --dry-run --ignore-installed --find-links "$dir" --report "$tmp/all.json" \
        "${reqs[@]}" "deepspeed==$DEEPSPEED_VERSION" "torch==${torch_v%%+*}" "transformers==$transformers_v"
    "$PY" -m pip install -q --dry-run --ignore-installed --report "$tmp/base.json" "torch==${torch_v%%+*}"
    mapfile -t pins < <("$PY" - "$tmp/all.json" "$tmp/base.json" "$exclude" <<'EOF'
import json, re, sys
def names(path):
    return {i["metadata"]["name"].lower().replace("_", "-").replace(".", "-"): i["metadata"]["version"]
            for i in json.load(open(path))["install"]}
need, base = names(sys.argv[1]), names(sys.argv[2])
skip = {n.strip().lower().replace("_", "-").replace(".", "-") for n in sys.argv[3].split(",") if n.strip()}
skip |= {"deepspeed", "transformers", "tokenizers"}  # built above; the machine's own
for name, version in sorted(need.items()):
    if name not in base and name not in skip:
        print(f"{name}=={version}")
EOF
)
    local target=()
    if [[ -n $pyver ]]; then
        target=(--python-version "$pyver" --implementation cp)
        for p in manylinux1 manylinux2010 manylinux2014 manylinux_2_24 manylinux_2_26 manylinux_2_27 \
            manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
            target+=(--platform "${p}_x86_64")
        done
    fi
    say "downloading ${#pins[@]} wheels${pyver:+ for Python $pyver}: ${pins[*]}"
    "$PY" -m pip download -q --no-deps --only-binary=:all: "${target[@]}" -d "$dir" "${pins[@]}"
    say "$(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1), in $dir"
}

check() {
    local dir=$1 start logs
    start=$(date +%s)
    [[ -d $dir ]] || die "--wheels: $dir is not a folder; make one with scripts/gpu_check.sh --make-wheels DIR."
    dir=$(cd "$dir" && pwd)
    "$PY" -c "import torch, transformers" 2>/dev/null ||
        die "$PY lacks torch or transformers; the check installs everything else, not those two (set PYTHON to the Python that has them)."
    logs=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
    mapfile -t reqs < <(requirements)
    say "installing from $dir without network: ${reqs[*]}"
    if ! "$PY" -m pip install --no-index --find-links "$dir" --only-binary=:all: "${reqs[@]}" >"$logs/pip.log" 2>&1; then
        tail -n 15 "$logs/pip.log" >&2
        die "pip could not install from $dir (log: $logs/pip.log); a missing wheel is named above." 1
    fi
    say "$("$PY" -c 'import deepspeed, datasets, wandb, torch, transformers as t; print(f"torch {torch.__version__}, transformers {t.__version__}, deepspeed {deepspeed.__version__}, datasets {datasets.__version__}, wandb {wandb.__version__}")' 2>/dev/null | tail -n 1)"

    # The checkout runs from where it is; nothing may reach for the network.
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
    PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"  # the deepspeed launcher
    export PATH
    cd "$ROOT"

    local tests_rc=0 bench_rc=0 cuda
    cuda=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null | tail -n 1)
    timeout "${GPU_CHECK_TESTS_S:-420}" "$PY" -m pytest tests/test_gpu.py -m gpu -q -s -rs -p no:cacheprovider \
        >"$logs/tests.log" 2>&1 || tests_rc=$?
    local tests_line
    tests_line=$(grep -E '^[=]* ?[0-9]+ (passed|failed|skipped|error)' "$logs/tests.log" | tail -n 1 | tr -d '=' | xargs || true)
    if [[ $cuda == 0 ]]; then
        say "no CUDA device (torch.cuda.is_available() is False): GPU tests: ${tests_line:-none ran}; benchmark not run"
        say "installation worked; $(($(date +%s) - start)) s; logs in $logs"
        exit 3
    fi
    timeout "${GPU_CHECK_BENCH_S:-150}" "$PY" benchmarks/run.py --quick >"$logs/bench.log" 2>&1 || bench_rc=$?

    echo
    echo "== gpu_check summary ($cuda CUDA device(s), $(($(date +%s) - start)) s; logs in $logs)"
    echo "GPU tests: ${tests_line:-no result} (exit $tests_rc)"
    grep -E '^FAILED|^ERROR|GPU resume' "$logs/tests.log" | sed 's/^/  /' || true
    echo "benchmarks/run.py --quick (exit $bench_rc):"
    grep -E 'torch.matmul peak|gpt2-124m' "$logs/bench.log" | sed 's/^ */  /' || tail -n 20 "$logs/bench.log"
    [[ $tests_rc == 0 && $bench_rc == 0 ]]
}

case "${1:-}" in
--wheels)
    [[ $# == 2 ]] || die "usage: scripts/gpu_check.sh --wheels DIR"
    check "$2"
    ;;
--make-wheels)
    [[ $# -ge 2 ]] || die "usage: scripts/gpu_check.sh --make-wheels DIR [--python-version X.Y] [--exclude NAME,NAME]"
    dir=$2 pyver="" exclude=""
    shift 2
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --python-version) pyver=${2:?--python-version needs X.Y}; shift 2 ;;
        --exclude) exclude=${2:?--exclude needs NAME,NAME}; shift 2 ;;
        *) die "--make-wheels: unknown option $1; allowed are --python-version X.Y and --exclude NAME,NAME." ;;
        esac
    done
    make_wheels "$dir" "$pyver" "$exclude"
    ;;
*)
    die "usage: scripts/gpu_check.sh --wheels DIR | --make-wheels DIR [--python-version X.Y] [--exclude NAME,NAME]"
    ;;
esac
