"""Run: a job on its checkpoint: the `Job` handle, the engine (intent → submit → poll → collect →
retry), the checkpoint directory, HTTP to the providers, the progress bar.

Internal: the public names are in ``polars_llmbatch.__all__``.
"""
