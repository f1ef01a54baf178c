"""The memory's keys and values kept across passes: used when nothing changed, recomputed after every
way parameters change (fused, foreach and for-loop optimizers, load_state_dict, in-place edits, .to(),
a new task of an old name), bypassed whenever anything they depend on requires grad, off or capped on
request."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import learnable_memory as lm
from learnable_memory import kv_cache
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

    def counted(self, blk, mem, kinds):
        calls.append(mem.shape[0])
        return real(self, blk, mem, kinds)

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


OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}
IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_step_is_seen(model, optimizer, impl, computed):
    """A fused step changes the parameters without bumping their version counter (torch 2.14.1)."""
    x, y = images_for(32), torch.tensor([0, 1, 2])
    model.tasks["c"].requires_grad_(False)
    model.set_task("b").tasks["b"].requires_grad_(True)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=0.5, **IMPLEMENTATIONS[impl])  # the frozen ones included
    for step in range(2):
        before = cached(model, x)
        n = len(computed)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        after = cached(model, x)
        assert len(computed) - n == 2 * model.depth, "exactly the stepped task's rows are computed again"
        assert not torch.allclose(after["b"], before["b"], atol=1e-3), "the step changed nothing: proves nothing"
        assert_fresh(model, x, f"after {optimizer} ({impl}) step {step}")


def test_a_fused_step_on_a_backbone_parameter_is_seen(model):
    x = images_for(32)
    weight = model.base.blocks[0].norm1.weight
    opt = torch.optim.AdamW([weight], lr=0.5, fused=True)
    cached(model, x)
    weight.grad = torch.ones_like(weight)
    opt.step()
    assert_fresh(model, x, "after a fused step on the backbone")


def new_task(name: str, seed: int) -> lm.TaskMemory:
    """A task made the same way each time (same shapes, same in-place ops: the same version counters)."""
    task = lm.TaskMemory(lm.TaskConfig(name, 3, 4), 2, 192, torch.zeros(192))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return task


@pytest.mark.parametrize("reuse", ["as it happens", "every id and address reused"])
def test_a_new_task_of_a_removed_tasks_name_gets_its_own_keys_and_values(model, reuse, monkeypatch):
    """CPython gives a freed object's ``id`` to a new one and the allocator a freed storage's address:
    neither may identify a task. The second case makes every reuse happen (as it may in any run)."""
    if reuse != "as it happens":
        monkeypatch.setattr(kv_cache, "id", lambda obj: 1, raising=False)
        monkeypatch.setattr(torch.Tensor, "data_ptr", lambda self: 1)
    x = images_for(32)
    model.remove_task("c")
    for seed in range(10):
        model.add_task(new_task("c", seed))
        got, want = cached(model, x)["c"], fresh(model, x)["c"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, s=seed: f"replacement {s}: {m}")
        model.remove_task("c")


@pytest.mark.parametrize("change", ["half then float", "data assigned", "load_state_dict assign", "swap_tensors",
                                    "new parameter"])
def test_new_storage_is_seen_even_at_the_old_address(model, change, monkeypatch):
    """Changes that may keep dtype, shape and version counter, but not the storage, which the allocator
    may place at the old address (here it always does)."""
    monkeypatch.setattr(torch.Tensor, "data_ptr", lambda self: 1)
    x = images_for(32)
    cached(model, x)
    memory = model.tasks["a"].memory
    other = torch.randn_like(memory) * 0.3
    if change == "half then float":
        model.half().float()
    elif change == "data assigned":
        memory.data = other
    elif change == "load_state_dict assign":
        state = model.state_dict()
        state["tasks.a.memory"] = other
        model.load_state_dict(state, assign=True)
    elif change == "swap_tensors":
        torch.utils.swap_tensors(memory, torch.nn.Parameter(other))
    elif change == "new parameter":
        qkv = model.base.blocks[1].attn.qkv
        qkv.weight = torch.nn.Parameter(qkv.weight * 1.5, requires_grad=False)
    assert_fresh(model, x, f"after {change}")


def test_an_unfrozen_backbone_parameter_gets_the_memorys_share_of_its_gradient(model):
    """Cached keys and values carry no graph: a pass where a backbone weight requires grad computes them."""
    x = images_for(32)
    weight = model.base.blocks[1].norm1.weight
    weight.requires_grad_(True)
    cached(model, x)  # fills the cache

    def grad(enabled: bool) -> torch.Tensor:
        model.kv_cache.enabled = enabled
        weight.grad = None
        model.forward_all(x, tasks=["a", "base"])["a"].square().sum().backward()
        model.kv_cache.enabled = True
        return weight.grad

    reference = grad(False)
    assert reference is not None and reference.abs().sum() > 0
    torch.testing.assert_close(grad(True), reference, atol=1e-6, rtol=1e-5)


def test_train_and_eval_empty_the_cache(model):
    """A safety net for edits the cache can not see: entering or leaving training mode recomputes."""
    x = images_for(32)
    cached(model, x)
    model.tasks["a"].memory.data.mul_(-2.0)  # untracked, as documented
    model.train()
    model.eval()
    assert_fresh(model, x, "after train() / eval()")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_model_has_its_own_cache_that_sees_fused_steps(model, how):
    x = images_for(32)
    cached(model, x)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin.kv_cache is not model.kv_cache and twin.kv_cache.nbytes == 0
    cached(twin, x)
    memory = twin.tasks["a"].memory
    memory.requires_grad_(True)
    opt = torch.optim.Adam([memory], lr=0.5, fused=True)
    memory.grad = torch.ones_like(memory)
    opt.step()
    memory.requires_grad_(False)
    assert_fresh(twin, x, f"after a fused step on a {how} copy")
    assert_fresh(model, x, "the original, untouched")


def test_a_backbone_of_inference_tensors_is_served_without_the_cache():
    with torch.inference_mode():
        m = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="a")
        got = m.forward_all(images_for(32))
    assert m.kv_cache.nbytes == 0
    m.kv_cache.enabled = False
    with torch.inference_mode():
        want = m.forward_all(images_for(32))
    for k in want:
        assert torch.equal(got[k], want[k])


def test_a_compiled_optimizer_step_is_seen(model):
    """A compiled (fused) optimizer step is seen too, also by a cache made after the step was compiled."""
    import torch._dynamo

    torch._dynamo.reset()
    x = images_for(32)
    memory = model.tasks["c"].memory
    opt = torch.optim.Adam([memory], lr=0.5, fused=True)
    step = torch.compile(opt.step, backend="eager")
    for i in range(2):
        cached(model, x)
        memory.grad = torch.ones_like(memory)
        step()
        assert_fresh(model, x, f"after compiled step {i}")
        model = copy.deepcopy(model)  # a cache that did not exist when the step was compiled
        memory = model.tasks["c"].memory
        opt.param_groups[0]["params"] = [memory]
    torch._dynamo.reset()
