"""The training and evaluation loops: the names of :mod:`learnable_memory.training`, where they live
(:func:`fit`, :func:`evaluate`, :class:`FitResult`, :class:`TaskSettings`, ``DEFAULTS`` ...)."""

from .training import *  # noqa: F403
from .training import __all__  # noqa: F401
