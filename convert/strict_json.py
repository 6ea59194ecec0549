"""JSON parsing for untrusted checkpoint files: errors name the file, duplicate keys are refused.

`json.loads` silently keeps the last of duplicated keys (which tensor location, which config
value did the author mean?) and raises RecursionError on deeply nested input; both become a
ConversionError naming the file here.
"""

from __future__ import annotations

import json
from pathlib import Path

from convert.errors import ConversionError

MAX_BYTES = 32 * 2**20  # config.json and shard indexes are kilobytes; this bounds a hostile one


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _Duplicate(f"key {key[:80]!r} appears twice")
        obj[key] = value
    return obj


def loads(raw: bytes | str, where: str, error: type[ConversionError] = ConversionError, what: str = "JSON"):
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise error(f"{where}: ambiguous {what}: {e}") from None
    except RecursionError:
        raise error(f"{where}: corrupt {what}: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{where}: corrupt {what}: {str(e)[:200]}") from None


def load(path: Path, error: type[ConversionError] = ConversionError, what: str = "JSON"):
    """`loads` of a file no larger than MAX_BYTES."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise error(f"{path}: {what} of {size} bytes exceeds the {MAX_BYTES} this reader accepts")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e}") from e
    return loads(raw, str(path), error, what)
