"""The attention arithmetic: the log-sum-exp attention (PyTorch's CPU flash kernel where it serves,
the explicit formula elsewhere) and the new class tokens' merge of the two parts of their softmax."""

from __future__ import annotations

import pytest
import torch

import learnable_memory.attention as attention
from learnable_memory import TaskConfig
from learnable_memory.layout import new_token_index


def tensors(b=2, h=3, k=5, n=7, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, hd, generator=g) for t in (k, n, n)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_path_equals_the_formula(monkeypatch, bias, dtype):
    q, k, v = (t.to(dtype) for t in tensors())
    b = torch.randn(2, 1, 1, 7).to(dtype) if bias else None
    fast = attention.attend_with_lse(q, k, v, 0.3, b)
    monkeypatch.setattr(attention, "_FLASH_CPU", None)
    slow = attention.attend_with_lse(q, k, v, 0.3, b)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, c in zip(fast, slow, strict=True):
        torch.testing.assert_close(a.float(), c.float(), atol=tol, rtol=tol)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.3,
                                                         attn_mask=None if b is None else b.float())
    torch.testing.assert_close(fast[0].float(), ref, atol=tol, rtol=tol)


def test_no_new_tokens_and_training_use_the_formula():
    q, k, v = tensors(k=0)
    out, lse = attention.attend_with_lse(q, k, v, 0.3)
    assert out.shape == (2, 3, 0, 8) and lse.shape == (2, 3, 0)
    q, k, v = tensors()
    q.requires_grad_(True)
    out, _ = attention.attend_with_lse(q, k, v, 0.3)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_merged_softmax_equals_one_softmax_over_everything():
    """attend_new against the same Table 1 row as one masked softmax over all keys."""
    q, kx, vx = tensors(k=3)
    g = torch.Generator().manual_seed(5)
    kc, vc = torch.randn(2, 3, 3, 8, generator=g), torch.randn(2, 3, 3, 8, generator=g)
    tasks = [TaskConfig("a", 2, 2), TaskConfig("b", 1, 2, mode="extension", depends_on=["a"]), TaskConfig("c", 0, 2)]
    km, vm = torch.randn(3, 3, 8, generator=g), torch.randn(3, 3, 8, generator=g)
    got = attention.attend_new(q, kx, vx, kc, vc, km, vm, new_token_index(tasks), 0.3)
    from learnable_memory.mask import new_token_mask

    mask = torch.cat([torch.ones(3, 7, dtype=torch.bool), new_token_mask(tasks)], dim=1)  # [K, N + K + M]
    keys = torch.cat([kx, kc, km.expand(2, -1, -1, -1)], dim=2)
    values = torch.cat([vx, vc, vm.expand(2, -1, -1, -1)], dim=2)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
