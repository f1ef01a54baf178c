"""The type aliases the core and the families share (one home, as timm's ``layers/typing.py``)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor
#: Two tensors that travel together, e.g. the outputs for the original and the new class tokens.
Pair = tuple[Tensor, Tensor]
#: One attention's memory keys and values, ``[H, M, hd]`` each.
KV = tuple[Tensor, Tensor]
#: An optional additive bias on attention scores.
Bias = Tensor | None
#: Score biases against the original tokens: for the original tokens' queries ``[.., N, N]`` and for
#: the new class tokens' ``[.., 1, N]``.
Biases = tuple[Bias, Bias]
