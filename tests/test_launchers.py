"""Every launcher's ranks: OpenMPI's, MVAPICH's and SLURM's variables (simulated on this machine, no
RANK or WORLD_SIZE) make one 2-rank job that trains exactly like ``deepspeed --num_gpus 2``; the
train command sizes the batch from them; and the evaluation loss of one checkpoint is the same on
one rank and on two, whether or not the validation split ends inside a round."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, assert_ok, env, free_port, launch, launch_cmd, metrics, run_cmd, spawn
from dsinstab.run.checkpoint import MARKER, RANKS
from dsinstab.run.config import ConfigError, TrainerConfig
from dsinstab.run.distributed import LAUNCH_VARS, Launch, discover, first_host, without_launch
from dsinstab.run.evaluate import eval_blocks, eval_plan

STEPS = ("trainer.max_steps=4", "trainer.eval_every=4", "trainer.checkpoint_every=4")
KEYS = ("train/loss", "train/grad_norm", "train/lr", "eval/loss")
SCRIPT = str(ROOT / "scripts" / "train.py")
# what a process inherits that would tell it its rank: none of it may leak into a simulated launch
LAUNCHER_PREFIXES = ("OMPI_", "MV2_", "SLURM_", "PMI_", "PMIX_")
LAUNCHER_VARS = LAUNCH_VARS


def family_env(family: str, rank: int, world: int, port: int) -> dict[str, str]:
    """The variables ``family``'s launcher gives rank ``rank`` of ``world`` ranks on one node."""
    if family == "openmpi":
        own = {f"OMPI_COMM_WORLD_{k}": str(v) for k, v in (("RANK", rank), ("SIZE", world))}
        own |= {"OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": str(world)}
        return own | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if family == "mvapich":
        own = {f"MV2_COMM_WORLD_{k}": str(v) for k, v in (("RANK", rank), ("SIZE", world))}
        own |= {"MV2_COMM_WORLD_LOCAL_RANK": str(rank), "MV2_COMM_WORLD_LOCAL_SIZE": str(world)}
        return own | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    assert family == "slurm"  # no MASTER_ADDR: rank 0's host comes from the node list
    return {
        "SLURM_STEP_ID": "0",  # what srun sets for the tasks it starts
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(world),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_TASKS_PER_NODE": str(world),
        "SLURM_JOB_NODELIST": "localhost",
        "MASTER_PORT": str(port),
    }


def bare_env() -> dict[str, str]:
    e = env()
    for k in list(e):
        if k in LAUNCHER_VARS or k.startswith(LAUNCHER_PREFIXES):
            del e[k]
    return e


def start_ranks(cmd: list[str], family: str, logs: list[Path], timeout: int = 600) -> list[int]:
    """``cmd`` as ``len(logs)`` processes with ``family``'s variables, as its launcher would start
    them; returns their exit codes. A hang prints each rank's stacks into the failure."""
    port, world = free_port(), len(logs)
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                spawn(
                    cmd,
                    bare_env() | family_env(family, rank, world, port),
                    stdout=stack.enter_context(open(log, "w")),
                    stderr=subprocess.STDOUT,
                )
            )
            for rank, log in enumerate(logs)
        ]
        deadline = time.time() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(q.pid, signal.SIGUSR1)  # scripts/train.py prints where each thread waits
                time.sleep(3)
                tails = "\n".join(f"--- {log.name}\n{log.read_text()[-6000:]}" for log in logs)
                pytest.fail(f"{family}: the ranks hung for {timeout}s\n{tails}")
        return [p.returncode for p in procs]


# ---------------------------------------------------------------------------------------------
# Reading the launchers' variables


ONE_NODE = {
    "openmpi": {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    },
    "mvapich": {
        "MV2_COMM_WORLD_RANK": "1",
        "MV2_COMM_WORLD_SIZE": "4",
        "MV2_COMM_WORLD_LOCAL_RANK": "1",
        "MV2_COMM_WORLD_LOCAL_SIZE": "4",
    },
    "slurm": {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0",
        "SLURM_TASKS_PER_NODE": "4",
        "SLURM_JOB_NODELIST": "gpu07",
    },
}


@pytest.mark.parametrize("family", sorted(ONE_NODE))
def test_each_launchers_variables_give_rank_world_local_rank_and_a_rendezvous(family):
    got = discover(ONE_NODE[family])
    addr = "gpu07" if family == "slurm" else "127.0.0.1"  # every rank on one node: this machine
    assert got == Launch(family, 1, 4, 1, 4, addr, 29500)
    env_ = got.environ()
    assert {k: env_[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")} == {
        "RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "4",
    }
    assert env_["MASTER_ADDR"] == addr and env_["MASTER_PORT"] == "29500"
    # a rendezvous already set wins over what the launcher implies
    mine = discover(ONE_NODE[family] | {"MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "1234"})
    assert (mine.master_addr, mine.master_port) == ("10.0.0.9", 1234)


def test_torchrun_and_deepspeeds_variables_win_and_none_is_one_rank():
    torchrun = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29600",
    }
    # DeepSpeed's launcher inside a SLURM allocation: the allocation's variables are not the ranks'
    got = discover(torchrun | ONE_NODE["slurm"] | ONE_NODE["openmpi"])
    assert got == Launch("torchrun", 3, 8, 1, None, "n1", 29600)
    assert "LOCAL_SIZE" not in got.environ()  # the launcher's own LOCAL_SIZE is left as it is
    assert discover(ONE_NODE["openmpi"] | ONE_NODE["slurm"]).launcher == "openmpi"
    alone = discover({"LOCAL_RANK": "0", "MASTER_ADDR": "elsewhere", "MASTER_PORT": "1"})
    assert alone == Launch("none", 0, 1, 0, None, "127.0.0.1", None)
    assert alone.environ()["MASTER_ADDR"] == "127.0.0.1" and alone.environ()["MASTER_PORT"] != "1"


def test_slurm_takes_the_steps_counts_and_the_first_host_of_its_node_list():
    assert first_host("node[07-09,12],gpu1") == "node07"
    assert first_host("rack[2-3]-n[001-004]") == "rack2-n001"
    assert first_host("a1,a2") == "a1" and first_host("solo") == "solo"
    step = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",  # the allocation's
        "SLURM_STEP_NUM_TASKS": "8",  # srun's step: these are the ranks
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_TASKS_PER_NODE": "8(x2)",
        "SLURM_JOB_NODELIST": "gpu[01-04]",
        "SLURM_STEP_NODELIST": "gpu[03-04]",
        "SLURM_JOB_ID": "4242",
    }
    got = discover(step)
    assert (got.rank, got.world, got.local_rank, got.local_size) == (5, 8, 1, 4)
    assert got.master_addr == "gpu03" and got.master_port == 15000 + 4242  # a port of this job's own
    assert discover({**step, "SLURM_STEP_TASKS_PER_NODE": "3,5"}).local_size == 5


@pytest.mark.parametrize(
    "variables, message",
    [
        (
            {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
             "OMPI_COMM_WORLD_LOCAL_SIZE": "8"},
            "openmpi gives 16 ranks on more than one node (or does not say) and MASTER_ADDR is not set",
        ),
        ({"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_RANK": "0"},
         "mvapich gives 2 ranks on more than one node"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "MASTER_ADDR is not"),
        ({"RANK": "0"}, "RANK is set but none of WORLD_SIZE is"),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"},
         "rank 2 (local rank 0) of 2"),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID is 'x', not a whole number"),
    ],
)  # fmt: skip
def test_incomplete_launcher_variables_are_refused_in_one_sentence(variables, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        discover(variables)


def test_a_batch_script_or_a_sweeps_child_is_one_rank_on_a_port_of_its_own():
    """SLURM's variables outside an srun step (a batch script, an salloc shell) launch nothing, and a
    process alone never takes a job-wide port: two runs of one allocation must not collide. A sweep
    hands its children no launcher variable at all."""
    batch = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
             "SLURM_JOB_NODELIST": "gpu[07-08]"}  # fmt: skip
    alone = discover(batch)
    assert (alone.launcher, alone.world, alone.master_addr, alone.master_port) == (
        "none",
        1,
        "127.0.0.1",
        None,
    )
    one_task = discover({**batch, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"})
    assert one_task.world == 1 and one_task.master_port is None  # a free port, picked at start
    step = {**ONE_NODE["slurm"], "RANK": "1", "MASTER_PORT": "1234", "OMPI_COMM_WORLD_RANK": "0"}
    assert not set(without_launch({**step, "HOME": "/root"})) - {"HOME", "SLURM_NTASKS", "SLURM_NODEID",
                                                              "SLURM_TASKS_PER_NODE", "SLURM_JOB_NODELIST"}  # fmt: skip


def test_the_train_command_sizes_the_batch_from_the_launchers_world(tmp_path):
    """Before any process group: --dry-run under OpenMPI's variables of 2 ranks resolves the
    ds_config's batch for 2 ranks (train.py read WORLD_SIZE only, so got 1)."""
    cmd = [sys.executable, SCRIPT, "--dry-run", "--set", "trainer.micro_batch_size=3"]
    cmd += ["trainer.gradient_accumulation_steps=2"]
    proc = run_cmd(cmd, 120, env_=bare_env() | family_env("openmpi", 1, 2, 29500), cwd=tmp_path)
    assert_ok(proc)
    assert "train_batch_size: 12" in proc.stdout  # 3 x 2 x 2 ranks
    bad = family_env("openmpi", 0, 2, 29500) | {"OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    bad.pop("MASTER_ADDR")
    proc = run_cmd(cmd, 120, env_=bare_env() | bad, cwd=tmp_path)
    assert proc.returncode == 2 and "MASTER_ADDR is not set" in proc.stderr


# ---------------------------------------------------------------------------------------------
# The evaluation plan


@pytest.mark.parametrize("micro_batch", [1, 3, 4])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_every_evaluation_block_is_read_once_and_every_rank_makes_the_same_calls(micro_batch, world):
    for n_validation in (1, 5, 19, 24, 100):
        for eval_batches in (1, 2, 8):
            trainer = TrainerConfig(micro_batch_size=micro_batch, eval_batches=eval_batches)
            total = eval_blocks(trainer, world, n_validation)
            assert total == min(eval_batches * micro_batch * world, n_validation)
            plans = [eval_plan(total, micro_batch, world, r) for r in range(world)]
            assert len({len(p) for p in plans}) == 1  # as many forwards (and collectives) on each rank
            assert len(plans[0]) <= eval_batches
            read = sorted(i for p in plans for blocks in p for i in blocks)
            assert read == list(range(total)), (n_validation, eval_batches)  # once each, no wrapping
            assert all(len(blocks) <= micro_batch for p in plans for blocks in p)


def test_a_full_evaluation_reads_the_blocks_the_wrapped_one_did():
    """Where the split is long enough, each rank reads what it read before (the old layout)."""
    for r in range(4):
        plan = eval_plan(eval_blocks(TrainerConfig(micro_batch_size=4, eval_batches=3), 4, 1000), 4, 4, r)
        assert [list(b) for b in plan] == [
            list(range((i * 4 + r) * 4, (i * 4 + r) * 4 + 4)) for i in range(3)
        ]


# ---------------------------------------------------------------------------------------------
# Runs under each launcher's variables


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """``deepspeed --num_gpus 2``: the run every launcher's must equal, and the checkpoint evaluated."""
    tmp = tmp_path_factory.mktemp("launchers")
    proc, run_dir = launch(tmp, cache_dir, *STEPS, ranks=2, name="deepspeed")
    assert_ok(proc)
    return tmp, run_dir


@pytest.mark.parametrize("family", ["openmpi", "mvapich", "slurm"])
def test_each_launchers_ranks_train_as_one_two_rank_job(reference, cache_dir, family):
    tmp, want = reference
    cmd = launch_cmd(tmp, cache_dir, *STEPS, ranks=2, name=family)
    logs = [tmp / f"{family}-rank{r}.log" for r in (0, 1)]
    codes = start_ranks([sys.executable, *cmd[cmd.index(SCRIPT) :]], family, logs)
    out = logs[0].read_text()
    assert codes == [0, 0], f"{codes}\n{out[-4000:]}\n{logs[1].read_text()[-4000:]}"
    addr = "localhost" if family == "slurm" else "127.0.0.1"
    assert f"2 ranks from {family}'s variables, rendezvous at {addr}:" in out
    assert "ZeRO-2, 2 rank(s)" in out
    run_dir = tmp / "runs" / family
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 4
    marker = json.loads((run_dir / "checkpoints" / "step-4" / MARKER).read_text())
    assert marker["data_layout"][RANKS] == 2
    a, b = metrics(want), metrics(run_dir)  # one metrics.jsonl, each step once, as the reference
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4, 4]
    for x, y in zip(a, b):
        for k in KEYS:
            assert x.get(k) == y.get(k), (x["step"], k, x.get(k), y.get(k))


# Evaluates a checkpoint's weights on each case: {"micro_batch", "blocks" (the evaluation's blocks,
# shared by the ranks), "n_validation" (the split cut to that many, or all)}; rank 0 prints the losses.
EVAL = textwrap.dedent(
    """
    import dataclasses, json, sys
    from types import SimpleNamespace
    from dsinstab.commands.train import parse_args
    from dsinstab.run.distributed import init_distributed, world_size_from_env
    from dsinstab.run.resolve import resolve

    argv, ckpt, tag, cases = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    cfg, _ = resolve(parse_args(argv), world_size_from_env())
    rank, world = init_distributed(lambda m: None)
    import deepspeed.comm as dist
    from dsinstab.instruments import registry
    from dsinstab.run import lowp
    from dsinstab.run.data import prepare_data
    from dsinstab.run.engine import build_engine
    from dsinstab.run.evaluate import evaluate
    from dsinstab.run.model import build_model

    data = prepare_data(cfg.dataset, cfg.model.seq_len, cfg.utils.cache_dir, log=lambda m: None, progress=False)
    model = build_model(cfg.model, cfg.dataset.vocab_size, data.eos_id, cfg.trainer.seed)
    engine = build_engine(model, cfg.trainer, cfg.ds_config, registry.optimizer_for(cfg))
    engine.load_checkpoint(ckpt, tag, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    ctx = lowp.compute_context(engine, cfg.utils.cpu_compute)
    losses = []
    for case in cases:
        mb, n = case["micro_batch"], case.get("n_validation")
        trainer = dataclasses.replace(cfg.trainer, micro_batch_size=mb,
                                      eval_batches=max(1, case["blocks"] // (mb * world)))
        cut = dataclasses.replace(data, validation=data.validation.select(range(n))) if n else data
        run = SimpleNamespace(cfg=dataclasses.replace(cfg, trainer=trainer), engine=engine, data=cut,
                              rank=rank, world=world)
        losses.append(evaluate(run, ctx))
    if rank == 0:
        print("EVAL", json.dumps({"world": world, "losses": losses}))
    dist.destroy_process_group()
    """
)
CASES = [
    {"micro_batch": 4, "blocks": 16},  # 4 rounds of 4 on one rank, 2 rounds of 4 + 4 on two
    {"micro_batch": 4, "blocks": 10**6, "n_validation": 19},  # two ranks: 3 + 0 blocks (a padded round)
    {"micro_batch": 4, "blocks": 10**6, "n_validation": 21},  # two ranks: 4 + 1 blocks last
    {"micro_batch": 1, "blocks": 16},  # one block per forward
    {"micro_batch": 4, "blocks": 10**6, "n_validation": 0},  # the whole split
]


def test_the_eval_loss_of_a_checkpoint_is_the_same_on_one_and_two_ranks(reference, cache_dir):
    tmp, run_dir = reference
    cmd = launch_cmd(tmp, cache_dir, *STEPS, ranks=2, name="deepspeed")
    argv = cmd[cmd.index(SCRIPT) + 1 :]
    args = [json.dumps(argv), str(run_dir / "checkpoints"), "step-4", json.dumps(CASES)]
    script = [sys.executable, "-c", EVAL, *args]
    one = run_cmd(script, 600, env_=bare_env())
    assert_ok(one)
    logs = [tmp / f"eval-rank{r}.log" for r in (0, 1)]
    assert start_ranks(script, "openmpi", logs) == [0, 0], logs[0].read_text()[-4000:]
    got = [json.loads(out.split("EVAL ")[-1].splitlines()[0]) for out in (one.stdout, logs[0].read_text())]
    assert [g["world"] for g in got] == [1, 2]
    on_one, on_two = (g["losses"] for g in got)
    for case, x, y in zip(CASES, on_one, on_two):
        assert y == pytest.approx(x, rel=1e-6, abs=0), case
    assert on_one[3] == pytest.approx(on_one[0], rel=1e-6, abs=0)  # batched as one block at a time
    # the step's eval/loss logged by the 2-rank run read the same 2 x 2 x 4 = 16 blocks (TINY's)
    assert "trainer.eval_batches=2" in TINY and "trainer.micro_batch_size=4" in TINY
    logged = next(r["eval/loss"] for r in metrics(run_dir) if r["step"] == 4 and "eval/loss" in r)
    assert on_two[0] == pytest.approx(logged, rel=1e-6, abs=0)
