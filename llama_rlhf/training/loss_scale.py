"""Dynamic loss scaling for fp16 training: fp16 gradients underflow below 6e-8, so the loss is multiplied by a
large scale before backward and the gradients divided by it before the update. A step whose gradients overflow
(a non-finite global gradient norm, the same on every rank) is skipped and halves the scale; every
``growth_interval`` clean steps in a row double it. bf16 has fp32's range and needs none of this."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class DynamicLossScaler:
    scale: float = 2.0 ** 16
    growth_interval: int = 1000  # clean steps before the scale doubles
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0
    good_steps: int = 0  # clean steps since the last change

    def update(self, overflow: bool) -> None:
        """After each optimizer step: back off on an overflow, grow after ``growth_interval`` clean steps."""
        if overflow:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, type(getattr(self, key))(value))
