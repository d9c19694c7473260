"""Crash-safe, concurrency-safe replacement of a checkpoint's two files, and the reader's side of the protocol.

A checkpoint is two files, ``adapter_model.safetensors`` and ``adapter_config.json``; no filesystem renames two
files at once. The protocol keeps the folder (its inode, and any other files users keep there: README.md,
tokenizer files) and makes every interrupted or concurrent save resolve to one complete checkpoint:

- the weights' safetensors metadata records the sha256 of the exact config bytes saved with them
  (``funcpeft_config_sha256``) and of the config file they replace (``funcpeft_previous_config_sha256``, empty
  when there was none). Safetensors metadata is free-form ``str -> str``; PEFT ignores it, and the JSON config is
  byte for byte what funcpeft always wrote;
- a save holds an exclusive ``flock`` on the folder itself (a hidden ``.funcpeft.lock`` file in it where the
  filesystem cannot lock directories), writes both files to fresh temporaries (``O_CREAT | O_EXCL``, the mode of
  the file they replace or ``0o666`` less the umask, applied by the kernel), fsyncs them and the folder, renames
  the weights, then the config, fsyncs the folder, and only then deletes stray temporaries of earlier,
  interrupted saves (recognised by their exact name, :data:`TEMPORARY`);
- a reader reads the weights through one file descriptor and takes the config whose bytes have the recorded
  hash: ``adapter_config.json``, or a complete config temporary (roll forward: a save was killed between its two
  renames). A config that has neither hash was edited after the save and is taken as it is, as PEFT would; the
  previous config beside new weights is a torn pair, which a reader never returns.

Durability across power loss follows from the fsyncs before and after the renames; SIGKILL at any point is
tested (``tests/test_io_atomic.py``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: saves are not serialised between processes
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CONFIG_HASH",
    "PREVIOUS_HASH",
    "TEMPORARY",
    "commit",
    "file_sha256",
    "load_json",
    "locked",
    "read_capped",
    "read_pair",
    "sha256",
]

CONFIG_HASH = "funcpeft_config_sha256"
PREVIOUS_HASH = "funcpeft_previous_config_sha256"
LOCK_NAME = ".funcpeft.lock"
# The exact names of funcpeft's temporaries; cleanup never touches anything else.
TEMPORARY = re.compile(r"\.(adapter_model\.safetensors|adapter_config\.json)\.funcpeft-[0-9a-f]{16}\.tmp")
_TORN_RETRIES = 8  # a live save renames its config microseconds after its weights: re-read first
_CHANGED_RETRIES = 200  # saves replaced the weights while they were read: read again
_NO_DIRECTORY_LOCK = {errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of ``path``'s bytes, or ``""`` if it does not exist."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return ""
    return digest.hexdigest()


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (or on its hidden lock file) while the body runs.

    The kernel drops the lock when its holder dies, so a killed save never blocks the next one.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # e.g. NFS, where flock on a read-only directory descriptor fails
            if err.errno not in _NO_DIRECTORY_LOCK:
                raise
            os.close(fd)
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temporary(target: Path, data: bytes) -> Path:
    """``data`` in a fresh temporary beside ``target``, fsynced, with ``target``'s mode (and group) if it exists.

    The file is created with its final mode, so no other process sees looser permissions at any time, and the
    process umask is never touched (a new file gets ``0o666`` less the umask, as ``open`` gives).
    """
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    mode = 0o666 if old is None else old.st_mode & 0o7777
    tmp = target.with_name(f".{target.name}.funcpeft-{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o777)
    try:
        if old is not None:
            os.fchmod(fd, mode)  # as PEFT's in-place overwrite: the old mode exactly, whatever the umask
            if old.st_gid != os.fstat(fd).st_gid:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, -1, old.st_gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def commit(folder: Path, files: list[tuple[str, bytes]]) -> None:
    """Replace ``folder``'s files ``[(name, bytes), ...]`` in this order; the caller holds :func:`locked`.

    A failure before the first rename leaves the folder as it was (the temporaries are removed); a config
    temporary left by a failure between the renames is what readers roll forward to.
    """
    written: list[tuple[Path, Path]] = []
    try:
        for name, data in files:
            written.append((_write_temporary(folder / name, data), folder / name))
        fsync_dir(folder)  # the temporaries' names are durable before any of them replaces a file
    except BaseException:
        for tmp, _ in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for tmp, target in written:
        os.replace(tmp, target)
    fsync_dir(folder)
    _remove_strays(folder)


def _remove_strays(folder: Path) -> None:
    """Delete temporaries of earlier, interrupted saves: the folder is complete now and the lock is held."""
    for name in os.listdir(folder):
        if TEMPORARY.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)


def config_temporaries(folder: Path) -> list[Path]:
    """The config temporaries in ``folder`` (complete or not: a reader checks their hash)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [folder / n for n in sorted(names) if TEMPORARY.fullmatch(n) and n.startswith(".adapter_config.json.")]


# ----- reading ------------------------------------------------------------------------------------------------


def read_capped(path: Path, limit: int) -> bytes | None:
    """``path``'s bytes (``None`` if it does not exist).

    Raises:
        ValueError: the file is larger than ``limit`` bytes (named).
    """
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return None
    if len(data) > limit:
        raise ValueError(
            f"{str(path)!r} is larger than {limit} bytes: not an adapter config (PEFT's are a few kilobytes); "
            "check the file."
        )
    return data


def safetensors_metadata(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` of safetensors ``data`` ({} if the header cannot be read: the tensor reader says why)."""
    if len(data) < 8:
        return {}
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size]) if size <= len(data) - 8 else {}
    except ValueError:
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _depth(data: Any, limit: int) -> int:
    """The nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            break
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, level + 1) for child in children)
    return deepest


def load_json(text: bytes, source: Path, max_depth: int) -> Any:
    """``text`` parsed as JSON, at most ``max_depth`` levels deep.

    Raises:
        ValueError: not valid JSON, or nested deeper (named by ``source``), never RecursionError.
    """
    deep = ValueError(f"{str(source)!r} nests deeper than {max_depth} levels: not an adapter config.")
    try:
        data = json.loads(text)
    except RecursionError:
        raise deep from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, a number too long to convert
        raise ValueError(f"{str(source)!r} is not valid JSON: {err}.") from err
    if _depth(data, max_depth) > max_depth:
        raise deep
    return data


def _attempt(folder: Path, weights: Path, config: Path, limit: int) -> tuple[str, bytes, bytes | None]:
    """One read of the pair: ``(verdict, weights bytes, config bytes)``, verdict "pair", "changed" or "torn"."""
    with open(weights, "rb") as f:  # held open until checked below, so no other file can get its inode number
        st = os.fstat(f.fileno())
        data = f.read()
        meta = safetensors_metadata(data)
        recorded = meta.get(CONFIG_HASH)
        text = read_capped(config, limit)
        edited = True  # PEFT's folders record no hash: the config is taken as it is
        if isinstance(recorded, str) and recorded:
            if text is not None and sha256(text) == recorded:
                return "pair", data, text
            for tmp in config_temporaries(folder):
                with contextlib.suppress(ValueError):
                    candidate = read_capped(tmp, limit)
                    if candidate is not None and sha256(candidate) == recorded:
                        return "pair", data, candidate
            edited = text is not None and sha256(text) != meta.get(PREVIOUS_HASH, "")
        try:
            now = os.stat(weights)
        except FileNotFoundError:
            return "changed", data, text
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return "changed", data, text  # a save replaced the weights after they were read: the config may be its
        return ("pair" if edited else "torn"), data, text


def read_pair(folder: Path, weights_name: str, config_name: str, limit: int) -> tuple[bytes, bytes | None]:
    """The weights' bytes and the config bytes saved with them (``None``: there is no config).

    The weights are read through one descriptor; the config is the one whose sha256 they record, from
    ``config_name`` or a complete config temporary (roll forward). Where they record none (PEFT's folders) or the
    config was edited after the save (it has neither the recorded nor the replaced config's hash), the config
    beside the weights is taken, after checking that no save replaced the weights meanwhile.

    Raises:
        FileNotFoundError: there is no ``weights_name``.
        ValueError: the config beside the weights is the one they replaced and no temporary completes the pair
            (a torn checkpoint), or saves kept replacing the weights while they were read.
    """
    weights, config, torn = folder / weights_name, folder / config_name, 0
    for _ in range(_CHANGED_RETRIES):
        verdict, data, text = _attempt(folder, weights, config, limit)
        if verdict == "changed":
            continue
        if verdict == "pair" or (text is None and torn >= _TORN_RETRIES):
            return data, text
        torn += 1
        if torn > _TORN_RETRIES:
            raise ValueError(
                f"{str(folder)!r} holds a torn checkpoint: its {weights_name} was saved with another {config_name} "
                "than the one beside it (a save was interrupted between its two renames, and the config it wrote "
                "is gone). Save the adapter again."
            )
        time.sleep(min(0.05, 0.001 * 2**torn))  # a live save renames its config microseconds after its weights
    raise ValueError(
        f"{str(folder)!r} kept changing while it was read ({_CHANGED_RETRIES} saves replaced {weights_name} "
        "meanwhile); load it again once the saves finish."
    )
