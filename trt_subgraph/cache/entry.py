"""Cache keys and the on-disk entry format, with its checks.

One file per key, ``<key>.entry``::

    MAGIC (8 bytes) | format version (u32 BE) | header length (u32 BE) | header (UTF-8 JSON) | payload

The header holds the key, format version, engine name, the caller's ``versions`` and
``info``, the creation time, payload size, payload xxh3_128 and an authentication tag
(HMAC-SHA256 over magic, format, header-without-tag and payload). Nothing is unpickled or
executed while reading an entry. Imports no torch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import stat
import struct
import time
from typing import Any

import xxhash

__all__ = [
    "FORMAT_VERSION",
    "KEY_RE",
    "MAGIC",
    "Damaged",
    "check_key",
    "check_meta",
    "encode_head",
    "make_key",
    "read_entry",
    "read_header",
]

FORMAT_VERSION = 1  # bump when the entry layout changes; the artifact store puts it in every key too

MAGIC = b"TRT-SGC\n"
_PREFIX = struct.Struct(">II")  # format version, header length
_PREFIX_LEN = len(MAGIC) + _PREFIX.size
_MAX_HEADER = 1 << 20
KEY_RE = re.compile(r"[0-9a-f]{32}")
_META_KEYS = ("engine", "versions", "info")
_HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "format": int,
    "engine": str,
    "versions": dict,
    "info": dict,
    "created": (int, float),
    "payload_size": int,
    "payload_xxh3_128": str,
    "tag": str,
}


_ALLOWED = "str, int, float, bool, None, and dict (str keys) / list / tuple / set / frozenset of those"


def _normalise(value: Any, where: str) -> Any:
    """JSON-ready copy of ``value`` whose encoding cannot depend on hash seed or insertion order."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}; only finite floats can be part of a cache key")
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; dict keys must be str")
            out[k] = _normalise(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_normalise(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [_normalise(v, f"{where}{{...}}") for v in value]
        return sorted(items, key=canonical_json)
    raise TypeError(f"{where} is a {type(value).__name__}; allowed: {_ALLOWED}")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def make_key(parts: dict) -> str:
    """xxh3_128 hex digest of the canonical JSON of ``parts``.

    Sorted dict keys, tuples as lists and sets as sorted lists make the key independent of
    insertion order, PYTHONHASHSEED and the process; anything else that is not plain data
    (paths, dtypes, objects) is refused so that it cannot sneak a process detail in.
    """
    if not isinstance(parts, dict):
        raise TypeError(f"make_key expects a dict, got {type(parts).__name__}")
    return xxhash.xxh3_128_hexdigest(canonical_json(_normalise(parts, "parts")).encode())


def check_key(key: object) -> str:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ValueError(f"cache key must be 32 lowercase hex chars as returned by make_key, got {key!r}")
    return key


def check_meta(meta: object) -> dict:
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict with keys {_META_KEYS}, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(_META_KEYS))
    if unknown:
        raise ValueError(f"meta has unknown keys {unknown}; allowed: {list(_META_KEYS)}")
    engine = meta.get("engine")
    if not isinstance(engine, str) or not engine:
        raise ValueError(f"meta['engine'] must be a non-empty str naming the engine, got {engine!r}")
    out = {"engine": engine}
    for name in ("versions", "info"):
        value = meta.get(name, {})
        if not isinstance(value, dict):
            raise TypeError(f"meta[{name!r}] must be a dict, got {type(value).__name__}")
        out[name] = _normalise(value, f"meta[{name!r}]")
    return out


class Damaged(Exception):
    """An entry failed a check; the message is the reason shown to the user."""


def _tag(secret: bytes, header_wo_tag: dict, payload: bytes | memoryview) -> str:
    body = canonical_json(header_wo_tag).encode()
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    mac.update(MAGIC)
    mac.update(_PREFIX.pack(header_wo_tag["format"], len(body)))
    mac.update(body)
    mac.update(payload)
    return mac.hexdigest()


def encode_head(key: str, payload: bytes | memoryview, meta: dict, secret: bytes) -> bytes:
    header = {
        "key": key,
        "format": FORMAT_VERSION,
        **meta,
        "created": time.time(),
        "payload_size": len(payload),
        "payload_xxh3_128": xxhash.xxh3_128_hexdigest(payload),
    }
    header["tag"] = _tag(secret, header, payload)
    body = canonical_json(header).encode()
    return MAGIC + _PREFIX.pack(FORMAT_VERSION, len(body)) + body


def read_header(f) -> dict:
    """Parse magic, version and header from an open entry; raise Damaged on any mismatch."""
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        raise Damaged("not a regular file")
    prefix = f.read(_PREFIX_LEN)
    if len(prefix) < _PREFIX_LEN or prefix[: len(MAGIC)] != MAGIC:
        raise Damaged("not a trt_subgraph cache entry (bad magic)")
    version, length = _PREFIX.unpack(prefix[len(MAGIC) :])
    if version != FORMAT_VERSION:
        raise Damaged(f"entry format version {version}, this build reads version {FORMAT_VERSION}")
    if length > _MAX_HEADER:
        raise Damaged(f"header length {length} exceeds {_MAX_HEADER}")
    raw = f.read(length)
    if len(raw) != length:
        raise Damaged(f"truncated header ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Damaged(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise Damaged("malformed header (not a JSON object)")
    for name, types in _HEADER_TYPES.items():
        if not isinstance(header.get(name), types) or isinstance(header.get(name), bool):
            raise Damaged(f"malformed header (field {name!r} missing or of the wrong type)")
    if header["format"] != version:
        raise Damaged(f"header says format {header['format']}, prefix says {version}")
    return header


def read_entry(f, key: str, secret: bytes) -> tuple[dict, bytes]:
    """Fully verify an open entry and return (header, payload); raise Damaged on any failure."""
    header = read_header(f)
    if header["key"] != key:
        raise Damaged(f"header belongs to key {header['key']!r}")
    payload = f.read()
    if len(payload) != header["payload_size"]:
        raise Damaged(f"payload is {len(payload)} bytes, header says {header['payload_size']} (truncated?)")
    if xxhash.xxh3_128_hexdigest(payload) != header["payload_xxh3_128"]:
        raise Damaged("payload checksum mismatch")
    tag = header.pop("tag")
    if not hmac.compare_digest(tag, _tag(secret, header, payload)):
        raise Damaged("authentication tag mismatch (tampered, or written with another key file)")
    return header, payload
