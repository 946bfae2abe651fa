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
    "UntrustedKeyFile",
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


class UntrustedKeyFile(ValueError):
    """The key file, or a directory above it, could be read or replaced by another user."""


def _trusted_uids() -> set[int]:
    return {os.geteuid(), 0}


def _check_directories(path: pathlib.Path) -> None:
    """Refuse a key file that another user could replace: every existing directory above it
    (the link's and the target's, when it is a symbolic link) must belong to you or root and
    be writable by nobody else, unless sticky (as /tmp: there only a file's owner can
    rename or remove it)."""
    chains = {pathlib.Path(os.path.realpath(path)).parent, pathlib.Path(os.path.realpath(path.parent))}
    seen: set[pathlib.Path] = set()
    for directory in chains:
        for d in (directory, *directory.parents):
            if d in seen:
                continue
            seen.add(d)
            try:
                st = os.stat(d)
            except FileNotFoundError:
                continue  # created later by make_private_dir, privately
            mode = stat.S_IMODE(st.st_mode)
            if st.st_uid not in _trusted_uids():
                raise UntrustedKeyFile(
                    f"key file {path} is refused: directory {d} belongs to uid {st.st_uid}, not to you "
                    f"(uid {os.geteuid()}) or root, so its owner can replace the key; fix: keep the key "
                    "file in a directory of your own (set TRT_SUBGRAPH_KEY_FILE)"
                )
            if mode & 0o022 and not mode & stat.S_ISVTX:
                raise UntrustedKeyFile(
                    f"key file {path} is refused: directory {d} is writable by other users (mode {mode:04o}), "
                    f"so they can replace the key; fix: chmod go-w {d}, or keep the key file elsewhere "
                    "(set TRT_SUBGRAPH_KEY_FILE)"
                )


def read_secret(path: pathlib.Path) -> bytes:
    """The 32-byte secret in ``path``, refused unless only you (and root) control it.

    Like ssh with a private key, refuses (:class:`UntrustedKeyFile`, which names the file and
    the fix) a key file that is not a regular file, belongs to another user (whoever created
    it knows the key), is accessible to other users beyond reading by its group (mode bits
    0o027), or lies in a directory that another user can write. Never blocks: a FIFO is opened
    non-blocking and refused. Raises FileNotFoundError when it does not exist, ValueError
    when it does not hold exactly 32 bytes.
    """
    _check_directories(path)
    fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:  # the fd itself, not a file object: that refuses a directory before the check below
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedKeyFile(
                f"key file {path} is refused: it is not a regular file; fix: remove it (a new key is "
                "created on next use) or set TRT_SUBGRAPH_KEY_FILE to a regular file"
            )
        if st.st_uid not in _trusted_uids():
            raise UntrustedKeyFile(
                f"key file {path} is refused: it belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}) "
                "or root, and whoever created it knows the key; fix: remove it (a new key is created on next "
                "use) or set TRT_SUBGRAPH_KEY_FILE to a key file of your own"
            )
        if mode & 0o027:
            raise UntrustedKeyFile(
                f"key file {path} is refused: other users can read or change it (mode {mode:04o}); "
                f"fix: chmod 600 {path} (or 640 to share it with its group)"
            )
        data = os.read(fd, SECRET_LEN + 1)
    finally:
        os.close(fd)
    if len(data) != SECRET_LEN:
        raise ValueError(f"key file {path} holds {len(data)} bytes, expected {SECRET_LEN}")
    return data


def load_or_create_secret(path: pathlib.Path) -> bytes:
    """Read the per-user secret, creating it (32 random bytes, mode 0600) on first use.

    Creation writes a private temp file and hard-links it into place: like O_EXCL, exactly one
    racing process wins, and unlike a bare O_EXCL create nobody can read a half-written key.
    The losers read the winner's key. Raises as :func:`read_secret`; never creates a key in a
    directory that another user can write.
    """
    try:
        return read_secret(path)
    except FileNotFoundError:
        pass
    make_private_dir(path.parent)
    _check_directories(path)
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


def usable_secret(path: pathlib.Path) -> tuple[bytes | None, str | None]:
    """(secret, None) from :func:`load_or_create_secret`, or (None, why the key file at `path`
    cannot be used): what a cache says when it turns itself off. Never raises."""
    try:
        return load_or_create_secret(path), None
    except (OSError, ValueError) as e:
        return None, str(e) if isinstance(e, UntrustedKeyFile) else f"cannot use key file {path}: {e}"
