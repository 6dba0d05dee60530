"""Built-in methods; importing this package registers them."""

from . import adapter, ia3, lora, none, prompt  # noqa: F401
from .base import Method

__all__ = ["Method"]
