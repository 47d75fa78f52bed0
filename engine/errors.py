"""The engine's name for the one exception type users see: `MergeError` (defined in mergeng/errors.py).

Engine modules import it from here, as they always have; the class itself lives at the package
root so that methods/ and architectures/ raise the very same class without importing engine/.
Invariant: this module only re-exports; it defines nothing.
"""

from ..errors import MergeError

__all__ = ["MergeError"]
