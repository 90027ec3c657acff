"""What a firing may do now: ``trainer.spikes.action`` held back by its cooldown and caps."""

from __future__ import annotations

from dsinstab.run.config import SpikesConfig


class ActionPolicy:
    """``trainer.spikes.action``, held back by its cooldown and caps; its counts ride in the
    checkpoint, and survive a rollback (which reloads everything else)."""

    def __init__(self, cfg: SpikesConfig):
        self.cfg = cfg
        self.last_checkpoint_step = -(10**9)
        self.checkpoints = 0
        self.rollbacks = 0

    def decide(self, step: int) -> str:
        """The action for firings at ``step``: the configured one, held back by cooldown and caps."""
        action = self.cfg.action
        if action == "checkpoint":
            if (
                self.checkpoints >= self.cfg.max_checkpoints
                or step - self.last_checkpoint_step < self.cfg.cooldown
            ):
                return "none"
            self.checkpoints += 1
            self.last_checkpoint_step = step
        elif action == "rollback":
            if self.rollbacks >= self.cfg.max_rollbacks:
                return "stop"
            self.rollbacks += 1
        return action

    def state_dict(self) -> dict:
        keys = ("last_checkpoint_step", "checkpoints", "rollbacks")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for k in ("last_checkpoint_step", "checkpoints", "rollbacks"):
            setattr(self, k, state[k])
