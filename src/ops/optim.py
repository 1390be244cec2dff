"""SGD with the poly learning-rate schedule used by IRNet, SEAM/PSA and DeepLab.

lr_k = base_lr * (1 - k' / max_steps) ** power, with k' = min(k, max_steps - 1) rounded down to a
multiple of ``update_every`` (DeepLab's staircase of 10; 1 elsewhere). Step k uses lr_k, so the first
step uses the full lr, and past ``max_steps`` the lr stays at its last value (as the reference
``PolyOptimizer`` does). Param groups carry an lr multiplier and their own weight decay.

**quirk** (IRNet and SEAM reference code): their PolyOptimizer passes the weight decay where SGD's
momentum belongs, so the effective momentum equals the weight decay (1e-4 / 5e-4). ``momentum`` is a
plain config value here; ``profile=paper`` sets the reference's value, see conf/profile/paper.yaml.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class ParamGroup:
    """Parameters trained together: their lr is ``lr_mult`` x the base lr; ``weight_decay`` None means
    the optimiser's default."""

    params: Iterable[torch.nn.Parameter]
    lr_mult: float = 1.0
    weight_decay: float | None = None
    name: str = ""


def poly_factor(step: int, max_steps: int, power: float = 0.9, update_every: int = 1) -> float:
    if max_steps < 1:
        raise ValueError(f"poly schedule needs max_steps >= 1, got {max_steps}")
    k = min(int(step), max_steps - 1)
    k -= k % max(1, int(update_every))
    return (1.0 - k / max_steps) ** power


def build_sgd(groups: Sequence[ParamGroup], lr: float, momentum: float, weight_decay: float,
              nesterov: bool = False) -> torch.optim.SGD:
    """SGD over the trainable parameters of ``groups`` (frozen ones are left out)."""
    torch_groups = []
    for group in groups:
        params = [p for p in group.params if p.requires_grad]
        if not params:
            continue
        torch_groups.append({
            "params": params,
            "lr": lr * group.lr_mult,
            "weight_decay": weight_decay if group.weight_decay is None else group.weight_decay,
            "name": group.name,
        })
    if not torch_groups:
        raise ValueError("the optimiser got no trainable parameters")
    return torch.optim.SGD(torch_groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def poly_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, power: float = 0.9,
                   update_every: int = 1) -> LambdaLR:
    """Step it after every optimiser step (Lightning: ``interval: step``)."""
    return LambdaLR(optimizer, lambda k: poly_factor(k, max_steps, power, update_every))
