"""timm model families, one module each. Every module here is imported by
:func:`learnable_memory.registry.load_families` and registers its kinds; nothing else imports them."""
