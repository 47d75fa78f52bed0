"""Every merge method by recipe name: the table the engine looks methods up in.

Importing this module imports every method module (each registers its methods with
`@merge_method`, methods/declaration.py) and then closes registration: from then on the table
is complete and read-only, so a name means one method for the life of the process. A new method
module is listed in the import below (an unlisted one imported later is refused).

The declaration vocabulary (MergeContext, MergeMethod, Tensor) is re-exported here for the
engine and the tests; method modules import it from methods/declaration.py, never
from here, so the table depends on the methods and not the other way round.
"""

from __future__ import annotations

from ..errors import MergeError
from . import arcee_fusion, cabs, expo, linear, magmax, model_stock, nearswap, ram, sce, slerp, spherical, subspace, svc, task_vectors  # noqa: F401  (each registers its methods)
from .declaration import MergeContext, MergeMethod, Tensor, close_registration

__all__ = ["REGISTRY", "MergeContext", "MergeMethod", "Tensor", "all_methods", "get_method"]

REGISTRY = close_registration()  # read-only: name -> MergeMethod


def get_method(name: str) -> MergeMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise MergeError(f"merge_method: unknown method '{name}' (known: {known})") from None


def all_methods() -> dict[str, MergeMethod]:
    return dict(sorted(REGISTRY.items()))
