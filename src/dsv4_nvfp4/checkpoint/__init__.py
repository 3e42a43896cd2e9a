"""Checkpoint toolkit: layouts A/B/C, ``inspect``, ``verify``, ``convert``, ``tiny``.

Submodules are imported on demand (``tiny_bf16`` must stay import-light), so
this package file imports nothing.
"""
