"""Keys per client (``--api-keys-file``): a file of named keys, stored as
SHA-256 digests, read again whenever it changes on disk.

One line per key, ``NAME sha256:HEX`` (``#`` starts a comment)::

    # who          the key's SHA-256, never the key itself
    web-frontend   sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

``python -m server.api_keys NAME`` makes a new random key and prints it with
its line. Removing a line revokes that key: requests carrying it get 401
within ``RELOAD_INTERVAL_S``, and streams opened with it end at their next
message.

It owns the file and its digests; it does not know requests, doors or
limits (``server.credentials`` does). The one idea: the server never holds a
key, only digests, so neither the file nor a memory dump gives a key away,
and comparing digests leaks nothing about a key through timing.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import sys
from pathlib import Path

from a2e.errors import ConfigError

log = logging.getLogger("a2e.keys")

RELOAD_INTERVAL_S = 1.0
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
DIGEST = re.compile(r"sha256:([0-9a-fA-F]{64})")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str, path: str) -> dict[bytes, str]:
    """Digest -> name, from the file's text; ConfigError naming the line for anything else."""
    keys: dict[bytes, str] = {}
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"keys file {path}, line {number}"
        if len(parts) != 2 or not DIGEST.fullmatch(parts[1]):
            raise ConfigError(f"{where}: expected 'NAME sha256:<64 hex digits>' (python -m server.api_keys NAME makes one)")
        name, hexdigest = parts[0], DIGEST.fullmatch(parts[1]).group(1)
        if not NAME.fullmatch(name):
            raise ConfigError(f"{where}: a name is 1-64 letters, digits and . _ @ - (got {name[:80]!r})")
        if name in names:
            raise ConfigError(f"{where}: the name {name!r} is used twice")
        value = bytes.fromhex(hexdigest)
        if value in keys:
            raise ConfigError(f"{where}: the same key as {keys[value]!r}")
        keys[value] = name
        names.add(name)
    return keys


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


class KeyRing:
    """The keys of one file. ``refresh`` (called every ``RELOAD_INTERVAL_S``)
    reads it again when it changed; a file that became unreadable or broken
    keeps the keys last read (logged), so a half-written file locks no one out."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.generation = 0  # bumped on every change, so streams can re-check their key cheaply
        try:
            self._stamp = _stamp(self.path)
            self._keys = parse_keys(self.path.read_text(), str(self.path))
            self._names = frozenset(self._keys.values())
        except OSError as exc:
            raise ConfigError(f"cannot read the keys file {self.path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"keys file {self.path} is not text (UTF-8)") from None
        if not self._keys:
            log.warning("the keys file %s holds no key: every request that needs one is refused", self.path)

    @property
    def names(self) -> frozenset[str]:
        return self._names

    def name_of(self, key: str) -> str | None:
        """The name of ``key``, or None. Found by its digest: how long the
        lookup takes depends on the SHA-256 of what was sent, never on how
        much of a stored key it matches, so timing tells nothing about a key."""
        return self._keys.get(digest(key))

    def refresh(self) -> bool:
        """Read the file again if it changed; True when the keys changed."""
        try:
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return False
            keys = parse_keys(self.path.read_text(), str(self.path))
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            log.error("keys file %s not re-read (the keys read before stay in force): %s", self.path, exc)
            return False
        before = set(self._keys.values())
        self._stamp, self._keys = stamp, keys
        after = self._names = frozenset(keys.values())
        self.generation += 1
        log.info(
            "keys file %s re-read: %d keys%s%s", self.path, len(after),
            f"; added: {', '.join(sorted(after - before))}" if after - before else "",
            f"; revoked: {', '.join(sorted(before - after))}" if before - after else "",
        )  # fmt: skip
        return True


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not NAME.fullmatch(argv[0]):
        print("usage: python -m server.api_keys NAME   (NAME: 1-64 letters, digits and . _ @ -)", file=sys.stderr)
        return 2
    key = secrets.token_urlsafe(32)
    print(f"key for {argv[0]} (give it to the client; it is not stored anywhere):\n  {key}")
    print(f"line for the keys file:\n  {argv[0]} sha256:{digest(key).hex()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
