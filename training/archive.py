"""Unpacking model archives (``model.tar.gz``) without trusting them.

A model archive comes from a training job: this project's entrypoint, a SageMaker or EC2 job, or
whoever could write to the store. ``safe_extract`` unpacks one only when every member is a plain
file or folder that stays inside the target, no member comes twice, the archive is complete (the
tar end-of-archive marker and the gzip checksum are there) and its files fit the size and count
limits; otherwise it raises ``ArchiveError`` naming the archive, the member and what is wrong.
Members are unpacked into a hidden sibling folder that is renamed into place only when the whole
archive was good, so a refused or interrupted extraction leaves no half-unpacked model that a
later start could load. The archive is read in one pass and the limits are checked as it goes:
a gzip bomb stops at the first header past a limit, not once the disk is full.

``read_member`` reads one small file (``metrics.json``) out of an archive under the same rules,
without unpacking anything.

Python's ``tarfile`` ``data`` filter is not enough on its own: it bounds neither the size nor the
number of members, rewrites some members silently (absolute names, modes) instead of refusing
them, and leaves the members before a refused one on disk. Links are refused outright: the
archives this project writes (the training entrypoint's model folder, packed by the local
backend or SageMaker) hold only files and folders, and a link is the usual way out of a target.

Standard library only: this module ships in the SageMaker training container and is used by the
model server.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

MAX_MODEL_BYTES = 64 * 2**30
MAX_MODEL_MEMBERS = 4096
MAX_MEMBER_READ_BYTES = 16 * 2**20
# The metadata of one member (pax or GNU long-name headers) is small; more is a bomb, not a name.
MAX_HEADER_BYTES = 64 * 2**10
# After the end-of-archive marker only padding to the writer's record size follows (10 KiB with
# the usual blocking factor, 1 MiB with the largest in common use).
MAX_TRAILER_BYTES = 2**20 + tarfile.RECORDSIZE
# The tar reader reads ahead of the member it is on by up to one record.
_READ_AHEAD = 2 * tarfile.RECORDSIZE
# Free space left on the target's file system after unpacking, so a model never fills the disk.
DISK_RESERVE_BYTES = 256 * 2**20
_CHUNK = 2**20

Source = str | os.PathLike[str] | bytes | BinaryIO


class ArchiveError(ValueError):
    """The archive cannot be unpacked safely; the message names it, the member and the problem."""

    def __init__(self, archive: str, member: str | None, problem: str, target: Path | None = None):
        self.archive, self.member, self.problem, self.target = archive, member, problem, target
        where = f"{archive}: member {member!r}" if member is not None else archive
        outcome = f"; nothing was extracted into {target}" if target is not None else ""
        super().__init__(f"{where} {problem}{outcome}")


class _Refused(Exception):
    """Raised inside the reader; ``ArchiveError`` once the archive's name and the target are known.
    Not a ``tarfile`` error, so ``tarfile`` lets it through unchanged."""

    def __init__(self, member: str | None, problem: str):
        super().__init__(problem)
        self.member, self.problem = member, problem


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be at least 1")
    return value


def model_archive_limits() -> dict[str, int]:
    """The limits every model archive is unpacked under: ``LLMOPS_MAX_MODEL_BYTES`` (the files'
    total size, default 64 GiB) and ``LLMOPS_MAX_MODEL_MEMBERS`` (default 4096)."""
    return {
        "max_bytes": _env_int("LLMOPS_MAX_MODEL_BYTES", MAX_MODEL_BYTES),
        "max_members": _env_int("LLMOPS_MAX_MODEL_MEMBERS", MAX_MODEL_MEMBERS),
    }


class _Counted:
    """The decompressed stream, counted: reading past ``limit`` refuses the archive, so a header or
    padding that decompresses to gigabytes is stopped after a few kilobytes."""

    def __init__(self, raw: BinaryIO):
        self.gzip = gzip.GzipFile(fileobj=raw, mode="rb")
        self.count = 0
        self.limit = 0
        self.reading = "the first header"

    def read(self, size: int = -1) -> bytes:
        size = _CHUNK if size is None or size < 0 else size
        if size == 0:
            return b""
        # One byte past the limit is enough to know it was passed; never ask gzip for more.
        data = self.gzip.read(max(1, min(size, self.limit - self.count + 1)))
        self.count += len(data)
        if self.count > self.limit:
            raise _Refused(
                None,
                f"decompresses to more data than its members account for while reading {self.reading}:"
                " a malformed archive or a decompression bomb",
            )
        return data


class _StrictInfo(tarfile.TarInfo):
    """``tarfile`` takes a truncated or corrupt header after the first one for the end of the
    archive and stops quietly; here it refuses the archive, and a real end marker is noted."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.llmops_ended = True
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            raise _Refused(None, "ends before the tar end-of-archive marker: it is truncated") from None
        except tarfile.InvalidHeaderError as exc:
            raise _Refused(None, f"has a corrupt tar header at byte {tar.offset} ({exc})") from None


@contextlib.contextmanager
def _reading(member: str | None) -> Iterator[None]:
    """What the gzip and tar readers raise, as a refusal that says what is wrong."""
    try:
        yield
    except _Refused:
        raise
    except gzip.BadGzipFile as exc:
        problem = f"is not a valid gzip stream ({exc})"
    except EOFError as exc:
        problem = f"is truncated: the compressed stream ends early ({exc})"
    except zlib.error as exc:
        problem = f"is corrupt: the compressed data does not decompress ({exc})"
    except tarfile.TarError as exc:
        problem = f"is not a valid tar archive ({exc})"
    else:
        return
    # The stream is broken, not the member: say where it broke.
    raise _Refused(None, problem + (f", in the data of member {member!r}" if member is not None else ""))


def _parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    """The member's path inside the target, as components; refuses a path that leaves it."""
    name = member.name
    if not name:
        raise _Refused(name, "has an empty name")
    if name.startswith("/"):
        raise _Refused(name, "is an absolute path: members must be relative to the archive's root")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _Refused(name, "points outside the target folder ('..' in its path)")
    return parts


def _check_type(member: tarfile.TarInfo) -> None:
    name = member.name
    if member.issym():
        raise _Refused(
            name,
            f"is a symbolic link (to {member.linkname!r}): model archives hold only files and folders"
            " (pack with tar --dereference)",
        )
    if member.islnk():
        raise _Refused(
            name,
            f"is a hard link (to {member.linkname!r}): model archives hold only files and folders"
            " (pack with tar --hard-dereference)",
        )
    if member.ischr() or member.isblk():
        raise _Refused(name, "is a device node: model archives hold only files and folders")
    if member.isfifo():
        raise _Refused(name, "is a FIFO (named pipe): model archives hold only files and folders")
    if member.issparse():
        raise _Refused(name, "is a sparse file: pack the archive without --sparse")
    if not (member.isreg() or member.isdir()):
        raise _Refused(name, f"has the unsupported tar type {member.type!r}: only files and folders are allowed")


def _check_place(member: tarfile.TarInfo, parts: tuple[str, ...], seen: dict[tuple[str, ...], str]) -> None:
    """Refuses a member that would overwrite another, or sit inside a file."""
    kind = "folder" if member.isdir() else "file"
    if not parts and kind == "file":
        raise _Refused(member.name, "names the target folder itself")
    for i in range(1, len(parts)):
        if seen.get(parts[:i]) == "file":
            raise _Refused(member.name, f"is inside {'/'.join(parts[:i])!r}, which the archive holds as a file")
    previous = seen.get(parts)
    if previous is not None and "file" in (previous, kind):
        raise _Refused(
            member.name, f"appears twice in the archive (a {previous}, then a {kind}): it would overwrite the first"
        )
    for i in range(1, len(parts)):
        seen.setdefault(parts[:i], "folder")
    seen[parts] = kind


def _chunks(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[bytes]:
    with _reading(member.name):
        data = tar.extractfile(member)
    remaining = member.size
    while remaining:
        with _reading(member.name):
            chunk = data.read(min(_CHUNK, remaining))
        if not chunk:
            raise _Refused(member.name, "is truncated: the archive ends inside it")
        remaining -= len(chunk)
        yield chunk


def _members(
    raw: BinaryIO, max_bytes: int, max_members: int, free_bytes: int | None = None
) -> Iterator[tuple[tarfile.TarInfo, tuple[str, ...], Iterator[bytes] | None]]:
    """Each member once checked, with its path and (for a file) its data, in archive order; the
    caller reads a file's data before asking for the next member. The archive's end (marker,
    padding, gzip checksum) is checked after the last member."""
    stream = _Counted(raw)
    stream.limit = MAX_HEADER_BYTES + _READ_AHEAD
    seen: dict[tuple[str, ...], str] = {}
    total = count = 0
    with _reading(None), tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictInfo) as tar:
        while True:
            member = tar.next()
            if member is None:
                break
            count += 1
            if count > max_members:
                raise _Refused(member.name, f"is member number {count}: over the limit of {max_members} members")
            parts = _parts(member)
            _check_place(member, parts, seen)
            _check_type(member)
            size = member.size if member.isreg() else 0
            total += size
            if total > max_bytes:
                raise _Refused(
                    member.name,
                    f"({size:,} bytes) brings the files to {total:,} bytes: over the limit of {max_bytes:,}",
                )
            if free_bytes is not None and total > free_bytes - DISK_RESERVE_BYTES:
                raise _Refused(
                    member.name,
                    f"brings the files to {total:,} bytes, more than the target's file system has free"
                    f" ({free_bytes:,} bytes, keeping {DISK_RESERVE_BYTES:,} in reserve)",
                )
            # This member's data and the next member's headers, and no more.
            stream.limit = stream.count + tar.offset - member.offset_data + MAX_HEADER_BYTES + _READ_AHEAD
            stream.reading = f"the header after member {member.name!r}"
            yield member, parts, (_chunks(tar, member) if member.isreg() else None)
        if not getattr(tar, "llmops_ended", False):
            raise _Refused(None, "ends before the tar end-of-archive marker: it is truncated")
        stream.limit = stream.count + MAX_TRAILER_BYTES
        stream.reading = "the padding after the end of the archive"
        while stream.read(_CHUNK):  # to the gzip trailer, whose checksum and length are verified
            pass


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[BinaryIO]:
    if isinstance(source, bytes):
        yield io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as raw:
            yield raw
    else:
        yield source


def _archive_name(source: Source, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return str(getattr(source, "name", None) or "model archive")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(parent: Path, name: str) -> None:
    """Folders a killed extraction into the same target left behind (their process is gone)."""
    prefixes = (f".{name}.partial-", f".{name}.old-")
    for path in parent.iterdir():
        prefix = next((p for p in prefixes if path.name.startswith(p)), None)
        if prefix is None:
            continue
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _occupied(target: Path) -> bool:
    """Whether ``target`` holds something other than an empty folder."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        return True
    return target.is_dir() and any(target.iterdir())


def _place(staging: Path, target: Path, replace: bool) -> None:
    """The unpacked folder moved to ``target`` (an empty folder there is replaced atomically)."""
    if _occupied(target) and replace:
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
        os.rename(target, aside / "previous")
        os.rename(staging, target)
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        if _occupied(target):
            raise FileExistsError
        os.rename(staging, target)  # refused by the OS when another process filled target meanwhile
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
        raise FileExistsError(f"{target} exists and is not empty: not unpacking over it") from exc
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        raise FileExistsError(f"{target} exists and is not empty: not unpacking over it") from exc


def safe_extract(
    tarball: Source,
    target: str | os.PathLike[str],
    *,
    max_bytes: int,
    max_members: int,
    replace: bool = False,
    name: str | None = None,
) -> Path:
    """Unpack the gzip-compressed tar ``tarball`` (a path, bytes or a binary file) into ``target``.

    The target appears only once every member was unpacked; until then members go to a hidden
    sibling folder. An existing empty ``target`` is replaced; a non-empty one only with
    ``replace`` (and only after the new contents are complete), else ``FileExistsError``.
    ``ArchiveError`` when a member is unsafe or the archive is corrupt, truncated or over
    ``max_bytes`` (the files' total size) or ``max_members``; ``name`` is the archive's name in
    messages. Files are written with modes 0644 or 0755 and the archive's owners are ignored.
    """
    if max_bytes < 0 or max_members < 1:
        raise ValueError(f"max_bytes must be >= 0 and max_members >= 1, got {max_bytes} and {max_members}")
    archive = _archive_name(tarball, name)
    target = Path(os.path.abspath(target))
    if _occupied(target) and not replace:
        raise FileExistsError(f"{target} exists and is not empty: not unpacking {archive} over it")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target.parent, target.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server running as another user
        free = shutil.disk_usage(staging).free
        with _opened(tarball) as raw:
            for member, parts, chunks in _members(raw, max_bytes, max_members, free):
                path = staging.joinpath(*parts)
                if chunks is None:
                    path.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                mode = 0o755 if member.mode & 0o111 else 0o644
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
                with os.fdopen(fd, "wb") as out:
                    for chunk in chunks:
                        out.write(chunk)
        # No fsync: every caller unpacks again at each use, so the rename has to guard against a
        # refused or killed extraction, not against a power cut.
        _place(staging, target, replace)
    except _Refused as exc:
        raise ArchiveError(archive, exc.member, exc.problem, target) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def read_member(
    tarball: Source,
    member: str,
    *,
    max_bytes: int,
    max_members: int,
    max_member_bytes: int = MAX_MEMBER_READ_BYTES,
    name: str | None = None,
) -> bytes | None:
    """The contents of the file ``member`` (``./`` prefixes ignored) of the archive, or None when it
    has none. The members before it are checked as ``safe_extract`` checks them; ``ArchiveError``
    when one is unsafe, or ``member`` is over ``max_member_bytes``."""
    archive = _archive_name(tarball, name)
    wanted = tuple(p for p in member.split("/") if p not in ("", "."))
    try:
        with _opened(tarball) as raw:
            for info, parts, chunks in _members(raw, max_bytes, max_members):
                if parts != wanted or chunks is None:
                    continue
                if info.size > max_member_bytes:
                    raise _Refused(info.name, f"is {info.size:,} bytes: over the {max_member_bytes:,} bytes read here")
                return b"".join(chunks)
    except _Refused as exc:
        raise ArchiveError(archive, exc.member, exc.problem) from None
    return None
