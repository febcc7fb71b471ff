"""The pretext methods, one module each (selfie.py, rotation.py), the contract they follow (base.py), and
their registry (registry.py): the built-in methods listed in one tuple, `register` for others.
"""

from train.methods.base import Parts, PretextMethod, method_parts, parts_of
from train.methods.registry import (
    METHODS,
    default_method,
    default_parts,
    method_flags,
    register,
    stage_class,
)

__all__ = [
    "METHODS",
    "Parts",
    "PretextMethod",
    "default_method",
    "default_parts",
    "method_flags",
    "method_parts",
    "parts_of",
    "register",
    "stage_class",
]
