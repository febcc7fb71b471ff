"""The pretext methods, one module each, and their registry (train/methods/base.py).

Importing this package registers the built-in methods, in the order every list shows them (the default
first); a new method is one module with one `register(...)` call, imported here (or by whoever uses it,
before parsing a config).
"""

# isort: off
from train.methods import selfie  # noqa: F401  (each module registers its methods)
from train.methods import rotation  # noqa: F401

# isort: on
from train.methods.base import METHODS, PretextMethod, Task, default_method, method_flags, register

__all__ = ["METHODS", "PretextMethod", "Task", "default_method", "method_flags", "register"]
