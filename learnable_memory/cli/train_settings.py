"""The defaults of ``train``'s options, importable without torch (so ``train --help`` starts fast).

``FIT_DEFAULTS`` repeats :data:`learnable_memory.training.optim.DEFAULTS` as literals (that module imports
torch); ``tests/test_cli.py`` keeps the two equal.
"""

from __future__ import annotations

#: Defaults of --n-mem and --epochs (None in the parser, so --resume can tell).
N_MEM, EPOCHS = 5, 3
#: ``learnable_memory.training.optim.DEFAULTS``, in its order.
FIT_DEFAULTS = dict(optimizer="sgd", lr=0.6, momentum=0.9, weight_decay=0.0, warmup=0.05, clip=1.0,
                    memory_lr_scale=1.0)
#: Options --resume takes from the record unless given (None in the parser), and their defaults otherwise.
RECORDED = dict(FIT_DEFAULTS, batch_size=128, seed=0, init_seed=None, bf16=False, max_train=None, val_fraction=None,
                no_val=False)
RECORDED.pop("momentum")
