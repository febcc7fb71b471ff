"""The pretext methods, one module each (selfie.py, rotation.py), the contract they follow (base.py), and
their registry (registry.py): the built-in methods listed in one tuple, `register` for others.
"""

from train.methods.base import PretextMethod, Task
from train.methods.registry import METHODS, default_method, method_flags, register, stage_class

__all__ = ["METHODS", "PretextMethod", "Task", "default_method", "method_flags", "register", "stage_class"]
