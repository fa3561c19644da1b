"""The cooperative machine: a real Linux i386 guest on an emulated CPU, with conode's devices."""

# Choose the Unicorn library (conode's fast engine or the stock wheel) before any module imports unicorn.
from conode.vm.cpu.engine import SELECTED as ENGINE

__all__ = ["ENGINE"]
