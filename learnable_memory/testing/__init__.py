"""Check a timm backbone against the paper's guarantees, as this project's own tests do.

::

    import timm, torch
    from learnable_memory import testing

    vit = timm.create_model("vit_small_patch16_224", pretrained=True).eval()
    images = torch.randn(2, 3, 224, 224)
    testing.check_all(vit, images, "/tmp/adapters", tol=testing.Tolerance(scaled=True))

Each check raises ``AssertionError`` saying what broke (see :mod:`.guarantees`):
:func:`check_base_unchanged`, :func:`check_new_tokens` (every block's new class tokens against its
kind's dense reference), :func:`check_concatenation`, :func:`check_training`,
:func:`check_save_load`, all five with :func:`check_all`, and :func:`check_dense_reference` against
:func:`dense_forward_all` (timm ``VisionTransformer``) or a reference built on :func:`dense_sequence`
(see :mod:`.dense`). Random weights hide wrong paths where LayerScale starts near zero: use trained
weights, or set the LayerScale gammas near 1 first.
"""

from .dense import dense_forward_all, dense_outputs, dense_sequence, new_class_tokens, unrotated_rows
from .guarantees import (
    LAYOUTS,
    Layout,
    Tolerance,
    assert_equal,
    assert_outputs_close,
    build,
    check_all,
    check_base_unchanged,
    check_concatenation,
    check_dense_reference,
    check_new_tokens,
    check_save_load,
    check_training,
    randomize,
    recorded_blocks,
)

__all__ = [
    "LAYOUTS",
    "Layout",
    "Tolerance",
    "assert_equal",
    "assert_outputs_close",
    "build",
    "check_all",
    "check_base_unchanged",
    "check_concatenation",
    "check_dense_reference",
    "check_new_tokens",
    "check_save_load",
    "check_training",
    "dense_forward_all",
    "dense_outputs",
    "dense_sequence",
    "new_class_tokens",
    "randomize",
    "recorded_blocks",
    "unrotated_rows",
]
