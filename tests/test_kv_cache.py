"""The memory's keys and values kept across passes: used when nothing changed, recomputed after every
change PyTorch tracks, never stale in a training step, off or capped on request."""

from __future__ import annotations

import pytest
import torch

import learnable_memory as lm
from learnable_memory.blocks import PreNormBlock
from learnable_memory.testing import randomize
from tests.helpers import images_for, make_vit


@pytest.fixture
def model() -> lm.MemoryViT:
    m = make_vit()
    for name in ("a", "b", "c"):
        m = lm.wrap_model(m, n_mem=3, num_classes=4, task=name)
    randomize(m, scale=0.3)
    return m


@pytest.fixture
def computed(monkeypatch) -> list[int]:
    """Counts the memory key/value computations of the blocks (one per block and call)."""
    calls: list[int] = []
    real = PreNormBlock.memory_kv

    def counted(self, blk, mem):
        calls.append(mem.shape[0])
        return real(self, blk, mem)

    monkeypatch.setattr(PreNormBlock, "memory_kv", counted)
    return calls


def fresh(model: lm.MemoryViT, x: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    """The outputs with every key and value computed in the pass itself."""
    model.kv_cache.enabled = False
    try:
        with torch.no_grad():
            return model.forward_all(x, **kw)
    finally:
        model.kv_cache.enabled = True


def cached(model: lm.MemoryViT, x: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return model.forward_all(x, **kw)


def assert_fresh(model: lm.MemoryViT, x: torch.Tensor, what: str) -> None:
    got, want = cached(model, x), fresh(model, x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"{what}, {k}: {m}")


def test_second_pass_reuses_and_a_subset_reads_its_rows(model, computed):
    x = images_for(32)
    first = cached(model, x)
    n = len(computed)
    assert n > 0
    second = cached(model, x)
    sub = cached(model, x, tasks=["c", "a"])
    assert len(computed) == n, "keys/values were computed again with nothing changed"
    for k in first:
        assert torch.equal(second[k], first[k])
    for k in sub:
        torch.testing.assert_close(sub[k], first[k], atol=1e-5, rtol=1e-5)
    depth, d = model.depth, model.embed_dim
    assert model.kv_cache.nbytes == 3 * 3 * depth * 2 * d * 4  # K * m * depth * (k, v) * D * float32


def test_optimizer_steps_are_seen_and_training_never_reads_the_cache(model):
    x, y = images_for(32), torch.tensor([0, 1, 2])
    model.set_task("b").tasks["b"].requires_grad_(True)
    opt = torch.optim.SGD(model.tasks["b"].parameters(), lr=1.0)
    for step in range(3):
        cached(model, x)  # fills the cache with the current values
        loss = torch.nn.functional.cross_entropy(model(x), y)
        want = lm.MemoryViT.forward  # a training pass computes its own keys/values:
        model.kv_cache.enabled = False
        with torch.no_grad():
            ref = torch.nn.functional.cross_entropy(want(model, x), y)
        model.kv_cache.enabled = True
        assert torch.allclose(loss, ref, atol=1e-6), f"step {step}: the training pass used stale keys/values"
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert_fresh(model, x, f"after optimizer step {step}")


@pytest.mark.parametrize("change", ["load_state_dict", "no_grad edit", "backbone edit", "add_task", "remove_task",
                                    "to bfloat16", "autocast"])
def test_every_tracked_change_is_seen(model, change):
    x = images_for(32)
    before = cached(model, x)
    if change == "load_state_dict":
        other = lm.MemoryViT(model.base)
        for name in model.task_names:
            other.add_task(lm.TaskConfig(name, 3, 4))
        randomize(other, seed=7)
        model.load_state_dict(other.state_dict())
    elif change == "no_grad edit":
        with torch.no_grad():
            model.tasks["a"].memory.mul_(-2.0)
    elif change == "backbone edit":
        with torch.no_grad():
            model.base.blocks[0].attn.qkv.weight.mul_(1.5)
    elif change == "add_task":
        model.add_task(lm.TaskConfig("d", 2, 4))
        randomize(model, seed=3, tasks=["d"])
    elif change == "remove_task":
        model.remove_task("b")
    elif change == "to bfloat16":
        model.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    if change == "autocast":  # keys/values made under bf16 autocast must not serve a float32 pass, nor the reverse
        model.clear_kv_cache()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = cached(model, x), fresh(model, x)
        for k in want:
            assert got[k].dtype == want[k].dtype == torch.bfloat16
            torch.testing.assert_close(got[k], want[k], atol=0.05, rtol=0.02)
        assert_fresh(model, x, "after autocast")  # and back in float32
        return
    assert_fresh(model, x, f"after {change}")
    after = cached(model, x)
    assert any(not torch.allclose(after[k].float(), before[k].float(), atol=1e-3) for k in after if k in before) or \
        list(after) != list(before), f"{change} did not change any output: the test proves nothing"


def test_data_edits_are_not_tracked_until_the_cache_is_cleared(model):
    """Documented: writes through ``.data`` bypass the version counter."""
    x = images_for(32)
    cached(model, x)
    model.tasks["a"].memory.data.mul_(-2.0)
    stale, want = cached(model, x)["a"], fresh(model, x)["a"]
    assert not torch.allclose(stale, want, atol=1e-3)
    model.clear_kv_cache()
    torch.testing.assert_close(cached(model, x)["a"], want, atol=1e-5, rtol=1e-5)


def test_values_cached_under_inference_mode_serve_a_later_autograd_pass(model):
    x = images_for(32).requires_grad_(True)
    cached(model, x.detach())
    out = model.forward_all(x)  # autograd on, no task trains: the cache serves, the graph goes to x
    out["a"].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_off_and_capped(model, computed):
    x = images_for(32)
    want = fresh(model, x)
    model.kv_cache.max_bytes = 1000
    got = cached(model, x)
    assert model.kv_cache.nbytes == 0
    n = len(computed)
    cached(model, x)
    assert len(computed) > n, "over the cap, every pass computes its own"
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    model.kv_cache.max_bytes = None
    model.kv_cache.enabled = False
    cached(model, x)
    assert model.kv_cache.nbytes == 0
