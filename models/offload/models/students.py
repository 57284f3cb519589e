"""Edge architectures for `offload distill`: torch module factories a model's [distill] section names.

    [distill]
    factory = "offload.models.students:digits_mlp"

A factory is called with no arguments and returns the untrained module; `offload distill` trains it on the
cloud's recorded answers (and labelled rows, if given) and exports it to ONNX. The module takes the model's
inputs as model.toml declares them, in order, and returns its outputs (one tensor, or a tuple in order).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as nnf

# The digits model's pixels are the raw 0..16 values scikit-learn ships; the module scales them itself.
DIGITS_PIXEL_MAX = 16.0
DIGITS_FEATURES = 64
DIGITS_CLASSES = 10
DIGITS_HIDDEN = 32


class DigitsMLP(nn.Module):
    """`pixels` (FP32 [batch, 64], 0..16) -> DIGITS_HIDDEN ReLU units -> `scores` (10 logits)."""

    def __init__(self, hidden: int = DIGITS_HIDDEN) -> None:
        super().__init__()
        self.hidden = nn.Linear(DIGITS_FEATURES, hidden)
        self.output = nn.Linear(hidden, DIGITS_CLASSES)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.output(nnf.relu(self.hidden(pixels / DIGITS_PIXEL_MAX)))
        return logits


def digits_mlp() -> nn.Module:
    """The digits model's small edge MLP, untrained (torch's default initialisation)."""
    return DigitsMLP()
