"""AdamW as torch.optim.AdamW computes it, gradient clipping by global norm, and llama.cpp's learning schedule.

AdamW (PyTorch's single-tensor path, no amsgrad), per step t = 1, 2, ...:
    p *= 1 - lr * weight_decay                      (decoupled decay, scaled by the step's learning rate)
    m += (1 - beta1) * (g - m)                       (torch's lerp)
    v  = v * beta2 + (1 - beta2) * g * g
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
in float32, operation for operation.
"""

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class AdamW:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1
    step: int = 0                                   # updates done so far
    m: dict = field(default_factory=dict)           # first moments by parameter name
    v: dict = field(default_factory=dict)           # second moments by parameter name

    def update(self, params: dict, grads: dict, lr: float | None = None) -> None:
        """One AdamW step of every parameter in place; lr overrides the base rate (the schedule's rate)."""
        lr = self.lr if lr is None else lr
        self.step += 1
        t = self.step
        bias1 = 1.0 - self.beta1 ** t
        bias2_sqrt = math.sqrt(1.0 - self.beta2 ** t)
        step_size = lr / bias1
        for name, p in params.items():
            g = grads[name]
            dtype = p.dtype.type
            if name not in self.m:
                self.m[name] = np.zeros_like(p)
                self.v[name] = np.zeros_like(p)
            m, v = self.m[name], self.v[name]
            p *= dtype(1.0 - lr * self.weight_decay)
            m += dtype(1.0 - self.beta1) * (g - m)
            v *= dtype(self.beta2)
            v += (dtype(1.0 - self.beta2) * g) * g
            denom = np.sqrt(v)
            denom /= dtype(bias2_sqrt)
            denom += dtype(self.eps)
            p -= dtype(step_size) * (m / denom)

    def state(self) -> dict:
        return {"step": self.step, "m": self.m, "v": self.v}


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale all gradients by max_norm / (norm + 1e-6) when that is below 1, as torch.nn.utils.clip_grad_norm_;
    returns the global norm before clipping. max_norm <= 0 only measures."""
    total = math.sqrt(sum(float(np.dot(g.ravel().astype(np.float64), g.ravel().astype(np.float64)))
                          for g in grads.values()))
    if max_norm > 0:
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in grads.values():
                g *= g.dtype.type(coef)
    return total


def cosine_decay(step: int, decay_steps: int, minimum: float) -> float:
    if decay_steps <= 0:
        return 1.0
    step = min(step, decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))
    return (1.0 - minimum) * cosine + minimum


def cosine_decay_restart(step: int, decay_steps: int, minimum: float, restart_mult: float) -> float:
    """Cosine decay that starts over after each period, each period restart_mult times the one before."""
    while decay_steps > 0 and step > decay_steps:
        step -= decay_steps
        decay_steps = max(1, int(restart_mult * decay_steps))
    return cosine_decay(step, decay_steps, minimum)


def learning_schedule(step: int, warmup: int, cos_decay_steps: int, cos_decay_min: float,
                      cos_decay_restart: float, enable_restart: bool) -> float:
    """llama.cpp finetune's schedule factor for update `step` (1-based): linear warmup step / warmup over the
    first warmup updates, then cosine decay to cos_decay_min over cos_decay_steps (counted from the start, or
    from the end of warmup and restarting, with enable_restart)."""
    if step < warmup:
        return step / warmup
    if enable_restart:
        return cosine_decay_restart(step - warmup, cos_decay_steps, cos_decay_min, cos_decay_restart)
    return cosine_decay(step, cos_decay_steps, cos_decay_min)


def scheduled_lr(step: int, alpha: float, min_alpha: float, **schedule) -> float:
    """The learning rate of update `step`: min_alpha + factor · (alpha - min_alpha)."""
    return min_alpha + learning_schedule(step, **schedule) * (alpha - min_alpha)
