"""``trt-subgraph cache ls|stats|verify|clear [--remote URL]``: inspect or clean the persistent engine
cache (the local directory, or the fleet's remote cache)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

from . import add_command

DESCRIPTION = """\
Inspect or clean the persistent engine cache. Each entry is one built engine, keyed by its
subgraph's fingerprint, the engine and its settings, the versions and the device."""


def _human_size(n: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    x, i = float(n), 0
    while x >= 1024 and i < len(units) - 1:
        x /= 1024
        i += 1
    return f"{n} B" if i == 0 else f"{x:.1f} {units[i]}"


def _shown(text: str) -> str:
    """``text`` with control characters escaped: a planted header cannot drive the terminal."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _when(t: float | None) -> str:
    try:
        return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):  # a time no calendar holds
        return "-"


def _print_entries(infos: list[Any], when: str, times: list[float | None], where: Any) -> None:
    """The ``ls`` table of a local or remote cache's entries; `when` heads the column of `times`."""
    rows = [("KEY", "FINGERPRINT", "ENGINE", "SIZE", when)]
    rows += [
        (e.key, _shown(str(e.info.get("fingerprint", "-"))), _shown(e.engine), _human_size(e.size), _when(t))
        for e, t in zip(infos, times)
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}")
    print(f"{len(infos)} entries, {_human_size(sum(e.size for e in infos))} in {where}")


def run(args: argparse.Namespace) -> int:
    if args.remote is not None:
        return _run_remote(args)
    if not args.dir:
        print("error: --dir is empty (an unset shell variable?); give the cache directory", file=sys.stderr)
        return 2
    directory = pathlib.Path(args.dir).expanduser()
    try:
        return _run(args, directory)
    except BrokenPipeError:  # `cache ls | head`: the command line's handler ends quietly
        raise
    except OSError as e:
        print(f"error: cannot use the cache directory {directory}: {e.strerror or e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, directory: pathlib.Path) -> int:
    from ..cache import DEFAULT_SIZE_LIMIT, DiskCache, default_key_file

    if directory.exists() and not directory.is_dir():
        print(f"error: --dir {directory} is a file, not a cache directory", file=sys.stderr)
        return 2
    if not directory.is_dir():  # do not create a cache just to look at it
        empty = {
            "ls": [],
            "stats": {
                "entries": 0,
                "bytes": 0,
                "limit": DEFAULT_SIZE_LIMIT,
                "directory": str(directory.absolute()),
                "key_file": str(default_key_file()),
            },
            "verify": {"ok": [], "removed": [], "skipped": []},
        }.get(args.cache_command)
        print(json.dumps(empty) if getattr(args, "json", False) else f"no cache at {directory}")
        return 0
    cache = DiskCache(directory)
    if args.cache_command == "ls":
        infos = sorted(cache.entries(), key=lambda e: e.last_used, reverse=True)
        if args.json:
            listing = [{**dataclasses.asdict(e), "path": str(e.path)} for e in infos]
            print(json.dumps(listing, indent=2, allow_nan=False))
            return 0
        _print_entries(infos, "LAST USE", [e.last_used for e in infos], cache.directory)
        return 0
    if args.cache_command == "stats":
        s = cache.stats()
        if args.json:
            print(json.dumps(s, indent=2))
        else:
            print(
                f"directory  {s['directory']}\nentries    {s['entries']}\n"
                f"size       {_human_size(s['bytes'])} ({s['bytes']} bytes)\n"
                f"limit      {_human_size(s['limit'])} (default; each process applies its own)\n"
                f"key file   {s['key_file']}"
            )
        return 0
    if args.cache_command == "verify":
        return _verified(args, cache)
    n = cache.clear()
    print(f"removed {n} entries from {cache.directory}")
    return 0


def _run_remote(args: argparse.Namespace) -> int:
    """The cache commands on a remote cache (``--remote URL``); 2 when it cannot be used."""
    from ..cache.remote import RedisCache

    try:
        cache = RedisCache(args.remote)
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import redis

    try:
        return _remote_command(args, cache)
    except (OSError, redis.RedisError) as e:
        print(f"error: cannot use the remote cache {cache.shown_url}: {e}", file=sys.stderr)
        return 2


def _remote_command(args: argparse.Namespace, cache: Any) -> int:
    if args.cache_command == "ls":
        infos = sorted(cache.entries(), key=lambda e: e.created or 0.0, reverse=True)
        if args.json:
            print(json.dumps([dataclasses.asdict(e) for e in infos], indent=2, allow_nan=False))
            return 0
        _print_entries(infos, "CREATED", [e.created for e in infos], cache.shown_url)
        return 0
    if args.cache_command == "stats":
        s = cache.stats()
        if args.json:
            print(json.dumps(s, indent=2))
        else:
            ttl = "none (entries stay until removed)" if s["ttl"] is None else f"{s['ttl']} s (default)"
            print(
                f"remote       {s['url']}\nentries      {s['entries']}\n"
                f"size         {_human_size(s['bytes'])} ({s['bytes']} bytes)\n"
                f"entry limit  {_human_size(s['entry_limit'])} (default; each process applies its own)\n"
                f"ttl          {ttl}\nkey file     {s['key_file']}"
            )
        return 0
    if args.cache_command == "verify":
        return _verified(args, cache)
    n = cache.clear()
    print(f"removed {n} entries from {cache.shown_url}")
    return 0


def _verified(args: argparse.Namespace, cache: Any) -> int:
    """Run ``cache.verify()`` and print its result; exit status 1 if any entry was damaged."""
    try:
        result = cache.verify()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, reason in result["removed"]:
            print(f"removed  {key}  {reason}")
        for key, reason in result["skipped"]:
            print(f"skipped  {key}  {reason}")
        print(f"{len(result['ok'])} ok, {len(result['removed'])} damaged, {len(result['skipped'])} skipped")
    return 1 if result["removed"] else 0


def add_cli(subparsers: Any) -> None:
    """Register ``trt-subgraph cache ls|stats|verify|clear``."""
    from ..cache import default_cache_dir

    p = add_command(subparsers, "cache", help="inspect or clean the persistent engine cache", description=DESCRIPTION)
    sub = p.add_subparsers(dest="cache_command", required=True, metavar="{ls,stats,verify,clear}")
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()  # the directory or the remote cache, not both
    where.add_argument(
        "--dir",
        default=str(default_cache_dir()),
        help="cache directory (default: %(default)s, from TRT_SUBGRAPH_CACHE_DIR, else XDG_CACHE_HOME, else ~/.cache)",
    )
    where.add_argument(
        "--remote",
        metavar="URL",
        help="work on the fleet's remote cache at URL (redis://host:port/db) instead of the directory; "
        "verify needs the key file that signed its entries (TRT_SUBGRAPH_KEY_FILE)",
    )
    with_json = argparse.ArgumentParser(add_help=False)
    with_json.add_argument("--json", action="store_true", help="machine-readable output")

    def command(name: str, parents: list, text: str) -> None:
        add_command(sub, name, parents=parents, help=text, description=text[0].upper() + text[1:] + ".")

    command("ls", [common, with_json], "list entries: key, fingerprint, engine, size, last use")
    command("stats", [common, with_json], "entry count, bytes, limit, key file")
    command(
        "verify",
        [common, with_json],
        "check every entry, remove damaged ones, skip other formats and files that are not entries "
        "(exit 1 if any was damaged, 2 if the key file is unusable)",
    )
    command("clear", [common], "remove every entry (of any format version)")
    p.set_defaults(func=run)
