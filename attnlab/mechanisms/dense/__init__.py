"""Dense attention: softmax attention and its positional schemes."""
from . import softmax  # noqa: F401
