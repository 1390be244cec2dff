"""SGD + poly schedule (src/stages/optim.py) against hand-computed values."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from src.ops.optim import ParamGroup, build_sgd, poly_factor, poly_scheduler


@pytest.mark.parametrize(("step", "max_steps", "power", "every", "expected"), [
    (0, 100, 0.9, 1, 1.0),
    (1, 100, 0.9, 1, 0.99 ** 0.9),
    (50, 100, 0.9, 1, 0.5 ** 0.9),
    (99, 100, 0.9, 1, 0.01 ** 0.9),      # the last step
    (100, 100, 0.9, 1, 0.01 ** 0.9),     # past max_steps: stays at the last value, never 0
    (5000, 100, 0.9, 1, 0.01 ** 0.9),
    (25, 100, 1.0, 1, 0.75),
    (3, 4, 2.0, 1, 0.25 ** 2),
    # DeepLab's staircase: the lr changes every 10 steps
    (9, 100, 0.9, 10, 1.0),
    (10, 100, 0.9, 10, 0.9 ** 0.9),
    (19, 100, 0.9, 10, 0.9 ** 0.9),
    (55, 100, 0.9, 10, 0.5 ** 0.9),
    (99, 100, 0.9, 10, 0.1 ** 0.9),
    (250, 100, 0.9, 10, 0.1 ** 0.9),
    (0, 1, 0.9, 1, 1.0),                 # a one-step schedule
    (7, 1, 0.9, 1, 1.0),
])
def test_poly_factor_values(step, max_steps, power, every, expected):
    assert poly_factor(step, max_steps, power, every) == pytest.approx(expected, rel=1e-12)


def test_poly_factor_needs_steps():
    with pytest.raises(ValueError, match="max_steps >= 1"):
        poly_factor(0, 0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_build_sgd_groups_multipliers_decay_and_frozen():
    net = Net()
    net.body.bias.requires_grad_(False)
    groups = [
        ParamGroup([*net.body.parameters(), *net.frozen.parameters()], 1.0, name="body"),
        ParamGroup([net.head.weight], 10.0, name="head_w"),
        ParamGroup([net.head.bias], 20.0, weight_decay=0.0, name="head_b"),
        ParamGroup(net.frozen.parameters(), 5.0, name="all_frozen"),
    ]
    opt = build_sgd(groups, lr=0.01, momentum=0.9, weight_decay=1e-4)
    assert [g["name"] for g in opt.param_groups] == ["body", "head_w", "head_b"]  # the frozen group is gone
    body, head_w, head_b = opt.param_groups
    assert [id(p) for p in body["params"]] == [id(net.body.weight)]  # frozen params left out
    assert body["lr"] == pytest.approx(0.01) and body["weight_decay"] == 1e-4
    assert head_w["lr"] == pytest.approx(0.1) and head_w["weight_decay"] == 1e-4
    assert head_b["lr"] == pytest.approx(0.2) and head_b["weight_decay"] == 0.0
    assert all(g["momentum"] == 0.9 and g["nesterov"] is False for g in opt.param_groups)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_sgd([ParamGroup(net.frozen.parameters())], lr=0.1, momentum=0.9, weight_decay=0.0)


def test_scheduler_gives_lr_k_at_step_k():
    net = Net()
    opt = build_sgd([ParamGroup(net.body.parameters(), 1.0), ParamGroup(net.head.parameters(), 10.0)],
                    lr=0.1, momentum=0.0, weight_decay=0.0)
    sched = poly_scheduler(opt, max_steps=20, power=0.9, update_every=1)
    seen = []
    for _ in range(25):
        seen.append([g["lr"] for g in opt.param_groups])  # the lr the optimiser step k uses
        net.body(torch.randn(2, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    for k, (lr_body, lr_head) in enumerate(seen):
        factor = (1 - min(k, 19) / 20) ** 0.9
        assert lr_body == pytest.approx(0.1 * factor, rel=1e-9), k
        assert lr_head == pytest.approx(1.0 * factor, rel=1e-9), k
    assert seen[0] == pytest.approx([0.1, 1.0])  # the first step uses the full lr


def test_scheduler_staircase():
    net = Net()
    opt = build_sgd([ParamGroup(net.head.parameters())], lr=1.0, momentum=0.0, weight_decay=0.0)
    sched = poly_scheduler(opt, max_steps=30, power=1.0, update_every=10)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0] * 10 + [2 / 3] * 10 + [1 / 3] * 10)
