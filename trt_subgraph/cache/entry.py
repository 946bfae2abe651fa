"""Cache keys and the on-disk entry format, with its checks.

One file per key, ``<key>.entry``::

    MAGIC (8 bytes) | format version (u32 BE) | header length (u32 BE) | header (UTF-8 JSON) | payload

The header holds the key, format version, engine name, the caller's ``versions`` and
``info``, the creation time, payload size, payload xxh3_128 and an authentication tag
(HMAC-SHA256 over magic, format, header-without-tag and payload). Nothing is unpickled or
executed while reading an entry, and reading is bounded: the header is at most 1 MiB of JSON,
and the payload is checked in 1 MiB chunks before it is read into memory (only an authentic
payload is). Imports no torch.

Three outcomes besides success: :class:`Damaged` (an entry of this format that fails a check:
the cache removes it), :class:`OtherFormat` (an entry of another release's format: skipped,
never removed) and :class:`Foreign` (not a cache entry at all: left alone).
"""

from __future__ import annotations

import hashlib
import hmac
import io
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
    "Foreign",
    "OtherFormat",
    "check_key",
    "check_meta",
    "decode_entry",
    "encode_entry",
    "encode_head",
    "make_key",
    "parse_header",
    "read_entry",
    "read_header",
]

FORMAT_VERSION = 1  # bump when the entry layout changes; the artifact store puts it in every key too

MAGIC = b"TRT-SGC\n"
_PREFIX = struct.Struct(">II")  # format version, header length
_PREFIX_LEN = len(MAGIC) + _PREFIX.size
_MAX_HEADER = 1 << 20
_CHUNK = 1 << 20  # payload bytes hashed per read: bounds the memory spent on an unverified entry
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
    """An entry of this format failed a check; the message is the reason shown to the user."""


class Foreign(Exception):
    """Not a cache entry (not a regular file, or no cache magic): not the cache's to judge or remove."""


class OtherFormat(Foreign):
    """A cache entry in another release's format: skipped, never removed (that release may use it)."""


def _mac(secret: bytes, header_wo_tag: dict) -> hmac.HMAC:
    """The HMAC over magic, prefix and header, ready to take the payload."""
    body = canonical_json(header_wo_tag).encode()
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    mac.update(MAGIC)
    mac.update(_PREFIX.pack(header_wo_tag["format"], len(body)))
    mac.update(body)
    return mac


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


_MAX_DEPTH = 32  # of ``versions`` and ``info``; the cache's own are 1-3 levels deep


def _too_deep(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` nests deeper than _MAX_DEPTH (JSON-indenting it would hit the recursion limit)."""
    if depth > _MAX_DEPTH:
        return True
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(_too_deep(v, depth + 1) for v in children)


def encode_head(key: str, payload: bytes | memoryview, meta: dict, secret: bytes) -> bytes:
    header = {
        "key": key,
        "format": FORMAT_VERSION,
        **meta,
        "created": time.time(),
        "payload_size": len(payload),
        "payload_xxh3_128": xxhash.xxh3_128_hexdigest(payload),
    }
    mac = _mac(secret, header)
    mac.update(payload)
    header["tag"] = mac.hexdigest()
    body = canonical_json(header).encode()
    return MAGIC + _PREFIX.pack(FORMAT_VERSION, len(body)) + body


def read_header(f) -> dict:
    """Parse magic, version and header from an open entry, reading at most 1 MiB + 16 bytes.

    Raises :class:`Foreign` (not a regular file, bad magic), :class:`OtherFormat` (another
    format version) or :class:`Damaged` (anything else wrong with the header).
    """
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        raise Foreign("not a regular file")
    return _parse_header(f)


def parse_header(data: bytes) -> dict:
    """The header of an entry from its first bytes (at least the prefix and the header); raises as
    :func:`read_header` does (:class:`Damaged` when ``data`` ends inside the header)."""
    return _parse_header(io.BytesIO(data))


def _parse_header(f) -> dict:
    """:func:`read_header` after the file check: ``f`` is any binary stream at the entry's start."""
    prefix = f.read(_PREFIX_LEN)
    if prefix[: len(MAGIC)] != MAGIC:
        raise Foreign("not a trt_subgraph cache entry (bad magic)")
    if len(prefix) < _PREFIX_LEN:
        raise Damaged(f"truncated prefix ({len(prefix)} of {_PREFIX_LEN} bytes)")
    version, length = _PREFIX.unpack(prefix[len(MAGIC) :])
    if version != FORMAT_VERSION:
        raise OtherFormat(f"entry format version {version}, this release reads version {FORMAT_VERSION}")
    if length > _MAX_HEADER:
        raise Damaged(f"header length {length} exceeds {_MAX_HEADER}")
    raw = f.read(length)
    if len(raw) != length:
        raise Damaged(f"truncated header ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise Damaged("malformed header (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise Damaged(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise Damaged("malformed header (not a JSON object)")
    for name, types in _HEADER_TYPES.items():
        if not isinstance(header.get(name), types) or isinstance(header.get(name), bool):
            raise Damaged(f"malformed header (field {name!r} missing or of the wrong type)")
    if header["format"] != version:
        raise Damaged(f"header says format {header['format']}, prefix says {version}")
    if header["payload_size"] < 0 or not math.isfinite(header["created"]):
        raise Damaged("malformed header (negative payload size or non-finite creation time)")
    if _too_deep(header["versions"]) or _too_deep(header["info"]):
        raise Damaged(f"malformed header (nested too deeply: more than {_MAX_DEPTH} levels)")
    return header


def read_entry(f, key: str, secret: bytes, *, payload: bool = True) -> tuple[dict, bytes | None]:
    """Fully verify an open entry and return (header, payload); raise as :func:`read_header`
    does, or :class:`Damaged` on any failure of the payload.

    The sizes are checked against the file before anything is read, and the checksum and tag
    over the payload are computed in 1 MiB chunks: an entry that fails costs bounded memory
    whatever its size. Only then is the payload read (``payload=False``: not read, None
    returned) and its checksum compared once more, in case the file changed meanwhile.
    """
    header = read_header(f)
    start = f.tell()
    _check_payload(f, header, key, secret, os.fstat(f.fileno()).st_size - start)
    if not payload:
        return header, None
    f.seek(start)
    data = f.read(header["payload_size"])
    if len(data) != header["payload_size"] or xxhash.xxh3_128_hexdigest(data) != header["payload_xxh3_128"]:
        raise Damaged("changed while being read")
    return header, data


def decode_entry(data: bytes, key: str, secret: bytes) -> tuple[dict, bytes]:
    """Fully verify an entry held in memory (as a remote cache returns it) and return (header,
    payload); raise :class:`Foreign`, :class:`OtherFormat` or :class:`Damaged` as :func:`read_entry`
    does. The header's ``tag`` is removed."""
    f = io.BytesIO(data)
    header = _parse_header(f)
    start = f.tell()
    _check_payload(f, header, key, secret, len(data) - start)
    return header, data[start:]


def encode_entry(key: str, payload: bytes | memoryview, meta: dict, secret: bytes) -> bytes:
    """The whole entry (header and payload) as one bytes object, as a remote cache stores it."""
    return encode_head(key, payload, meta, secret) + bytes(payload)


def _check_payload(f, header: dict, key: str, secret: bytes, size: int) -> None:
    """Check the key, size, checksum and tag of the ``size`` payload bytes ``f`` holds from its
    position on, in 1 MiB chunks; removes the header's ``tag``. Raises :class:`Damaged`."""
    if header["key"] != key:
        raise Damaged(f"header belongs to key {header['key']!r}")
    if size != header["payload_size"]:
        raise Damaged(f"payload is {size} bytes, header says {header['payload_size']} (truncated?)")
    tag = header.pop("tag")
    mac = _mac(secret, header)
    checksum = xxhash.xxh3_128()
    remaining = size
    while remaining:
        block = f.read(min(_CHUNK, remaining))
        if not block:
            raise Damaged(f"truncated while being read ({size - remaining} of {size} payload bytes)")
        checksum.update(block)
        mac.update(block)
        remaining -= len(block)
    if checksum.hexdigest() != header["payload_xxh3_128"]:
        raise Damaged("payload checksum mismatch")
    if not hmac.compare_digest(tag, mac.hexdigest()):
        raise Damaged("authentication tag mismatch (tampered, or written with another key file)")
