"""Where the disk cache and its key file live, and how their directories and the key are made.

Imports no torch: ``trt-subgraph cache`` uses it.
"""

from __future__ import annotations

import logging
import os
import pathlib
import stat
import tempfile

__all__ = [
    "cache_home",
    "default_cache_dir",
    "default_key_file",
    "load_or_create_secret",
    "make_private_dir",
    "read_secret",
]

log = logging.getLogger(__name__)

SECRET_LEN = 32


def _env_path(name: str, *, absolute_only: bool = False) -> pathlib.Path | None:
    """An env var as a path; empty (and, for XDG vars, relative) values count as unset, per the XDG spec."""
    value = os.environ.get(name, "")
    if not value:
        return None
    path = pathlib.Path(value).expanduser()
    if absolute_only and not path.is_absolute():
        return None
    return path


def default_cache_dir() -> pathlib.Path:
    """``$TRT_SUBGRAPH_CACHE_DIR`` > ``$XDG_CACHE_HOME/trt_subgraph`` > ``~/.cache/trt_subgraph``.

    The one definition of the default: the backend (``cache_dir`` option unset) and
    ``trt-subgraph cache`` both call it. A relative ``XDG_CACHE_HOME`` is ignored, as the XDG
    Base Directory spec says (such a value is invalid), and so is an empty one.
    """
    explicit = _env_path("TRT_SUBGRAPH_CACHE_DIR")
    if explicit is not None:
        return explicit
    return cache_home() / "trt_subgraph"


def cache_home() -> pathlib.Path:
    """The user's base cache directory: ``$XDG_CACHE_HOME`` when set to an absolute path (the XDG
    spec says to ignore a relative one), else ``~/.cache``."""
    xdg = _env_path("XDG_CACHE_HOME", absolute_only=True)
    return xdg if xdg is not None else pathlib.Path.home() / ".cache"


def default_key_file() -> pathlib.Path:
    """``$TRT_SUBGRAPH_KEY_FILE`` > ``$XDG_CONFIG_HOME/trt_subgraph/cache.key`` > ``~/.config/...``.

    Deliberately outside the cache directory: the secret must not be readable by whoever can
    only write the cache.
    """
    explicit = _env_path("TRT_SUBGRAPH_KEY_FILE")
    if explicit is not None:
        return explicit
    xdg = _env_path("XDG_CONFIG_HOME", absolute_only=True)
    return (xdg if xdg is not None else pathlib.Path.home() / ".config") / "trt_subgraph" / "cache.key"


def make_private_dir(path: pathlib.Path, mode: int = 0o700) -> None:
    """Create ``path`` and its missing parents with ``mode`` (0700, as XDG asks for its base dirs).

    Each created directory is chmodded too, because the umask can strip bits from mkdir's mode;
    existing directories are left as they are.
    """
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=mode)
        except FileExistsError:
            if not p.is_dir():
                raise
            continue  # another process was faster
        if stat.S_IMODE(p.stat().st_mode) != mode:
            os.chmod(p, mode)


def read_secret(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    if len(data) != SECRET_LEN:
        raise ValueError(f"key file {path} holds {len(data)} bytes, expected {SECRET_LEN}")
    return data


def load_or_create_secret(path: pathlib.Path) -> bytes:
    """Read the per-user secret, creating it (32 random bytes, mode 0600) on first use.

    Creation writes a private temp file and hard-links it into place: like O_EXCL, exactly one
    racing process wins, and unlike a bare O_EXCL create nobody can read a half-written key.
    The losers read the winner's key.
    """
    try:
        return read_secret(path)
    except FileNotFoundError:
        pass
    make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=".cache.key.", dir=path.parent)  # O_EXCL
    try:
        os.fchmod(fd, 0o600)  # mkstemp's 0600 is still subject to the umask
        secret = os.urandom(SECRET_LEN)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return read_secret(path)
        log.info("created cache key file %s", path)
        return secret
    finally:
        os.unlink(tmp)
