"""The plug-in registry: a new mitigation is one class and one config key, and the run does the rest.

A toy mitigation is added here exactly as a new one is added to dsinstab (one ``Instrument`` subclass,
one config field, one registry entry) and a real run is trained with it, in this process, through
the train command's own steps: the loop calls it, its metric is logged, it acts on the model, and
its state rides in the checkpoint so a resumed run goes on counting where the unbroken one was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from conftest import ROOT, TINY, ds_config
from dsinstab.commands.build_run import build_and_train
from dsinstab.instruments import registry
from dsinstab.instruments.base import Instrument
from dsinstab.run.config import ConfigError, MitigationsConfig, load_config, param
from dsinstab.run.ds_config import read_ds_config, resolve_ds_config
from dsinstab.run.tracking import read_jsonl


@dataclasses.dataclass
class ToyMitigationsConfig(MitigationsConfig):
    toy_every: int = param(0, "toy: halve the output head's weights every this many steps (0 = off)", ge=0)


class HalveHead(Instrument):
    """Every ``toy_every`` steps, after the update, the output head's weights are halved."""

    name = "toy_halve_head"
    key = "trainer.mitigations.toy_every"

    def __init__(self, ctx):
        self.every = ctx.cfg.trainer.mitigations.toy_every
        self.head = ctx.model.get_output_embeddings().weight
        self.acted = 0

    def after_step(self, step) -> None:
        if step.number % self.every == 0:
            with torch.no_grad():
                self.head.mul_(0.5)  # fp32 without ZeRO: the module's weight is the one AdamW steps
            self.acted += 1

    def collect(self, step, values: dict) -> dict:
        return {"mitig/toy_acted": self.acted} if step.number % self.every == 0 else {}

    def state_dict(self) -> dict:
        return {"acted": self.acted}

    def load_state_dict(self, state: dict) -> None:
        self.acted = state.get("acted", 0)


def toy_config(tmp_path, cache_dir, name: str, every: int, *overrides: str):
    keys = [*TINY, "trainer.checkpoint_every=3", "trainer.keep_checkpoints=5", "utils.report_to=none",
            f"utils.output_dir={tmp_path / 'runs'}", f"utils.cache_dir={cache_dir}", f"utils.run_name={name}",
            *overrides]  # fmt: skip
    cfg = load_config(ROOT / "configs", keys)
    # the one config field: what adding `toy_every` to MitigationsConfig in config.py does
    cfg.trainer.mitigations = ToyMitigationsConfig(
        **dataclasses.asdict(cfg.trainer.mitigations), toy_every=every
    )
    path = ds_config(tmp_path, "zero0_bf16", bf16={"enabled": False})  # fp32, no ZeRO
    cfg.ds_config, _ = resolve_ds_config(read_ds_config(path), path, cfg, 1)
    cfg.ds_config_path = path
    registry.check(cfg)
    return cfg


def train(cfg, resume: str | None = None) -> int:
    args = argparse.Namespace(resume=resume, overwrite=False, branch=None, intervene=[], stop_at=None)
    return build_and_train(cfg, args, [], rank=0, world=1)


def head_weight(run_dir, tag: str) -> torch.Tensor:
    states = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    return next(v for k, v in states["module"].items() if k.endswith("lm_head.weight"))


def client_state(run_dir, tag: str) -> dict:
    states = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    return states["dsinstab"]


def test_a_toy_mitigation_added_through_the_registry_acts_and_resumes(
    tmp_path, cache_dir, one_rank, monkeypatch
):
    monkeypatch.setattr(registry, "INSTRUMENTS", [*registry.INSTRUMENTS, HalveHead])  # the one registry line
    runs = tmp_path / "runs"

    assert train(toy_config(tmp_path, cache_dir, "control", 0, "trainer.max_steps=3")) == 0
    assert train(toy_config(tmp_path, cache_dir, "toy", 3, "trainer.max_steps=6")) == 0
    # the loop called it after the update of step 3: the same run without it, halved, bit for bit
    assert torch.equal(head_weight(runs / "toy", "step-3"), head_weight(runs / "control", "step-3") * 0.5)
    logged = {
        r["step"]: r["mitig/toy_acted"]
        for r in read_jsonl(runs / "toy" / "metrics.jsonl")
        if "mitig/toy_acted" in r
    }
    assert logged == {3: 1, 6: 2}
    assert client_state(runs / "toy", "step-6")["plugins"]["toy_halve_head"] == {"acted": 2}
    # no plug-in of its own in the control run: nothing is built when its key is off
    assert "toy_halve_head" not in client_state(runs / "control", "step-3")["plugins"]

    # resumed from step-6 for three more steps: the count goes on from the checkpoint's 2
    assert train(toy_config(tmp_path, cache_dir, "toy", 3, "trainer.max_steps=9"), resume="latest") == 0
    assert client_state(runs / "toy", "step-9")["plugins"]["toy_halve_head"] == {"acted": 3}
    rows = [r for r in read_jsonl(runs / "toy" / "metrics.jsonl") if "mitig/toy_acted" in r]
    assert [(r["step"], r["mitig/toy_acted"]) for r in rows] == [(3, 1), (6, 2), (9, 3)]
    assert json.loads((runs / "toy" / "status.json").read_text())["state"] == "finished"


def test_an_instrument_that_cannot_serve_a_config_refuses_it_in_one_sentence():
    class NeedsLlama(HalveHead):
        @classmethod
        def refusal(cls, cfg):
            from dsinstab.instruments.base import Refusal

            return Refusal("needs model.arch llama.") if cfg.model.arch != "llama" else None

    cfg = load_config(ROOT / "configs", ["model.arch=gpt2"])
    cfg.trainer.mitigations = ToyMitigationsConfig(**dataclasses.asdict(cfg.trainer.mitigations), toy_every=2)
    with pytest.raises(
        ConfigError, match=r"trainer\.yaml: trainer\.mitigations\.toy_every needs model\.arch llama\.$"
    ):
        registry.check(cfg, [*registry.INSTRUMENTS, NeedsLlama])
    registry.check(cfg)  # without it in the registry the key does nothing


def test_every_probe_name_is_an_instrument_and_an_unknown_one_is_refused():
    names = registry.probes()
    assert set(names) == {"attn_logits", "out_logits", "layer_norms", "adam", "activations", "headroom"}
    cfg = load_config(ROOT / "configs", ["trainer.diagnostics.probes=attn_logits,adma"])
    with pytest.raises(ConfigError, match="trainer.diagnostics.probes has unknown 'adma'; allowed: "):
        registry.check(cfg)
