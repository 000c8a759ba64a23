"""Header bytes of .dcz files: plain deflate (format 2.0-2.2) against deflate with the preset
dictionary (2.3), and each file's size and ratio both ways.

    .venv/bin/python benchmarks/header_sizes.py RUN_DIR/MODEL.dcz ...

Each file's header (of either version) is read back and re-encoded both ways; the buffers are
unchanged, so the difference in header bytes (after the 8-byte padding) is the difference in
the file.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

from deepshrink.encode import container


def plain_header_bytes(text: bytes) -> int:
    """Stored bytes of a header deflated as format 2.0-2.2 did: no dictionary, padded to 8.

    Args:
        text: the header's JSON.

    Returns:
        Its stored length.
    """
    length = len(zlib.compress(text, 9))
    return length + (-length % container.ALIGNMENT)


def main(paths: list[str]) -> None:
    """Print one row per file.

    Args:
        paths: .dcz files.
    """
    print("| file | header JSON | plain deflate | with the dictionary | file bytes, 2.2 / 2.3 | ratio, 2.2 / 2.3 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for path in paths:
        data = Path(path).read_bytes()
        header, data_start = container.parse_header(data, path)
        stored = data_start - container.PREAMBLE.size
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
        plain, dictionary = plain_header_bytes(text), len(container.encode_header(header))
        parameter_bytes = (header.get("metadata") or {}).get("fp32_parameter_bytes")
        old_size, new_size = len(data) - stored + plain, len(data) - stored + dictionary
        ratios = f"{parameter_bytes / old_size:.1f}x / {parameter_bytes / new_size:.1f}x" if parameter_bytes else "-"
        print(f"| {path} | {len(text):,} | {plain:,} | {dictionary:,} | {old_size:,} / {new_size:,} | {ratios} |")


if __name__ == "__main__":
    main(sys.argv[1:])
