"""ccmem: Compressed Context Memory for language model interaction.

Keep a long interaction (chat, stream, in-context examples) in a small compressed key/value memory,
and measure what that costs in quality and saves in memory and time.
"""

import ccmem.methods  # noqa: F401 - registers the built-in methods
from ccmem.api import CompressedLM, generate_batch, load
from ccmem.loading import BUILTIN_MODELS, DEFAULT_MODEL, LoadedModel, load_model
from ccmem.memory import Memory
from ccmem.registry import METHODS, get_method, method_names, register

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "METHODS",
    "CompressedLM",
    "LoadedModel",
    "Memory",
    "__version__",
    "generate_batch",
    "get_method",
    "load",
    "load_model",
    "method_names",
    "register",
]
