"""Importing this module registers every merge method (one import per method module)."""

from . import arcee_fusion, linear, model_stock, nearswap, ram, sce, slerp, spherical, task_vectors  # noqa: F401
