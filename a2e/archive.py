"""Unpacking a downloaded archive without trusting it.

The released weights come as a (gzip) tar archive from a place we do not
control. Unpacking writes only regular files, only inside the target
folder, and only up to a bounded size and member count: a member named
``../x`` or ``/etc/x``, a symbolic or hard link, a device or FIFO, or an
archive that unpacks past the bound is refused whole, before anything of
that member is written. A truncated or damaged archive is refused with what
is wrong.

It owns unpacking; finding the checkpoint among the files is ``a2e.hub``'s.
"""

from __future__ import annotations

import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from .errors import CheckpointError

# The released archive holds one ~410 MB checkpoint; room for more, not for a bomb.
MAX_UNPACKED_BYTES = 4 << 30
MAX_MEMBERS = 10_000
_COPY_BLOCK = 1 << 20


class ArchiveRefused(CheckpointError):
    """An archive that is damaged, or that would write outside its folder, links or too much."""


def is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ArchiveRefused(f"archive member {name!r} would be written outside the target folder")
    return path


def unpack(archive: Path, target: Path, max_bytes: int = MAX_UNPACKED_BYTES, max_members: int = MAX_MEMBERS) -> list[Path]:
    """Unpack the regular files of ``archive`` (tar, plain or compressed) into
    ``target``; returns their paths. Raises ArchiveRefused (nothing more is
    written) at the first member that breaks a rule."""
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    written: list[Path] = []
    total = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for count, member in enumerate(tar, start=1):
                if count > max_members:
                    raise ArchiveRefused(f"archive {archive.name} has more than {max_members} members")
                name = _safe_name(member.name)
                if member.issym() or member.islnk():
                    raise ArchiveRefused(f"archive member {member.name!r} is a link; links are refused")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ArchiveRefused(f"archive member {member.name!r} is not a regular file")
                total += member.size
                if total > max_bytes:
                    raise ArchiveRefused(
                        f"archive {archive.name} unpacks to more than {max_bytes / (1 << 30):.1f} GiB; refused"
                    )
                dest = (root / name).resolve()
                if not dest.is_relative_to(root) or dest == root:
                    raise ArchiveRefused(f"archive member {member.name!r} would be written outside the target folder")
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    raise ArchiveRefused(f"archive member {member.name!r} cannot be read")
                with source, dest.open("wb") as out:
                    shutil.copyfileobj(source, out, _COPY_BLOCK)
                if dest.stat().st_size != member.size:
                    raise ArchiveRefused(f"archive {archive.name} is truncated inside {member.name!r}")
                written.append(dest)
    except ArchiveRefused:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ArchiveRefused(f"archive {archive.name} is truncated or damaged: {exc or type(exc).__name__}") from None
    return written
