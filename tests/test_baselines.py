"""The baselines train what they claim to, and never change the backbone they are given."""

from __future__ import annotations

import torch

from learnable_memory.baselines import HeadOnly, full_finetune, lora
from tests.helpers import make_vit


def test_head_only_is_a_linear_head_on_the_base_features(images):
    vit = make_vit()
    model = HeadOnly(vit, num_classes=4).train()
    assert not vit.training and [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight",
                                                                                                 "head.bias"]
    with torch.no_grad():
        feats = vit.forward_head(vit.forward_features(images), pre_logits=True)
        torch.testing.assert_close(model(images), model.head(feats))


def test_full_finetune_and_lora_leave_the_base_alone(images):
    vit = make_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    ft = full_finetune(vit, 4)
    assert all(p.requires_grad for p in ft.parameters()) and ft.head.out_features == 4
    lo = lora(vit, 4, r=2)
    names = [n for n, p in lo.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "head" in n for n in names)
    for m in (ft, lo):
        torch.nn.functional.cross_entropy(m(images), torch.tensor([0, 1, 2])).backward()
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())
    assert vit.head.out_features == 7
