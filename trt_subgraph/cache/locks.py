"""Per-key build locks: an ``flock`` on ``<cache>/locks/<key>.lock``, with its holder inside.

The locks directory and the lock files are opened without following symbolic links (relative
to a descriptor of the directory, so the check cannot be raced), never truncated and never
chmodded once they exist: a link or hard link planted there by another user cannot make a
process write to, or change the mode of, one of its own files. The kernel drops an flock when
its holder dies.

While held, a lock file holds one line, ``<pid> <host> <beat>``, rewritten every
:data:`HEARTBEAT_S` seconds by a daemon thread. A waiter compares what it reads over time on
its own monotonic clock (so clocks that differ between hosts do not matter): a holder that is
stopped (Ctrl-Z, a debugger) stops beating. Imports no torch.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import threading
import time

__all__ = ["HEARTBEAT_S", "BuildLock", "Refused", "describe_holder"]

HEARTBEAT_S = 1.0
_INFO_MAX = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_beating: dict[int, list] = {}  # fd of each lock this process holds -> [holder line prefix, beat]
_guard = threading.Lock()
_thread: threading.Thread | None = None


class Refused(Exception):
    """The locks directory or a lock file is not what the cache creates (a link, a FIFO, ...)."""


def _forget_after_fork() -> None:
    """A forked child holds no lock of its own and has no heartbeat thread."""
    global _guard, _thread
    _beating.clear()
    _guard = threading.Lock()
    _thread = None


os.register_at_fork(after_in_child=_forget_after_fork)


def _write_holder(fd: int, prefix: str, beat: int) -> None:
    line = f"{prefix} {beat}\n".encode()
    os.pwrite(fd, line, 0)
    os.ftruncate(fd, len(line))


def _beat_forever() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _guard:
            for fd, state in _beating.items():
                state[1] += 1
                try:
                    _write_holder(fd, state[0], state[1])
                except OSError:
                    pass  # the lock still holds; waiters may stop waiting after their stall timeout


def _open_locks_dir(directory: str, dir_mode: int) -> int:
    parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            return os.open("locks", _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            pass
        try:
            os.mkdir("locks", 0o700, dir_fd=parent)
        except FileExistsError:
            return os.open("locks", _DIR_FLAGS, dir_fd=parent)  # another process was faster
        fd = os.open("locks", _DIR_FLAGS, dir_fd=parent)
        os.fchmod(fd, dir_mode)  # mkdir's mode is subject to the umask
        return fd
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(
                f"{os.path.join(directory, 'locks')} is not a directory (a symbolic link or a file); remove it"
            ) from None
        raise
    finally:
        os.close(parent)


def _open_lock_file(dir_fd: int, name: str, mode: int, shown: str) -> int:
    try:
        try:
            fd = os.open(name, _FILE_FLAGS | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
            os.fchmod(fd, mode)  # ours, just created: set the mode the umask may have cut
        except FileExistsError:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Refused(f"lock file {shown} is a symbolic link; remove it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise Refused(
            f"lock file {shown} is not a regular file of its own (a FIFO, a device or a hard link); remove it"
        )
    return fd


class BuildLock:
    """The lock file of one key, open; :meth:`try_acquire` takes the flock without waiting."""

    def __init__(self, directory: str, key: str, *, dir_mode: int = 0o700, mode: int = 0o600) -> None:
        """Open (creating where missing) ``directory/locks`` with ``dir_mode`` and the key's lock
        file with ``mode``. Raises :class:`Refused` for a planted link or non-regular file, and
        OSError where the directory cannot be used (read-only, missing)."""
        self.path = os.path.join(directory, "locks", f"{key}.lock")
        dir_fd = _open_locks_dir(directory, dir_mode)
        try:
            self.fd = _open_lock_file(dir_fd, f"{key}.lock", mode, self.path)
        finally:
            os.close(dir_fd)
        self.held = False

    def try_acquire(self) -> bool:
        """Take the flock if free; once taken, the file says who holds it and beats each second."""
        global _thread
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        prefix = f"{os.getpid()} {socket.gethostname() or '?'}"
        with _guard:
            try:
                _write_holder(self.fd, prefix, 0)
            except OSError:
                pass
            _beating[self.fd] = [prefix, 0]
            if _thread is None:
                _thread = threading.Thread(target=_beat_forever, name="trt_subgraph-lock-heartbeat", daemon=True)
                _thread.start()
        return True

    def holder(self) -> bytes:
        """What the lock file says now (the holder's line; changes while its holder is alive)."""
        try:
            return os.pread(self.fd, _INFO_MAX, 0)
        except OSError:
            return b""

    def close(self) -> None:
        """Release the flock (if held) and close the file; the file itself stays."""
        with _guard:
            _beating.pop(self.fd, None)
        if self.held:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.held = False
        os.close(self.fd)


def describe_holder(line: bytes) -> str:
    """``pid 123 on host h`` from a lock file's line, or a phrase for an empty or foreign one."""
    parts = line.decode("ascii", "replace").split()
    if len(parts) == 3 and parts[0].isdigit():
        return f"pid {parts[0]} on host {parts[1]}"
    return "a process that does not say who it is (an older release?)"
