"""The GPU check's helper: ``scripts/gpu_check.sh`` calls it (read that file first).

Subcommands (``python scripts/gpu_check.py SUB --help``):

- ``make-wheels DIR``: here, with network: only what the GPU machine lacks, as wheels for its
  Python (3.12, x86-64): DeepSpeed built into a pure-Python wheel, datasets and wandb and those of
  their dependencies that the machine does not have (``DEVICE_HAS``), at the versions installed in
  this environment (the ones the suite ran with).
- ``verify-wheels DIR``: without network: every wheel's dependencies are in DIR or on the machine,
  and no name comes twice (two versions stop ``pip install``).
- ``check``: the check itself, on the GPU machine (``--rehearse``: the same commands on this CPU,
  tiny shapes; ``--dry-run``: print them and check their scripts, flags and --set keys).
- ``prep`` and ``mfu``: what two of the check's commands run (the 124M data; MFU from a run).

Every check prints exactly one ``PASS <name> (<seconds>s): <figure>`` or ``FAIL <name>: <reason>``
line (``SKIP <name>: <why>`` for the GPU tests when they cannot run), and the last line counts them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_VERSION = "0.19.8"

# --------------------------------------------------------------------------------------------
# What the GPU machine has (the lent H200's image, as read on 2026-11-17; its python3 is 3.12.3 at
# /opt/torch/.venv/bin/python3 with torch 2.11.0 and transformers 5.17.0). Wheels are made for the
# rest only; ``--also`` adds names, and the check prints each requirement the machine's own
# versions miss.
DEVICE_PYTHON = "3.12"
DEVICE_HAS = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
    build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
    cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
    equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch
    grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
    interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
    lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
    multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
    nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
    nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
    onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
    pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
    setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
    typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
    xxhash yarl zipp""".split()
)
# Never fetched, whatever --also says: large, and the machine has them.
NEVER_FETCH = frozenset({"numpy", "pandas", "pyarrow", "matplotlib", "torch", "transformers"})
ROOTS = ("deepspeed", "datasets", "wandb")
# Shipped although the machine has it: pydantic (DeepSpeed's config) needs typing-extensions>=4.16,
# and the machine's version was never read; a newer one shadowing it is harmless (45 kB).
ALSO = ("typing-extensions",)
# The oldest releases dsinstab runs with, where pyproject.toml pins newer ones (the lent H200 has
# torch 2.11.0 and transformers 5.17.0; pyproject: torch==2.13.0, transformers>=5.23):
MIN_VERSIONS = {
    # the newest torch API dsinstab calls: torch.nn.utils.get_total_norm (dsinstab/run/engine.py)
    "torch": ("2.6", "which brings torch.nn.utils.get_total_norm, the newest torch API dsinstab calls"),
    # not an API bound: the oldest release the suite has been run with (transformers 5.17.0 with
    # huggingface-hub 1.33.0, as on the H200: tests/test_model.py, test_architecture.py,
    # test_train.py, test_resume.py passed on the CPU, 2026-12-02)
    "transformers": ("5.17", "the oldest release dsinstab's tests have passed with"),
}
# Datasheet dense peaks (TFLOP/s, bf16 and fp16 tensor cores, no sparsity), by device name.
DATASHEET_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "A100": 312.0}  # fmt: skip

MARKER_ENV = {
    "python_version": DEVICE_PYTHON,
    "python_full_version": DEVICE_PYTHON + ".3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def say(msg: str) -> None:
    print(f"gpu_check: {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Wheels


def closure(roots, also=(), have=DEVICE_HAS) -> tuple[dict, list]:
    """``({name: version}, [(dep, specifier, needed_by)])``: ``roots`` and their dependencies (for
    the device's Python) that the machine lacks, at this environment's versions; the second list
    holds the requirements that fall to the machine's own packages."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    pins, on_device, todo, also = {}, [], [*roots, *also], {norm(a) for a in also}
    while todo:
        name = norm(todo.pop())
        if name in pins:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(
                f"make-wheels: {name} is not installed in {sys.executable}; install the project "
                f"(pip install -e '.[dev]') or pin it by hand."
            ) from None
        pins[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(MARKER_ENV):
                continue  # an extra, or not for the machine's Python
            dep = norm(req.name)
            if dep in NEVER_FETCH or (dep in have and dep not in also):
                on_device.append((dep, str(req.specifier), name))
            else:
                todo.append(dep)
    return pins, on_device


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    name = re.search(r"^Name: (.+)$", text, re.M).group(1).strip()
    version = re.search(r"^Version: (.+)$", text, re.M).group(1).strip()
    return norm(name), version, re.findall(r"^Requires-Dist: (.+)$", text, re.M)


def verify_wheels(folder: Path) -> list[str]:
    """What stops an offline ``pip install --no-deps`` of ``folder/*.whl`` from working on the
    machine: a name twice, a dependency neither in the folder nor on the machine. Empty: none."""
    from packaging.requirements import Requirement

    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return [f"{folder} holds no wheels; make them with scripts/gpu_check.sh --make-wheels {folder}"]
    problems, names = [], {}
    metas = [wheel_metadata(w) for w in wheels]
    for (name, _version, _), w in zip(metas, wheels):
        if name in names:
            problems.append(f"{name} comes twice ({names[name]} and {w.name}): keep one")
        names[name] = w.name
    for name, _, reqs in metas:
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(MARKER_ENV):
                continue
            dep = norm(req.name)
            if dep not in names and dep not in DEVICE_HAS:
                problems.append(f"{name} needs {req}, which is neither a wheel here nor on the GPU machine")
    for w in wheels:
        tags = w.name[:-4].split("-")[-3:]
        if tags[0] not in ("py3", "py312", "cp312", f"py{DEVICE_PYTHON.replace('.', '')}") or not (
            tags[2] == "any" or "x86_64" in tags[2]
        ):
            problems.append(f"{w.name} is not for CPython {DEVICE_PYTHON} on x86-64")
    return problems


def make_wheels(args) -> int:
    folder = Path(args.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()  # two versions of one name stop the install on the machine
    roots = [r for r in ROOTS if not (args.no_wandb and r == "wandb")]
    also = [*ALSO, *(a.strip() for a in (args.also or "").split(",") if a.strip())]
    refused = sorted(set(map(norm, also)) & NEVER_FETCH)
    if refused:
        raise SystemExit(
            f"make-wheels: {', '.join(refused)} stay out: the GPU machine has them and they are large."
        )
    pins, on_device = closure(roots, also)
    say(f"building deepspeed {DEEPSPEED_VERSION} into a pure-Python wheel")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            f"deepspeed=={DEEPSPEED_VERSION}",
            "-w",
            str(folder),
        ],
        check=True,
    )
    rest = sorted(f"{n}=={v}" for n, v in pins.items() if n != "deepspeed")
    say(f"downloading {len(rest)} wheels for CPython {DEVICE_PYTHON}: {' '.join(rest)}")
    target = ["--python-version", DEVICE_PYTHON, "--implementation", "cp"]
    for p in PLATFORMS:
        target += ["--platform", p]
    subprocess.run(
        [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *target, "-d", str(folder), *rest],
        check=True,
    )
    problems = verify_wheels(folder)
    for p in problems:
        say(f"problem: {p}")
    size = sum(w.stat().st_size for w in folder.glob("*.whl"))
    for w in sorted(folder.glob("*.whl")):
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    say(f"{len(list(folder.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB, in {folder}")
    if args.no_wandb:
        say("wandb left out (--no-wandb): the check then runs every command with utils.report_to=none")
    wants = sorted({f"{d}{s}" for d, s, _ in on_device if s})
    say(f"left to the GPU machine (it has them; the check reports any version these miss): {' '.join(wants)}")
    return 1 if problems else 0


# --------------------------------------------------------------------------------------------
# Reading runs (no dsinstab import: the check's own process stays light)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a record cut short by a kill
    return rows


def num(v) -> float:
    return float(v)  # metrics.jsonl writes non-finite values as the strings "inf", "-inf", "nan"


def status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def train_rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]


def evals(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], num(r["eval/loss"])) for r in read_jsonl(run / "metrics.jsonl") if "eval/loss" in r]


def steps_per_s(rows: list[dict], skip: int = 10) -> float:
    """Optimizer steps per second of wall clock between logged steps past the first ``skip``."""
    rows = [r for r in rows if r["step"] > skip] or rows
    if len(rows) < 2 or rows[-1]["time"] <= rows[0]["time"]:
        return float("nan")
    return (rows[-1]["step"] - rows[0]["step"]) / (rows[-1]["time"] - rows[0]["time"])


class Fail(Exception):
    pass


def expect(cond, reason: str) -> None:
    if not cond:
        raise Fail(reason)


def finished(run: Path, steps: int, rc: int, log: Path) -> dict:
    st = status(run)
    expect(rc == 0, f"exit code {rc} ({st.get('state', 'no status.json')}): {tail(log)}")
    expect(
        (st.get("state"), st.get("step")) == ("finished", steps),
        f"status {st.get('state')} at step {st.get('step')}, not finished at {steps}",
    )
    rows = train_rows(run)
    expect([r["step"] for r in rows] == list(range(1, steps + 1)), f"logged steps {len(rows)} of {steps}")
    bad = [r["step"] for r in rows if not math.isfinite(num(r["train/loss"]))]
    expect(not bad, f"non-finite train/loss at steps {bad[:5]}")
    return st


def tail(log: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    keep = [ln for ln in lines if re.search(r"error|Error|refus|Traceback|FAILED|assert", ln)] or lines
    return " | ".join(x.strip()[:200] for x in keep[-n:])


# --------------------------------------------------------------------------------------------
# The plan


@dataclass
class Ctx:
    mode: str  # gpu | rehearse | dry-run
    work: Path
    logs: Path
    start: float
    budget: float
    python: str = sys.executable
    wandb: bool = True
    results: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    procs: set = field(default_factory=set)
    counts: dict = field(default_factory=lambda: {"PASS": 0, "FAIL": 0, "SKIP": 0})

    @property
    def gpu(self) -> bool:
        """The GPU plan: on the GPU machine, and what a dry run prints and checks."""
        return self.mode in ("gpu", "dry-run")

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def out(self, name: str) -> Path:
        return self.work / "runs" / name

    def common(self, name: str, wandb: bool = False) -> list[str]:
        sets = [f"utils.output_dir={self.work / 'runs'}", f"utils.cache_dir={self.work / 'cache'}"]
        sets += [f"utils.run_name={name}", "utils.progress_bar=false"]
        return sets + ([] if wandb and self.wandb else ["utils.report_to=none"])

    def deepspeed(self) -> list[str]:
        exe = shutil.which("deepspeed") or str(Path(self.python).parent / "deepspeed")
        return [exe, "--master_port", str(free_port())]

    def script(self, name: str) -> str:
        return str(ROOT / "scripts" / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The shape every small run trains on the CPU in a rehearsal (the GPU runs keep the README's
# default 4.3M model); the spike and replay run takes it on the GPU too, as tests/test_gpu.py does.
TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.seq_len=64",
    "dataset.vocab_size=512",
    "dataset.max_chars=400000",
    "trainer.micro_batch_size=4",
]
# configs/zoo/fp16-collapse.yaml: the tiny model's fp16 collapse, for the rehearsal's pair
TINY_COLLAPSE = [
    *TINY[:6],
    "trainer.micro_batch_size=8",
    "trainer.lr=0.3",
    "trainer.grad_clip=0",
    "trainer.weight_decay=0",
    "trainer.warmup_steps=10",
    "trainer.max_steps=100",
    "trainer.eval_every=50",
    "trainer.eval_batches=4",
]
# The gpt2-124m preset's shape on the built-in corpus with a BPE trained there (no hub, no
# network), as benchmarks/sections.py's model section runs it; 40 steps, the last 30 timed.
LOCAL_124M = [
    "dataset.source=builtin",
    "dataset.name=",
    "dataset.config_name=",
    "dataset.tokenizer=bpe",
    "dataset.num_proc=8",
]
RUN_124M = [
    "trainer.max_steps=40",
    "trainer.warmup_steps=10",
    "trainer.log_every=1",
    "trainer.eval_every=40",
    "trainer.eval_batches=2",
    "trainer.checkpoint_every=0",
]
RESUME_RTOL = 1e-3  # tests/test_gpu.py: a GPU's atomics add in a varying order


@dataclass
class Cmd:
    argv: list[str]
    timeout: int
    validate: list[str] | None = None  # train.py arguments a dry run resolves with --dry-run


@dataclass
class Check:
    name: str
    budget: int  # seconds, all its commands together
    commands: list[Cmd]
    judge: object  # judge(ctx, check) -> figure; raises Fail
    after: tuple[str, ...] = ()  # checks whose results it reads
    background: bool = False  # its lane runs on into the later phases


def small(ctx: Ctx) -> list[str]:
    return [] if ctx.gpu else TINY


def train_cmd(
    ctx: Ctx, name: str, ds: str, sets: list[str], preset: str | None = None, wandb=False
) -> list[str]:
    head = [*ctx.deepspeed(), ctx.script("train.py"), "--ds_config", f"ds_configs/{ds}.json"]
    head += ["--preset", preset] if preset else []
    return [*head, "--set", *sets, *ctx.common(name, wandb)]


def plan(ctx: Ctx) -> list[list[Check]]:
    """Phases, run one after the other; in each phase, lanes of checks run side by side (the small
    runs barely use an H200), one lane's checks one after another. The 124M run is timed alone."""
    steps = 100
    readme = {}
    for prec in ("bf16", "fp16"):
        sets = [f"trainer.max_steps={steps}", *small(ctx)]
        readme[prec] = Check(
            f"readme-{prec}",
            150,
            [Cmd(train_cmd(ctx, f"readme-{prec}", f"zero2_{prec}", sets, wandb=True), 150)],
            judge_readme,
        )
    pair_sets = [] if ctx.gpu else TINY_COLLAPSE  # on a GPU the preset as shipped (100 steps)
    pair = Check(
        "fp16-collapse",
        220,
        [
            Cmd(
                [
                    ctx.python,
                    ctx.script("fp16_vs_bf16.py"),
                    "--preset",
                    "fp16-collapse",
                    "--set",
                    *pair_sets,
                    *ctx.common("pair"),
                ],
                220,
            )
        ],
        judge_pair,
    )
    probes = "attn_logits,out_logits,layer_norms,adam,activations"
    probe_sets = [
        f"trainer.max_steps={steps}",
        "trainer.diagnostics.every=10",
        f"trainer.diagnostics.probes={probes}",
    ]
    probe = Check(
        "probe",
        100,
        [Cmd(train_cmd(ctx, "probe", "zero2_bf16", [*probe_sets, *small(ctx)], "attn-logit-growth"), 100)],
        judge_probe,
    )
    mitig_sets = [f"trainer.max_steps={steps}", "trainer.mitigations.qk_clip_tau=100"]
    mitigation = Check(
        "mitigation",
        100,
        [Cmd(train_cmd(ctx, "qk-clip", "zero2_bf16", [*mitig_sets, *small(ctx)], "attn-logit-growth"), 100)],
        judge_mitigation,
        after=("probe",),
    )
    # tests/test_gpu.py's spike: a fault at step 30 fires at step 31; replayed from step-20
    spike_sets = [*TINY, "trainer.max_steps=40", "trainer.eval_every=20", "trainer.eval_batches=2"]
    spike_sets += ["trainer.checkpoint_every=10", "trainer.keep_checkpoints=5", "trainer.inject.at_step=30"]
    spike_sets += ["trainer.spikes.window=20", "trainer.spikes.warmup=10"]
    replay_argv = [
        ctx.python,
        ctx.script("replay.py"),
        str(ctx.out("spiky")),
        "--at",
        "31",
        "--from",
        "step-20",
    ]
    replay_argv += ["--window", "3", "--intervene", "skip=2", "--out", str(ctx.out("spiky-replay"))]
    replay = Check(
        "spike-replay",
        200,
        [Cmd(train_cmd(ctx, "spiky", "zero2_bf16", spike_sets), 80), Cmd(replay_argv, 150)],
        judge_replay,
    )
    # the README bf16 run again, SIGKILLed after its first checkpoint, resumed with --resume latest
    kill_sets = [f"trainer.max_steps={steps}", "trainer.checkpoint_every=20", *small(ctx)]
    killed = train_cmd(ctx, "killed", "zero2_bf16", kill_sets)
    resume = Check(
        "kill-resume",
        180,
        [Cmd(killed, 90), Cmd([*ctx.deepspeed(), *killed[3:], "--resume", "latest"], 90)],
        judge_resume,
        after=("readme-bf16",),
    )
    over = (
        [*LOCAL_124M, *RUN_124M] if ctx.gpu else [*LOCAL_124M, *RUN_124M, *TINY, "trainer.micro_batch_size=2"]
    )
    prep = Check(
        "prep-124m",
        300,
        [Cmd([ctx.python, __file__, "prep", "--cache", str(ctx.work / "cache"), "--set", *over], 300)],
        judge_prep,
        background=True,
    )
    mfu_run = train_cmd(ctx, "gpt2-124m", "zero2_bf16", over, "gpt2-124m")
    mfu = Check(
        "mfu-124m",
        150,
        [
            Cmd(mfu_run, 120),
            Cmd([ctx.python, __file__, "mfu", str(ctx.out("gpt2-124m")), "--set", *over], 60),
        ],
        judge_mfu,
        after=("prep-124m",),
    )
    pytest_argv = [
        ctx.python,
        "-m",
        "pytest",
        "tests/test_gpu.py",
        "-m",
        "gpu",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
    ]
    pytest_argv += ["-n", "3"] if ctx.gpu else []
    gpu_tests = Check("pytest-gpu", 0, [Cmd(pytest_argv, 0)], judge_pytest)
    return [
        [[readme["bf16"]], [prep]],
        [[readme["fp16"]], [pair], [probe, mitigation], [replay], [resume]],
        [[mfu]],
        [[gpu_tests]],
    ]


# --------------------------------------------------------------------------------------------
# Running


def env_for(ctx: Ctx) -> dict:
    e = dict(os.environ)
    e.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="2" if ctx.gpu else "1",
    )
    pp = [str(ROOT)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p]
    e["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pp))
    return e


def start(ctx: Ctx, argv: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "ab")
    f.write(f"$ {shlex.join(argv)}\n".encode())
    f.flush()
    p = subprocess.Popen(
        argv, cwd=ROOT, env=env_for(ctx), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
    )
    f.close()
    with ctx.lock:
        ctx.procs.add(p)
    return p


def finish(ctx: Ctx, p: subprocess.Popen, timeout: float) -> int:
    """The exit code; past ``timeout`` the whole process group is killed and 124 returned."""
    try:
        return p.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGUSR1)  # scripts/train.py prints every thread's stack
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return 124
    finally:
        with ctx.lock:
            ctx.procs.discard(p)


def run(ctx: Ctx, cmd: Cmd, log: Path, deadline: float) -> int:
    return finish(ctx, start(ctx, cmd.argv, log), min(cmd.timeout or 1e9, deadline - time.time()))


def report(ctx: Ctx, check: Check, verdict: str, text: str, seconds: float | None = None) -> None:
    line = (
        f"{verdict} {check.name} ({seconds:.0f}s): {text}"
        if verdict == "PASS"
        else f"{verdict} {check.name}: {text}"
    )
    with ctx.lock:
        ctx.counts[verdict] += 1
        ctx.results[check.name] = verdict
        print(line, flush=True)
        with open(ctx.logs / "summary.txt", "a") as f:
            f.write(line + "\n")


def run_check(ctx: Ctx, check: Check) -> None:
    for dep in check.after:  # a check that reads another's result waits for it
        while ctx.results.get(dep) is None and ctx.left() > 30:
            time.sleep(0.5)
    t0 = time.time()
    log = ctx.logs / f"{check.name}.log"
    budget = check.budget or ctx.left() - 10
    deadline = t0 + min(budget, ctx.left() - 5)
    if deadline - time.time() < 10:
        return report(ctx, check, "FAIL", f"not run: {ctx.left():.0f} s of the check's budget left")
    check.log, check.deadline = log, deadline
    try:
        figure = check.judge(ctx, check)
    except Fail as e:
        return report(ctx, check, "FAIL", str(e))
    except Exception as e:  # a bug of the check itself is still one line
        return report(ctx, check, "FAIL", f"the check broke: {type(e).__name__}: {e}")
    if isinstance(figure, tuple):  # ("SKIP", why)
        return report(ctx, check, *figure)
    report(ctx, check, "PASS", figure, time.time() - t0)


def run_all(ctx: Ctx, phases) -> None:
    """Phase after phase; a phase's lanes side by side. A lane whose first check is ``background``
    runs on through the later phases (the 124M data, prepared on the CPU while the small runs
    train); the last phase starts once every lane has ended."""
    background = []
    for i, phase in enumerate(phases):
        if i == len(phases) - 1:
            for t in background:
                t.join()
        threads = []
        for lane in phase:
            t = threading.Thread(target=lambda lane=lane: [run_check(ctx, c) for c in lane], daemon=True)
            t.start()
            (background if lane[0].background else threads).append(t)
        for t in threads:
            t.join()


# --------------------------------------------------------------------------------------------
# The judges: each runs its commands and returns the figure of its PASS line


def judge_readme(ctx: Ctx, check: Check) -> str:
    cmd = check.commands[0]
    rc = run(ctx, cmd, check.log, check.deadline)
    name = check.name
    run_dir = ctx.out(name)
    finished(run_dir, 100, rc, check.log)
    ev = evals(run_dir)
    expect(len(ev) >= 2 and ev[-1][1] < ev[0][1] - 1.0, f"eval loss did not fall by 1.0: {ev}")
    rows = train_rows(run_dir)
    fig = f"eval loss {ev[0][1]:.3f} -> {ev[-1][1]:.3f} in 100 steps, {steps_per_s(rows):.1f} steps/s"
    if "fp16" in name:
        scales = [num(r["train/loss_scale"]) for r in rows]
        skipped = rows[-1].get("train/skipped_steps", 0)
        expect(
            min(scales) >= 1 and skipped < 20, f"loss scale fell to {min(scales)}, {skipped} skipped steps"
        )
        fig += f", loss scale {scales[-1]:g} at the end, {skipped} skipped steps"
    where = weights_device(ctx, run_dir)
    if ctx.gpu:
        expect(where == "cuda", f"the checkpoint's weights lived on {where}, not cuda")
    return (
        fig + (f", weights on {where}" if where else "") + (", wandb offline" if ctx.wandb else ", wandb off")
    )


def weights_device(ctx: Ctx, run_dir: Path) -> str:
    """Where the run's weights lived (DeepSpeed saves the tensors as they were), read in a child
    process: the check's own process never touches the GPU."""
    ckpts = run_dir / "checkpoints"
    if not (ckpts / "latest").exists():
        return ""
    tag = (ckpts / "latest").read_text().strip()
    code = (
        "import sys, torch; s = torch.load(sys.argv[1], weights_only=False); "
        "print(next(iter(s['module'].values())).device.type)"
    )
    p = subprocess.run(
        [ctx.python, "-c", code, str(ckpts / tag / "mp_rank_00_model_states.pt")],
        capture_output=True, text=True, timeout=120, env=env_for(ctx),
    )  # fmt: skip
    return p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else "unknown"


def judge_pair(ctx: Ctx, check: Check) -> str:
    rc = run(ctx, check.commands[0], check.log, check.deadline)
    steps = 100  # the preset's max_steps, and the rehearsal's
    fp16, bf16 = status(ctx.out("pair-fp16")), status(ctx.out("pair-bf16"))
    expect(fp16 and bf16, f"exit code {rc}, no status.json for both runs: {tail(check.log)}")
    expect(
        fp16.get("state") == "min_loss_scale"
        and fp16.get("exit_code") == 3
        and fp16.get("step", steps) < steps,
        f"fp16 did not die at its minimum loss scale: {fp16.get('state')} at step {fp16.get('step')}",
    )
    kinds = {e.get("kind") for e in read_jsonl(ctx.out("pair-fp16") / "events.jsonl")}
    expect("loss_scale_minimum" in kinds, f"no loss_scale_minimum event in fp16's events ({sorted(kinds)})")
    expect(
        (bf16.get("state"), bf16.get("step")) == ("finished", steps),
        f"bf16: {bf16.get('state')} at {bf16.get('step')}",
    )
    expect(
        all(math.isfinite(num(r["train/loss"])) for r in train_rows(ctx.out("pair-bf16"))),
        "bf16 loss non-finite",
    )
    html = ctx.out("pair-report") / "report.html"
    expect(html.exists() and html.stat().st_size > 10_000, f"no report.html ({tail(check.log)})")
    ev = evals(ctx.out("pair-bf16"))
    return (
        f"fp16 died at its minimum loss scale at step {fp16['step']}, bf16 finished {steps} steps "
        f"(eval loss {ev[-1][1]:.3f}), report.html {html.stat().st_size // 1024} kB"
    )


def attn_max(rows: list[dict]) -> float:
    last = [r for r in rows if any(k.startswith("diag/attn_logit_max/") for k in r)]
    if not last:
        return float("nan")
    return max(num(v) for k, v in last[-1].items() if k.startswith("diag/attn_logit_max/"))


def judge_probe(ctx: Ctx, check: Check) -> str:
    rc = run(ctx, check.commands[0], check.log, check.deadline)
    run_dir = ctx.out("probe")
    finished(run_dir, 100, rc, check.log)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    families = (
        "diag/attn_logit_max/",
        "diag/out_logit_max",
        "diag/grad_norm/",
        "diag/adam_rms_over_eps/",
        "diag/act_rms/",
    )
    probed = [r["step"] for r in rows if any(k.startswith("diag/") for k in r)]
    expect(probed == list(range(10, 101, 10)), f"probe steps {probed}, not every 10th")
    missing = [f for f in families if not any(k.startswith(f) for r in rows for k in r)]
    expect(not missing, f"no {', '.join(missing)} series")
    series = {k for r in rows for k in r if k.startswith("diag/")}
    first = [r for r in rows if any(k.startswith("diag/attn_logit_max/") for k in r)][0]
    a0 = max(num(v) for k, v in first.items() if k.startswith("diag/attn_logit_max/"))
    return (
        f"all 5 probes on {len(probed)} steps ({len(series)} diag/ series); largest attention logit "
        f"{a0:,.1f} at step 10 -> {attn_max(rows):,.1f} at step 100 (attn-logit-growth preset)"
    )


def judge_mitigation(ctx: Ctx, check: Check) -> str:
    rc = run(ctx, check.commands[0], check.log, check.deadline)
    run_dir = ctx.out("qk-clip")
    finished(run_dir, 100, rc, check.log)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    clipped = [num(r["mitig/qk_clipped_total"]) for r in rows if "mitig/qk_clipped_total" in r]
    expect(clipped, "no mitig/qk_clipped_total logged: qk_clip did not run")
    with_clip, without = attn_max(rows), attn_max(read_jsonl(ctx.out("probe") / "metrics.jsonl"))
    if math.isfinite(without) and without > 150:
        expect(
            with_clip < without,
            f"largest attention logit {with_clip:,.1f} with qk_clip, {without:,.1f} without",
        )
    return (
        f"qk_clip (tau 100) rescaled {clipped[-1]:.0f} head(s) in 100 steps; largest attention logit at "
        f"step 100: {with_clip:,.1f} with it, {without:,.1f} in the probe run without it"
    )


def judge_replay(ctx: Ctx, check: Check) -> str:
    train, replay = check.commands
    rc = run(ctx, train, check.log, check.deadline)
    spiky = ctx.out("spiky")
    finished(spiky, 40, rc, check.log)
    fired = [
        (e["step"], e["kind"]) for e in read_jsonl(spiky / "events.jsonl") if e.get("kind") == "loss_spike"
    ]
    expect(
        fired[:1] == [(31, "loss_spike")],
        f"the injected fault at step 30 fired {fired[:3]}, not a loss spike at 31",
    )
    expect((spiky / "checkpoints" / "step-20").is_dir(), "no step-20 checkpoint to replay from")
    mark = check.log.stat().st_size
    rc = run(ctx, replay, check.log, check.deadline)
    out = check.log.read_bytes()[mark:].decode(errors="replace").splitlines()
    expect(rc == 0, f"replay.py exit code {rc}: {tail(check.log)}")
    first = next((ln for ln in out if ln.startswith("replay ")), "(no 'replay ...' line)")
    summary = json.loads((ctx.out("spiky-replay") / "report" / "summary.json").read_text())
    recurred = {r["branch"]: r["recurred"] for r in summary["branches"]}
    expect(
        recurred.get("plain") is True and recurred.get("skip-2") is False,
        f"recurred {recurred}: the plain replay should keep the spike, skip-2 remove it",
    )
    return f"spike at step 31 replayed from step-20: '{first}'; the plain replay kept it, skip-2 removed it"


def judge_resume(ctx: Ctx, check: Check) -> str:
    first, again = check.commands
    run_dir = ctx.out("killed")
    p = start(ctx, first.argv, check.log)
    deadline = min(time.time() + first.timeout, check.deadline)
    latest, killed_at = run_dir / "checkpoints" / "latest", None
    try:
        while time.time() < deadline and p.poll() is None:
            rows = train_rows(run_dir) if latest.exists() else []
            if rows and rows[-1]["step"] > int(latest.read_text().strip().split("-")[-1]):
                killed_at = rows[-1]["step"]
                os.killpg(p.pid, signal.SIGKILL)  # the launcher and its rank, no chance to save
                break
            time.sleep(0.02)
    finally:
        rc = finish(ctx, p, 5)
    expect(
        killed_at is not None, f"not killed: the run ended first (exit {rc}) or made no checkpoint in time"
    )
    tag = latest.read_text().strip()
    rc = run(ctx, again, check.log, check.deadline)
    finished(run_dir, 100, rc, check.log)
    text = check.log.read_text(errors="replace")
    expect(f"resumed from {tag} at step {tag.split('-')[-1]}" in text, f"no 'resumed from {tag}' line")
    base = {r["step"]: r for r in train_rows(ctx.out("readme-bf16"))}
    expect(len(base) == 100, "the unbroken run (readme-bf16) did not finish: nothing to compare with")
    worst = 0.0
    for r in train_rows(run_dir):
        a, b = num(base[r["step"]]["train/loss"]), num(r["train/loss"])
        worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    expect(worst <= RESUME_RTOL, f"train/loss differs from the unbroken run by up to {worst:.2e} (relative)")
    same = "bit-identical to" if worst == 0 else f"within {worst:.1e} (relative) of"
    return f"SIGKILL at step {killed_at}, resumed from {tag}, finished 100 steps; train/loss {same} the unbroken run"


def judge_prep(ctx: Ctx, check: Check) -> str:
    rc = run(ctx, check.commands[0], check.log, check.deadline)
    expect(rc == 0, f"exit code {rc}: {tail(check.log)}")
    lines = check.log.read_text(errors="replace").splitlines()
    return next((ln[len("PREP ") :] for ln in lines if ln.startswith("PREP ")), "(no PREP line)")


def judge_mfu(ctx: Ctx, check: Check) -> str:
    train, mfu = check.commands
    rc = run(ctx, train, check.log, check.deadline)
    run_dir = ctx.out("gpt2-124m")
    finished(run_dir, 40, rc, check.log)
    mark = check.log.stat().st_size
    rc = run(ctx, mfu, check.log, check.deadline)
    expect(rc == 0, f"the MFU computation failed (exit {rc}): {tail(check.log)}")
    lines = check.log.read_bytes()[mark:].decode(errors="replace").splitlines()
    return next((ln[len("MFU ") :] for ln in lines if ln.startswith("MFU ")), "(no MFU line)")


def judge_pytest(ctx: Ctx, check: Check) -> str | tuple:
    need = 200 if ctx.gpu else 60
    if ctx.left() - 10 < need:
        return ("SKIP", f"{ctx.left():.0f} s of the budget left, the GPU tests need about {need}")
    rc = run(ctx, check.commands[0], check.log, check.deadline)
    text = check.log.read_text(errors="replace")
    counts = re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected)", text.splitlines()[-1] if text else ""
    )
    line = ", ".join(f"{n} {w}" for n, w in counts) or tail(check.log, 1)
    if rc == 124:
        raise Fail(f"stopped at the budget's end ({line})")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    expect(rc in (0, 5) and not failed, f"exit code {rc}: {line}; {' '.join(failed)}")
    if counts and all(w in ("skipped", "deselected") for _, w in counts):
        return ("SKIP", f"{line}: {'no CUDA device' if not ctx.gpu else 'see the log'}")
    return f"tests/test_gpu.py -m gpu: {line}"


# --------------------------------------------------------------------------------------------
# prep and mfu: what two of the check's commands run


def cmd_prep(args) -> int:
    sys.path.insert(0, str(ROOT))
    from benchmarks.basics import config
    from dsinstab.run.data import prepare_data

    t0 = time.time()
    cfg = config(ROOT / "ds_configs" / "zero2_bf16.json", *args.set, preset="gpt2-124m")
    data = prepare_data(cfg.dataset, cfg.model.seq_len, args.cache, log=print, progress=False)
    print(
        f"PREP {len(data.train):,} train / {len(data.validation):,} validation blocks of {cfg.model.seq_len + 1} "
        f"tokens, vocabulary {cfg.dataset.vocab_size:,} (BPE on the built-in corpus), in {time.time() - t0:.0f} s"
    )
    return 0


def cmd_mfu(args) -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.basics import config, flops, flops_per_token, matmul_peak, n_parameters, tokens_per_step

    cfg = config(ROOT / "ds_configs" / "zero2_bf16.json", *args.set, preset="gpt2-124m")
    # wall clock from the end of step 10 to the end of step max-1: the final step's evaluation and
    # the start-up (compilation, allocator warm-up) stay out
    rows = [r for r in train_rows(Path(args.run)) if 10 <= r["step"] < cfg.trainer.max_steps]
    sps = steps_per_s(rows, skip=0)
    tps = sps * tokens_per_step(cfg)
    n = n_parameters(cfg)
    achieved = flops_per_token(cfg, n) * tps
    peak, size = matmul_peak(torch.bfloat16)
    text = (
        f"{n / 1e6:.1f}M parameters, {tokens_per_step(cfg):,} tokens/step, {tps:,.0f} tokens/s over steps "
        f"{rows[0]['step'] + 1}-{rows[-1]['step']}: {flops(achieved)}, MFU {achieved / peak:.1%} of the measured "
        f"bf16 matmul peak ({flops(peak)}, {size}^3)"
    )
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        sheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)
        text += (
            f", {achieved / (sheet * 1e12):.1%} of the datasheet's {sheet:g} TFLOP/s ({name}, bf16 dense)"
            if sheet
            else f"; no datasheet peak known for {name}"
        )
    else:
        text += "; on a CPU: no datasheet peak"
    print("MFU " + text)
    return 0


# --------------------------------------------------------------------------------------------
# Before the runs: versions, and the dry run's checks


def versions(ctx: Ctx) -> dict:
    code = r"""
import importlib, json, importlib.metadata as md
out = {}
for mod, dist in [("torch", "torch"), ("transformers", "transformers"), ("deepspeed", "deepspeed"),
                  ("datasets", "datasets"), ("wandb", "wandb"), ("tokenizers", "tokenizers"),
                  ("pyarrow", "pyarrow"), ("numpy", "numpy"), ("huggingface_hub", "huggingface-hub"),
                  ("pydantic", "pydantic"), ("fsspec", "fsspec")]:
    try:
        m = importlib.import_module(mod)
        out[mod] = [getattr(m, "__version__", md.version(dist)), str(getattr(m, "__file__", ""))]
    except Exception as e:
        out[mod] = [None, f"{type(e).__name__}: {e}"]
import torch
out["cuda"] = [torch.cuda.device_count() if torch.cuda.is_available() else 0,
               torch.cuda.get_device_name() if torch.cuda.is_available() else ""]
print("VERSIONS " + json.dumps(out))
"""
    p = subprocess.run([ctx.python, "-c", code], capture_output=True, text=True, env=env_for(ctx), timeout=90)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("VERSIONS ")), None)
    if line is None:
        raise SystemExit(f"gpu_check: {ctx.python} could not import torch: {p.stderr.strip()[-500:]}")
    return json.loads(line[len("VERSIONS ") :])


def pyproject_pins() -> dict:
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1))
    return {norm(re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0]): d for d in deps}


def refuse_old(found: dict) -> list[str]:
    """Notes on versions below pyproject's pins; SystemExit (one sentence) below dsinstab's minimums."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    pins, notes = pyproject_pins(), []
    for name, (least, why) in MIN_VERSIONS.items():
        v = found[name][0]
        if v is None:
            raise SystemExit(f"gpu_check: refusing: {name} does not import ({found[name][1]}).")
        have = Version(v.split("+")[0])
        if have < Version(least):
            raise SystemExit(
                f"gpu_check: refusing: {name} {v} is older than {least}, {why} (pyproject.toml pins {pins[name]})."
            )
        spec = SpecifierSet(pins[name].removeprefix(name))
        if have not in spec:
            notes.append(f"{name} {v} (pyproject.toml pins {pins[name]}; dsinstab needs >= {least}, {why})")
    return notes


def unmet_requirements(target: str | None) -> list[str]:
    """Requirements of the packages installed into ``target`` that this Python's packages miss."""
    if not target or not Path(target).is_dir():
        return []
    import importlib.metadata as md

    from packaging.requirements import Requirement

    out = []
    for dist in md.distributions(path=[target]):
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                out.append(f"{dist.metadata['Name']} needs {req} (missing)")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                out.append(f"{dist.metadata['Name']} needs {req} (found {have})")
    return sorted(set(out))


def env_for_dry(python: str) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *[p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p]]
    )
    return e


def script_of(argv: list[str]) -> tuple[list[str], int]:
    """(what ``--help`` is asked of, index of the script in argv)."""
    for i, a in enumerate(argv):
        if a.endswith(".py"):
            return [sys.executable, a], i
        if a == "-m":
            return [sys.executable, "-m", argv[i + 1]], i + 1
    raise ValueError(f"no script in {argv}")


def dry_run(ctx: Ctx, phases) -> int:
    """Print every command the check would run and check it here: the script exists, each of its
    flags is one its --help names, and train.py resolves each run's config (--dry-run, in one child
    process that runs while the flags are checked)."""
    checks = [c for phase in phases for lane in phase for c in lane]
    problems, helps, validate, todo = [], {}, [], []
    for check in checks:
        print(f"== {check.name} (budget {check.budget or 'what is left'} s)")
        for cmd in check.commands:
            print(f"   $ {shlex.join(cmd.argv)}" + (f"   [timeout {cmd.timeout} s]" if cmd.timeout else ""))
            argv0, i = script_of(cmd.argv)
            if argv0[-1] == __file__:
                argv0 = [sys.executable, __file__, cmd.argv[i + 1]]
            name, rest = Path(argv0[-1]).name, cmd.argv[i + 1 :]
            todo.append((check, cmd, argv0, i, name, rest))
            if name == "train.py":
                validate.append((check.name, [a for a in rest if a not in ("--resume", "latest")]))
            elif name == "fp16_vs_bf16.py":
                sets = rest[rest.index("--set") + 1 :]
                for prec in ("fp16", "bf16"):
                    validate.append((check.name, ["--ds_config", f"ds_configs/zero2_{prec}.json", "--preset",
                                                  rest[rest.index("--preset") + 1], "--set", *sets]))  # fmt: skip
            elif name in ("prep", "mfu"):
                validate.append(
                    (check.name, ["--preset", "gpt2-124m", "--set", *rest[rest.index("--set") + 1 :]])
                )
    child = subprocess.Popen(
        [sys.executable, __file__, "validate", json.dumps(validate)] if validate else [sys.executable, "-c", ""],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env_for_dry(ctx.python),
    )  # fmt: skip
    # every script's --help at once, beside the child (fp16_vs_bf16.py's imports take seconds)
    for _, _, argv0, _, _, _ in todo:
        if tuple(argv0) not in helps and (not argv0[-1].endswith(".py") or Path(argv0[-1]).is_file()):
            helps[tuple(argv0)] = subprocess.Popen(
                [*argv0, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                env=env_for_dry(ctx.python),
            )  # fmt: skip
    for key, pr in helps.items():
        text = pr.communicate(timeout=120)[0]
        helps[key] = text if pr.returncode == 0 else ""
    for check, cmd, argv0, _, name, rest in todo:
        path = Path(argv0[-1]) if argv0[-1].endswith(".py") else None
        if path and not path.is_file():
            problems.append(f"{check.name}: {path} does not exist")
            continue
        if "deepspeed" in Path(cmd.argv[0]).name and not (
            Path(cmd.argv[0]).is_file() or shutil.which(cmd.argv[0])
        ):
            problems.append(f"{check.name}: the deepspeed launcher {cmd.argv[0]} is not there")
        text = helps.get(tuple(argv0), "")
        if not text:
            problems.append(f"{check.name}: {shlex.join(argv0)} --help failed")
            continue
        for a in rest:
            flag = a if a.startswith("--") else a[:2] if re.fullmatch(r"-[A-Za-z]\S*", a) else None
            if flag and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"{check.name}: {name} has no {flag} (its --help does not name it)")
        if name == "replay.py":
            allowed = re.search(r"^interventions: (.*)$", text, re.M)
            for spec in rest[rest.index("--intervene") + 1 : rest.index("--out")]:
                if not allowed or not re.search(rf"\b{re.escape(spec.split('=')[0])}\b", allowed.group(1)):
                    problems.append(f"{check.name}: replay.py names no intervention {spec}")
        elif name == "pytest":
            if not (ROOT / rest[0]).is_file():
                problems.append(f"{check.name}: {rest[0]} does not exist")
            if '"gpu:' not in (ROOT / "pyproject.toml").read_text():
                problems.append(f"{check.name}: pyproject.toml registers no gpu marker")
    out, err = child.communicate(timeout=300)
    problems += [ln[len("PROBLEM ") :] for ln in out.splitlines() if ln.startswith("PROBLEM ")]
    ok = sum(ln.startswith("OK ") for ln in out.splitlines())
    if child.returncode not in (0, 1) or ok + len(
        [ln for ln in out.splitlines() if ln.startswith("PROBLEM ")]
    ) != len(validate):
        problems.append(f"validate broke (exit {child.returncode}): {err.strip()[-800:]}")
    print(f"\ntrain.py --dry-run resolved {ok} of {len(validate)} run configs")
    for pr in problems:
        print(f"PROBLEM {pr}")
    n = sum(len(c.commands) for c in checks)
    print(f"gpu_check --dry-run: {n} commands in {len(checks)} checks, {len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_validate(args) -> int:
    """``dsinstab.commands.train.main(ARGS + ['--dry-run'])`` for each (check, ARGS); output dirs
    are moved to a temporary folder so that nothing existing interferes."""
    sys.path.insert(0, str(ROOT))
    from dsinstab.commands.train import main

    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in json.loads(args.items):
            argv = [f"utils.output_dir={tmp}" if a.startswith("utils.output_dir=") else a for a in argv]
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = main([*argv, "--dry-run"])
            if rc == 0:
                print(f"OK {name}")
            else:
                bad += 1
                print(
                    f"PROBLEM {name}: train.py --dry-run refused {shlex.join(argv)}: {err.getvalue().strip()[-400:]}"
                )
    return 1 if bad else 0


def cmd_check(args) -> int:
    mode = "dry-run" if args.dry_run else "rehearse" if args.rehearse else "gpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-")).resolve()
    logs = Path(args.logs or os.environ.get("OUT") or work / "logs").resolve()
    budget = args.budget or (540 if mode == "gpu" else 1800)
    ctx = Ctx(mode, work, logs, args.start or time.time(), budget)
    phases = plan(ctx)
    if mode == "dry-run":
        ctx.wandb = True
        rc = dry_run(ctx, phases)
        if args.wheels:
            problems = verify_wheels(Path(args.wheels))
            print(
                f"wheels in {args.wheels}: "
                + ("; ".join(problems) if problems else "complete for the GPU machine")
            )
            rc = rc or (1 if problems else 0)
        shutil.rmtree(work, ignore_errors=True)
        return rc
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    found = versions(ctx)
    say(
        "python " + sys.version.split()[0] + "; "
        + ", ".join(f"{k} {v[0]}" for k, v in found.items() if k != "cuda")
        + f"; CUDA devices: {found['cuda'][0]} {found['cuda'][1]}"
    )  # fmt: skip
    for k, v in found.items():
        if k not in ("cuda", "wandb") and v[0] is None:
            raise SystemExit(f"gpu_check: refusing: {k} does not import ({v[1]}).")
    for note in refuse_old(found):
        say(f"note: older than the project's pin, run all the same: {note}")
    for note in unmet_requirements(args.target):
        say(f"note: {note}")
    ctx.wandb = found["wandb"][0] is not None
    if not ctx.wandb:
        say(f"wandb does not import ({found['wandb'][1]}): every run logs with utils.report_to=none")
    if mode == "gpu" and not found["cuda"][0]:
        raise SystemExit(
            "gpu_check: refusing: torch sees no CUDA device (torch.cuda.is_available() is False)."
        )
    say(f"work folder {work}, logs in {logs}, budget {budget:.0f} s ({ctx.left():.0f} s left)")
    killer = threading.Timer(
        max(ctx.left(), 1), lambda: [os.killpg(p.pid, signal.SIGKILL) for p in list(ctx.procs)]
    )
    killer.daemon = True
    killer.start()
    run_all(ctx, phases)
    killer.cancel()
    pack(logs)
    c = ctx.counts
    say(
        f"{c['PASS']} PASS, {c['FAIL']} FAIL, {c['SKIP']} SKIP in {time.time() - ctx.start:.0f} s (logs: {logs})"
    )
    return 0 if c["FAIL"] == 0 else 1


def pack(logs: Path) -> None:
    """The per-check logs into one logs.tar.gz (the device hands back at most 8 files)."""
    files = sorted(logs.glob("*.log"))
    if not files:
        return
    with tarfile.open(logs / "logs.tar.gz", "w:gz") as t:
        for f in files:
            t.add(f, arcname=f.name)
    for f in files:
        f.unlink()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-wheels", help="wheels of what the GPU machine lacks")
    m.add_argument("dir")
    m.add_argument(
        "--no-wandb", action="store_true", help="leave wandb out (the check then logs with report_to=none)"
    )
    m.add_argument("--also", default="", help="NAME,NAME: ship these too, though the machine has them")
    v = sub.add_parser("verify-wheels", help="are DIR's wheels complete for the GPU machine")
    v.add_argument("dir")
    c = sub.add_parser("check", help="the check (on the GPU machine), --rehearse or --dry-run here")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--rehearse", action="store_true")
    c.add_argument(
        "--budget", type=float, default=0, help="seconds for everything (default 540; rehearsal 1800)"
    )
    c.add_argument(
        "--start", type=float, default=0, help="when the budget began (epoch seconds; default now)"
    )
    c.add_argument("--work", default=None, help="where the runs go (default: a new temporary folder)")
    c.add_argument("--logs", default=None, help="summary.txt and logs.tar.gz (default: $OUT, else WORK/logs)")
    c.add_argument("--target", default=None, help="the folder the wheels were installed into")
    c.add_argument("--wheels", default=None, help="--dry-run: also verify this wheel folder")
    pr = sub.add_parser("prep", help="prepare the 124M shape's data")
    pr.add_argument("--cache", required=True)
    pr.add_argument("--set", nargs="+", default=[])
    mf = sub.add_parser("mfu", help="MFU of a finished 124M run")
    mf.add_argument("run")
    mf.add_argument("--set", nargs="+", default=[])
    va = sub.add_parser("validate", help=argparse.SUPPRESS)
    va.add_argument("items")
    args = p.parse_args(argv)
    if args.cmd == "make-wheels":
        return make_wheels(args)
    if args.cmd == "verify-wheels":
        problems = verify_wheels(Path(args.dir))
        for pr_ in problems:
            say(f"problem: {pr_}")
        if not problems:
            say(f"{args.dir}: complete for the GPU machine")
        return 1 if problems else 0
    return {"check": cmd_check, "prep": cmd_prep, "mfu": cmd_mfu, "validate": cmd_validate}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
