"""Collect: results → frame: the result-row schema, reconciling results onto the caller's rows,
and the spend ledger over checkpoints.

Internal: the public names are in ``polars_llmbatch.__all__``.
"""
