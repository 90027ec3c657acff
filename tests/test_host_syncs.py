"""dsinstab's own code forces at most one host sync per training step (the plug-ins' and the loop's
values read in one copy, ``run/plugins.py``), on the default bf16 ZeRO-2 step without probes.

Counted: every call that copies a tensor's values to the host (``item``, ``tolist``, ``float()``,
``int()``, ``bool()``, ``format()`` of a 0-d tensor, ``numpy``, ``cpu``, ``__index__``) whose caller is a
frame of the dsinstab package; DeepSpeed's and torch's own reads are theirs. Reads of the batch
order's permutation (``torch.randperm`` on the host: the block indices that ``train_step`` records
and ``PackedData.blocks`` looks up) are not counted: on a GPU they stay in host memory and never
wait on the device, which on this CPU-only machine cannot be told from the device.

The count of a step is the difference between a run of ``LONG`` and one of ``SHORT`` steps, over
``LONG - SHORT``: both evaluate at step 0 and at their last step and save no checkpoint, so all that
differs is the steps, each a logging step (``log_every=1``) past the spike monitor's warmup.
"""

from __future__ import annotations

import json
import sys
import textwrap

from conftest import TINY, assert_ok, run_cmd

SHORT, LONG = 4, 8

# Runs the train command in this process with the reads counted; prints them by caller. Measures
# an older checkout too (its train command was dsinstab.cli.main before the layers): run it with
# that checkout as the working directory, so that its dsinstab is the one imported.
COUNT = textwrap.dedent(
    """
    import collections, json, os, sys, weakref
    import torch
    import dsinstab

    PKG = os.path.dirname(dsinstab.__file__) + os.sep
    counts = collections.Counter()
    host = []  # weak references to the batch order's permutations (see the test's docstring)
    randperm = torch.randperm

    def tracked_randperm(*args, **kwargs):
        t = randperm(*args, **kwargs)
        host.append(weakref.ref(t))
        return t

    torch.randperm = tracked_randperm

    def on_host(t):
        ptr = t.untyped_storage().data_ptr()
        return any(p() is not None and p().untyped_storage().data_ptr() == ptr for p in host)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            # a torch-function mode (run/lowp.py) re-issues the call it is handed: its caller counted it
            mode = caller.co_name == "__torch_function__"
            if caller.co_filename.startswith(PKG) and not mode and not (name == "__format__" and self.dim() > 0):
                if not on_host(self):
                    where = os.path.relpath(caller.co_filename, PKG)
                    counts[f"{where}:{caller.co_name}:{name}"] += 1
            return original(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__format__",
                 "numpy", "cpu"):
        counting(name)
    if os.path.exists(PKG + "cli.py"):  # a checkout from before the layers
        from dsinstab.cli import main
    else:
        from dsinstab.commands.train import main
    code = main(sys.argv[1:])
    print("SYNCS", json.dumps({"code": code, "counts": counts}))
    """
)


def count_syncs(tmp_path, cache_dir, steps: int) -> dict[str, int]:
    overrides = [
        *TINY,
        f"trainer.max_steps={steps}",
        "trainer.log_every=1",
        "trainer.eval_every=1000",
        "trainer.checkpoint_every=0",
        "trainer.spikes.warmup=2",
        f"utils.output_dir={tmp_path / 'runs'}",
        f"utils.cache_dir={cache_dir}",
        f"utils.run_name=syncs-{steps}",
    ]
    proc = run_cmd([sys.executable, "-c", COUNT, "--ds_config", "zero2_bf16", "--set", *overrides], 600)
    assert_ok(proc)
    got = json.loads(proc.stdout.split("SYNCS ")[-1].splitlines()[0])
    assert got["code"] == 0
    return got["counts"]


def test_a_training_step_syncs_with_the_host_at_most_once(tmp_path, cache_dir):
    short, long = (count_syncs(tmp_path, cache_dir, n) for n in (SHORT, LONG))
    per_step = {k: (long.get(k, 0) - short.get(k, 0)) / (LONG - SHORT) for k in {*short, *long}}
    per_step = {k: v for k, v in per_step.items() if v}
    assert sum(per_step.values()) <= 1, per_step
    assert per_step == {"run/plugins.py:reduce_readings:tolist": 1}, per_step  # the one copy
