"""``scripts/replay.py``: replay a spike of RUN from one of its checkpoints, with interventions.

Checks everything before anything is written (:func:`prepare`), runs the plain replay first and
says whether it reproduced RUN exactly, then one branch per intervention
(:mod:`dsinstab.experiments.replay`), and writes the report (:mod:`dsinstab.reports.replay_report`).
A repeated command continues the replay it names. The branches run as many ranks as RUN's
checkpoint holds, on this node or on a hostfile's nodes (:mod:`dsinstab.experiments.launch`);
``--emit commands`` prints their launcher commands instead of running them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path

from dsinstab.experiments.launch import DEEPSPEED_PORT, Launch, command_line, plan_launch, write_commands
from dsinstab.experiments.replay import (
    INTERVENTIONS,
    OUTCOME_CODES,
    ROOT,
    Plan,
    Source,
    branch_commands,
    check_plans,
    choose_checkpoint,
    plan_branches,
    run_branch,
    segment_config,
    tag_name,
    write_inputs,
)
from dsinstab.run.config import ConfigError
from dsinstab.run.status import EXIT_BAD_INPUT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="replay.py",
        description="Replay a spike of RUN from its newest checkpoint before STEP, exactly and with "
        "interventions; report what changed and which series moved first.",
        epilog="examples:\n  python scripts/replay.py runs/R --at 310 --window 40 --intervene skip reshuffle "
        "lr=x0.5 --seeds 2\n  python scripts/replay.py runs/R --at 31 --from step-20 --intervene precision=bf16 "
        "trainer.adam_beta2=0.99\n  python scripts/replay.py runs/R --at 3100 --intervene skip --hostfile hostfile --emit commands"
        "\n\ninterventions: " + INTERVENTIONS + "\n\nSee docs/forensics.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # the report command --emit prints is argv without --emit: no "--em" to miss
    )
    p.add_argument("run", metavar="RUN", help="the run directory that spiked")
    p.add_argument("--at", type=int, required=True, metavar="STEP", help="the spike's step")
    p.add_argument(
        "--from",
        dest="from_tag",
        default=None,
        metavar="TAG",
        help="the checkpoint to branch from (default: RUN's newest before STEP)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        metavar="N",
        help="steps to run past STEP (default: 20, or up to RUN's trainer.max_steps)",
    )
    p.add_argument(
        "--intervene",
        nargs="+",
        action="extend",
        default=[],
        metavar="SPEC",
        help="one branch each (see below)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="K",
        help="reshuffle: this many other batch orders (default: %(default)s)",
    )
    p.add_argument(
        "--k",
        type=float,
        default=4.0,
        help="what moved first: a series leaves its band beyond k robust sigmas (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where the branches and the report go (default: RUN-replay-STEP beside RUN)",
    )
    p.add_argument(
        "--emit",
        choices=("commands",),
        default=None,
        help="print one launcher command per branch still to do (also OUT/commands.txt) instead of "
        "running them; the same command without --emit then writes the report",
    )
    launch = p.add_argument_group(
        "launching the branches (each runs as many ranks as RUN's checkpoint holds)",
        "default: this node alone; RUN's nodes with --hostfile, through DeepSpeed's launcher",
    )
    launch.add_argument("--hostfile", default=None, metavar="H", help="DeepSpeed's hostfile of RUN's nodes")
    launch.add_argument(
        "--num_nodes",
        type=int,
        default=None,
        metavar="N",
        help="of the hostfile's first hosts (default: as many as RUN's ranks fill)",
    )
    launch.add_argument(
        "--num_gpus",
        type=int,
        default=None,
        metavar="G",
        help="ranks per node (default: the first host's slots)",
    )
    launch.add_argument(
        "--master_addr", default=None, metavar="ADDR", help="the rendezvous host (default: the launcher's)"
    )
    launch.add_argument(
        "--master_port",
        type=int,
        default=None,
        metavar="PORT",
        help=f"the rendezvous port (default: {DEEPSPEED_PORT} with --hostfile or --emit, else a free one)",
    )
    launch.add_argument(
        "--launcher_args",
        type=shlex.split,
        default=[],
        metavar="ARGS",
        help="more of DeepSpeed's launcher options, one string (e.g. --launcher_args='--launcher openmpi')",
    )
    return p.parse_args(argv)


def launch_of(args: argparse.Namespace, world: int) -> Launch:
    port = args.master_port or (DEEPSPEED_PORT if args.emit else None)
    return plan_launch(
        world, args.hostfile, args.num_nodes, args.num_gpus, args.master_addr, port, args.launcher_args
    )


def prepare(args: argparse.Namespace) -> tuple[Source, list[Plan], Path, bool]:
    """Everything checked, nothing written: the source, the branches, the output folder, and
    whether it continues an earlier replay of the same request."""
    run = Path(args.run)
    if not (run / "config.yaml").exists() or not (run / "metrics.jsonl").exists():
        raise ConfigError(f"RUN: {run} is not a run directory (it needs config.yaml and metrics.jsonl).")
    for flag, value in (("--at", args.at), ("--window", args.window or 1), ("--seeds", args.seeds)):
        if value < 1:
            raise ConfigError(f"{flag}: must be at least 1, got {value}.")
    tag, tag_step, world = choose_checkpoint(run, args.at, args.from_tag)
    config = segment_config(run, tag_step + 1)
    max_steps = config["trainer"]["max_steps"]
    if args.window is None:
        args.window = max(1, min(20, max_steps - args.at))
    if args.at + args.window > max_steps:
        raise ConfigError(
            f"--window {args.window}: step {args.at + args.window} is past RUN's trainer.max_steps ({max_steps}), "
            f"where its lr schedule ends; give at most {max_steps - args.at}."
        )
    source = Source(run, config, world, tag, tag_step, args.at)
    plans = plan_branches(source, args.intervene, args.seeds)
    out = Path(args.out) if args.out else run.parent / f"{run.name}-replay-{args.at}"
    request = request_of(source, plans, args)
    resume = out.exists()
    if resume:
        try:
            earlier = json.loads((out / "replay.json").read_text())
        except (OSError, ValueError):
            earlier = None
        if earlier != request:
            raise ConfigError(
                f"--out {out}: already exists and holds {'another replay' if earlier else 'other files'}; "
                "pick another --out, or repeat that replay's exact command to continue it."
            )
    check_plans(source, plans, out, args.window)
    return source, plans, out, resume


def request_of(source: Source, plans: list[Plan], args: argparse.Namespace) -> dict:
    return {
        "run": str(source.path.resolve()),
        "at": source.at,
        "from": source.tag,
        "window": args.window,
        "branches": [p.name for p in plans],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    # DeepSpeed's logger, made when it is first imported, writes to the stdout of that moment:
    # make it stderr, so stdout holds the replay's own lines
    with contextlib.redirect_stdout(sys.stderr):
        import dsinstab.reports.replay_report  # noqa: F401
        import dsinstab.run.checkpoint  # noqa: F401

    def say(msg: str) -> None:
        print(msg, flush=True)

    try:
        source, plans, out, resume = prepare(args)
        launch = launch_of(args, source.world)
        write_inputs(source, plans, out, request_of(source, plans, args))
        if args.emit:
            return emit_commands(source, plans, out, args, launch, say)
        said: list[str] = []  # the plain replay's line waits: whether it was exact comes first
        codes = {plans[0].name: run_branch(source, out, plans[0], args.window, said.append, launch)}
        from dsinstab.run.tracking import read_jsonl

        plain = out / plans[0].name / "metrics.jsonl"
        from dsinstab.reports.replay_report import exactness

        exact, line = exactness(
            read_jsonl(source.path / "metrics.jsonl"),
            read_jsonl(plain) if plain.exists() else [],
            source.tag_step + 1,
            source.at,
        )
        say(line)
        say(
            f"replaying {source.path} from {tag_name(source)} to step {source.at + args.window}: "
            f"{len(plans)} branch(es) under {out}" + (" (continuing)" if resume else "")
        )
        for msg in said:
            say(msg)
        for plan in plans[1:]:
            codes[plan.name] = run_branch(source, out, plan, args.window, say, launch)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from dsinstab.reports.replay_report import write_replay_report

    report, sentence = write_replay_report(source, plans, codes, out, args.window, args.k, line)
    say(sentence)
    say(f"report: {report / 'report.html'} (and report.md, *.png)")
    return 0 if all(c in OUTCOME_CODES for c in codes.values()) else 1


def emit_commands(source: Source, plans: list[Plan], out: Path, args, launch: Launch, say) -> int:
    """``--emit commands``: stdout is a shell script, one command line per branch still to do."""
    lines = branch_commands(source, plans, out, args.window, launch)
    path = write_commands(out, lines)
    for line in lines:
        say(line)
    again = [sys.executable, str(ROOT / "scripts" / "replay.py"), *without_emit(args.argv)]
    say(
        f"# {len(lines)} of {len(plans)} branch(es) to run (also in {path}); a killed one: --emit again gives its resume"
    )
    say(f"# once they have run, the report: {command_line(again)}")
    return 0


def without_emit(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--emit="):
            skip = False
            continue
        skip = a == "--emit"
        if not skip:
            out.append(a)
    return out
