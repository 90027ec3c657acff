"""Checkpoint choices go by the step a tag holds, and a resume continues on the same data or is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, assert_ok, python_train, train_rows
from dsinstab.run.checkpoint import MARKER, RANKS, Checkpointer, data_layout
from dsinstab.run.config import ConfigError, RunConfig


def _tags(run_dir: Path, holding: dict[str, int], latest: str | None = None, layout=None) -> Checkpointer:
    """A checkpoints folder whose complete tags hold the given steps, marked as a save marks them."""
    ck = Checkpointer(engine=None, run_dir=run_dir, keep=1, is_main=True, layout=layout)
    for tag, step in holding.items():
        (ck.dir / tag).mkdir(parents=True)
        assert ck.commit(tag, step) is None
    if latest:
        (ck.dir / "latest").write_text(latest)
    return ck


def test_choices_go_by_the_step_a_tag_holds_not_by_its_name(tmp_path):
    # What a rollback could leave: step-20 was written after rolling back to step 10 and holds
    # step 10 (and step-10 itself was since deleted), so by name it would look like the newest.
    ck = _tags(tmp_path, {"step-5": 5, "step-15": 15, "step-20": 10, "spike-16": 15})
    assert ck.saved_step("step-20") == 10
    assert ck.complete_tags() == ["step-5", "step-20", "step-15", "spike-16"]
    assert ck.newest_before(25) == "step-15"  # by name: step-20, which would replay from step 10
    assert ck.newest_before(12) == "step-20"
    assert ck.newest_before(4) is None
    assert ck.resolve("latest") == "spike-16"  # no `latest` file: the tag holding the newest step

    # retention keeps the newest periodic tag by held step, and `latest` wherever it points
    (ck.dir / "latest").write_text("step-15")
    (ck.dir / "step-12").mkdir()  # partial (killed mid-write), older than latest's step: goes
    (ck.dir / "step-18").mkdir()  # partial, newer: stays until it is written again
    assert sorted(ck.prunable()) == ["step-12", "step-20", "step-5"]


def test_a_tag_written_again_is_incomplete_until_its_new_marker_is_in(tmp_path):
    ck = _tags(tmp_path, {"step-10": 10, "step-20": 20}, latest="step-20")
    (ck.dir / "step-20" / MARKER).unlink()  # what save() does first; a kill now leaves it partial
    assert ck.complete_tags() == ["step-10"]
    assert ck.resolve("latest") == "step-10"


def _layout(world: int = 2, key: str = "0123abcd", **sections) -> dict:
    cfg = RunConfig()
    for dotted, value in sections.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    return data_layout(cfg, world, key)


@pytest.mark.parametrize(
    "now, named",
    [
        (_layout(world=1), "saved by 2 ranks and this run has 1"),
        (_layout(trainer__micro_batch_size=4), "trainer.micro_batch_size=8 and this run has 4"),
        (
            _layout(trainer__gradient_accumulation_steps=2),
            "trainer.gradient_accumulation_steps=1 and this run has 2",
        ),
        (_layout(trainer__seed=7), "trainer.seed=0 and this run has 7"),
        (_layout(model__seq_len=32, key="other"), "model.seq_len=256 and this run has 32"),
        (_layout(dataset__max_chars=1000, key="other"), "dataset.max_chars=0 and this run has 1000"),
        (
            _layout(key="other"),
            "training data (cache key 0123abcd) differs from this run's (other): the corpus files or dsinstab's packing changed",
        ),
    ],
)
def test_a_resume_that_would_read_other_data_is_refused_naming_what_changed(tmp_path, now, named):
    _tags(tmp_path, {"step-6": 6}, latest="step-6", layout=_layout())
    ck = Checkpointer(engine=None, run_dir=tmp_path, keep=1, is_main=True, layout=now)
    with pytest.raises(ConfigError, match="--resume latest: step-6 cannot continue this run because") as e:
        ck.resolve("latest")
    assert named in str(e.value)


def test_what_does_not_touch_the_data_may_change_on_resume(tmp_path):
    _tags(tmp_path, {"step-6": 6}, latest="step-6", layout=_layout())
    now = _layout(trainer__max_steps=900, trainer__lr=1e-2, dataset__num_proc=4, model__n_layer=3)
    assert Checkpointer(None, tmp_path, 1, True, now).resolve("latest") == "step-6"


def _train(tmp_path: Path, cache_dir: Path, *overrides: str, extra: tuple = ()):
    return python_train(
        "--ds_config",
        str(ROOT / "ds_configs" / "zero2_fp32.json"),
        "--set",
        *TINY,
        f"utils.output_dir={tmp_path / 'runs'}",
        f"utils.cache_dir={cache_dir}",
        "utils.run_name=run",
        "trainer.checkpoint_every=3",
        *overrides,
        *extra,
    )


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_resume_refuses_another_seq_len_before_writing_and_keeps_each_segments_config(tmp_path, cache_dir):
    run = tmp_path / "runs" / "run"
    assert_ok(_train(tmp_path, cache_dir, "trainer.max_steps=3"))
    before = _snapshot(run)

    proc = _train(
        tmp_path, cache_dir, "trainer.max_steps=6", "model.seq_len=32", extra=("--resume", "latest")
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "error: --resume latest: step-3 cannot continue this run because it was saved with "
        "model.seq_len=64 and this run has 32" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert _snapshot(run) == before  # nothing in the run directory was written

    proc = _train(tmp_path, cache_dir, "trainer.max_steps=5", extra=("--resume", "latest"))
    assert_ok(proc)
    assert [r["step"] for r in train_rows(run)] == [1, 2, 3, 4, 5]
    first = yaml.safe_load((run / "config.yaml").read_text())
    resumed = yaml.safe_load((run / "config-resume-3.yaml").read_text())
    assert first["trainer"]["max_steps"] == 3 and resumed["trainer"]["max_steps"] == 5
    marker = json.loads((run / "checkpoints" / "step-3" / MARKER).read_text())
    assert marker["step"] == 3 and marker["data_layout"]["model.seq_len"] == 64
    assert marker["data_layout"][RANKS] == 1


def test_a_checkpoint_from_before_the_plugins_were_split_restores_every_state():
    """The spike monitor's state (then `monitor`, with the action policy inside it) and the one
    `mitigations` plug-in's (ZClip, skip-step, QK-clip's count) go to the plug-ins that hold them now."""
    from dsinstab.run.state import legacy_plugin_states

    zclip = {"warm": [], "mean": 1.0, "var": 0.01}
    skip = {"history": [[5.0], [1.0]], "count": 1, "skipped": 0}
    monitor = {"loss": {}, "policy": {"last_checkpoint_step": 7, "checkpoints": 1, "rollbacks": 0}}
    old = {"monitor": monitor, "plugins": {"mitigations": {"qk_total": 3, "zclip": zclip, "skip_step": skip}}}
    assert legacy_plugin_states(old) == {
        "spikes": monitor,
        "zclip": zclip,
        "skip_step": skip,
        "qk_clip": {"total": 3},
    }
    new = {"plugins": {"zclip": zclip}}
    assert legacy_plugin_states(new) == {"zclip": zclip}
