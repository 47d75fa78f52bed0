"""Importing this module registers every merge method (one import per method module)."""

from . import linear, slerp, task_vectors  # noqa: F401
