"""A token-counting worker process: Arrow IPC chunks of texts in on stdin, counts out on stdout.

Started by :func:`polars_llmbatch.plan.tokens.counting.count_texts` (``main(["o200k_base"])`` in a
fresh interpreter). It is a plain subprocess rather than a
``multiprocessing`` pool: spawn would re-import the caller's ``__main__`` script (and fail in
scripts without an ``if __name__ == "__main__"`` guard), and fork is unsafe under polars'
threads.

Protocol, repeated until stdin closes: the parent writes an 8-byte little-endian length and an
Arrow IPC stream holding one string column; the worker answers with an 8-byte length and the
counts as little-endian int64 values.
"""

from __future__ import annotations

import struct
import sys
from array import array
from typing import BinaryIO

_LEN = struct.Struct("<Q")


def read_frame(stream: BinaryIO) -> bytes | None:
    """One length-prefixed message, or ``None`` at a clean end of stream."""
    head = stream.read(_LEN.size)
    if not head:
        return None
    if len(head) != _LEN.size:
        raise EOFError("truncated message length")
    (size,) = _LEN.unpack(head)
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("truncated message")
    return data


def write_frame(stream: BinaryIO, data: bytes) -> None:
    stream.write(_LEN.pack(len(data)))
    stream.write(data)
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    import pyarrow as pa

    from polars_llmbatch.plan.tokens.encodings import get_encoding

    (encoding,) = argv if argv is not None else sys.argv[1:]
    encode = get_encoding(encoding).encode_ordinary
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (message := read_frame(stdin)) is not None:
        texts = pa.ipc.open_stream(message).read_all().column(0).to_pylist()
        counts = array("q", (len(encode(t)) if t is not None else 0 for t in texts))
        if sys.byteorder != "little":  # pragma: no cover
            counts.byteswap()
        write_frame(stdout, counts.tobytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
