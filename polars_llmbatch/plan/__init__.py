"""Plan: frame → requests → shards, and what they will cost: templates, outputs, the request
spec, rendering and dedup, shard files, token counts, prices, the estimate. Nothing here sends.

Internal: the public names are in ``polars_llmbatch.__all__``.
"""
