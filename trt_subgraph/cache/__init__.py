"""Persistent, bounded, multi-process-safe disk cache for built engines.

One file per key, ``<key>.entry`` (format: :mod:`trt_subgraph.cache.entry`). Nothing is
unpickled or executed while loading, but an inductor payload is a compiled artifact that torch
*will* run later, so :meth:`DiskCache.get` only returns payloads whose authentication tag
verifies with a per-user secret kept outside the cache directory (:func:`default_key_file`).
Whoever can write the cache directory but cannot read that key file cannot make it run their
code. The key file is refused (cache off, one warning naming the file and the fix) when
anyone but you or root could know or replace it: see :func:`paths.read_secret`. A cache
shared between users therefore needs one key file for all of them, owned by root and
readable by their group only (mode 0640); an entry written with another key is treated as
damaged and removed.

Modules: ``paths`` (where the cache and the key file live, and the key file's checks),
``entry`` (keys and the entry format), ``locks`` (per-key build locks with a heartbeat),
``disk`` (the directory: entries, locks, eviction), ``remote`` (the level a fleet of machines
shares: a Redis server; imported only where used). None of them imports torch.
"""

from __future__ import annotations

from .disk import DEFAULT_LOCK_TIMEOUT, DEFAULT_SIZE_LIMIT, DEFAULT_STALL_TIMEOUT, DiskCache, EntryInfo
from .entry import FORMAT_VERSION, MAGIC, make_key
from .paths import default_cache_dir, default_key_file

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_SIZE_LIMIT",
    "DEFAULT_STALL_TIMEOUT",
    "FORMAT_VERSION",
    "MAGIC",
    "DiskCache",
    "EntryInfo",
    "default_cache_dir",
    "default_key_file",
    "make_key",
]
