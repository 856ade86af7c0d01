"""Optimizers and schedules against hand computations."""

import pytest
import torch
from torch import nn

from ssl_vit.optim import build_optimizer, param_groups, warmup_cosine


class OneWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5; rank 2, so weight decay applies


def step(name: str, **kw) -> torch.Tensor:
    m = OneWeight()
    opt = build_optimizer(param_groups(m, 0.0), name, lr=1.0, momentum=0.9, **kw)
    m.w.grad = torch.tensor([[0.6, 0.8]])  # norm 1
    opt.step()
    return m.w.detach()


def test_lars_scales_the_step_by_the_trust_ratio():
    # MAE's LARS: update = lr * 0.001 * ||w|| / ||g|| * g, even with zero weight decay
    torch.testing.assert_close(step("lars"), torch.tensor([[3 - 0.003, 4 - 0.004]]))


def test_sgd_and_adamw_first_steps():
    torch.testing.assert_close(step("sgd"), torch.tensor([[3 - 0.6, 4 - 0.8]]))
    # Adam's first step moves every coordinate by lr (bias-corrected m / sqrt(v) = sign(g)), up to
    # its eps 1e-8 against |g| and float32 rounding at 3.0 (2.4e-7 an ulp)
    torch.testing.assert_close(step("adamw"), torch.tensor([[2.0, 3.0]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="train.optimizer"):
        step("rmsprop")


def test_warmup_cosine_is_continuous_at_the_end_of_warmup():
    before, at = warmup_cosine(9.999, 100, 10, 1.0, 0.0), warmup_cosine(10, 100, 10, 1.0, 0.0)
    assert at == 1.0 and before == pytest.approx(at, abs=1e-3)  # linear: 1e-3 of warmup away
