"""Weights from the Hugging Face Hub: ``hf://OWNER/REPO[@REVISION][/FILE]``.

    python -m a2e.hub fetch hf://3DAIGC/LAM_audio2exp      # download, verify, convert; prints the file

The released LAM-A2E streaming model is ``LAM_audio2exp_streaming.tar`` in
``3DAIGC/LAM_audio2exp``: a gzip tar archive with a torch checkpoint inside.
``fetch`` downloads the file with ``huggingface_hub`` (so ``HF_HOME``,
``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` work as everywhere
else; an interrupted download resumes), checks it against the hub's
SHA-256, unpacks it safely (``a2e.archive``), finds the checkpoint by its
content (the tensors of the LAM-A2E layout, whatever its path inside), and
converts it once into a safetensors file in ``$HF_HOME/lam-a2e``, keyed by
the repository's commit and checked against its own SHA-256 on every use.
Later starts load that file without downloading the archive again, offline
too.

It owns the download and the converted cache; loading a checkpoint into the
network is ``a2e.checkpoint``'s. It never falls back to another model: what
cannot be fetched is an error that names the repository and the manual steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import torch

from .archive import is_tar, unpack
from .checkpoint import normalise_keys, read_state_dict
from .errors import CheckpointError
from .model import Audio2Expression, ModelDims

log = logging.getLogger("a2e.hub")

SCHEME = "hf://"
RELEASED = "hf://3DAIGC/LAM_audio2exp"
DEFAULT_FILE = "LAM_audio2exp_streaming.tar"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubError(CheckpointError):
    """Weights named by an hf:// address could not be fetched or verified."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str
    filename: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo_id}@{self.revision}/{self.filename}"


def is_hub_uri(value: str | None) -> bool:
    return bool(value) and str(value).startswith(SCHEME)


def parse(uri: str) -> HubRef:
    """``hf://OWNER/REPO[@REVISION][/FILE]``; the revision defaults to main, the file to the streaming model."""
    if not is_hub_uri(uri):
        raise HubError(f"not an hf:// address: {uri!r}")
    rest = uri[len(SCHEME):]
    parts = rest.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise HubError(f"{uri!r}: expected hf://OWNER/REPO[@REVISION][/FILE], e.g. {RELEASED}")
    owner, repo = parts[0], parts[1]
    filename = parts[2] if len(parts) == 3 and parts[2] else DEFAULT_FILE
    repo, _, revision = repo.partition("@")
    revision = revision or "main"
    if not (_REPO_PART.match(owner) and _REPO_PART.match(repo)):
        raise HubError(f"{uri!r}: owner and repository names may hold letters, digits, '.', '_' and '-' only")
    if ".." in filename.split("/") or filename.startswith("/"):
        raise HubError(f"{uri!r}: the file must be a path inside the repository")
    return HubRef(f"{owner}/{repo}", revision, filename)


def cache_root() -> Path:
    """``$HF_HOME/lam-a2e`` (HF_HOME as huggingface_hub reads it, ~/.cache/huggingface by default)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HOME") or constants.HF_HOME) / "lam-a2e"


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def manual_steps(ref: HubRef) -> str:
    return (
        f"To get it by hand where the hub is reachable: `hf download {ref.repo_id} {ref.filename} --revision "
        f"{ref.revision} --local-dir .`, unpack it (`tar -xzf {Path(ref.filename).name}`), and start with "
        f"--weight pointing at the checkpoint inside (upstream: pretrained_models/lam_audio2exp_streaming.tar); "
        f"or run `python -m a2e.hub fetch {SCHEME}{ref.repo_id}` there and copy {cache_root()} here"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the converted cache: <root>/<owner>--<repo>/<commit>/<file>.safetensors (+ .json) ---------------
class ConvertedCache:
    def __init__(self, root: Path, ref: HubRef) -> None:
        self.repo_dir = root / ref.repo_id.replace("/", "--")
        self.ref = ref

    def path(self, commit: str) -> Path:
        return self.repo_dir / commit / (Path(self.ref.filename).stem + ".safetensors")

    def commit_of(self, revision: str) -> str | None:
        """The commit a revision pointed to when it was last fetched (what offline starts use)."""
        if _COMMIT.match(revision):
            return revision
        ref_file = self.repo_dir / "refs" / quote(revision, safe="")
        try:
            commit = ref_file.read_text().strip()
        except OSError:
            return None
        return commit if _COMMIT.match(commit) else None

    def remember(self, revision: str, commit: str) -> None:
        if revision != commit:
            ref_file = self.repo_dir / "refs" / quote(revision, safe="")
            ref_file.parent.mkdir(parents=True, exist_ok=True)
            ref_file.write_text(commit)

    def verified(self, commit: str) -> Path | None:
        """The converted file for ``commit`` when it is there and matches its recorded SHA-256."""
        path = self.path(commit)
        meta = path.with_suffix(".json")
        if not (path.is_file() and meta.is_file()):
            return None
        try:
            expected = json.loads(meta.read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            expected = None
        if expected is not None and _sha256(path) == expected:
            return path
        log.warning("the cached conversion %s does not match its checksum; converting again", path)
        path.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        return None

    def store(self, commit: str, state: dict[str, torch.Tensor], record: dict) -> Path:
        """Write the tensors as safetensors, read them back, compare, then publish atomically."""
        from safetensors.torch import save_file

        path = self.path(commit)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
            back = read_state_dict(tmp)
            if back.keys() != state.keys() or not all(torch.equal(back[k], v) for k, v in state.items()):
                raise HubError(f"the converted file {tmp} does not read back as written; is the disk full?")
            record = {**record, "sha256": _sha256(tmp), "tensors": len(state)}
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        path.with_suffix(".json").write_text(json.dumps(record, indent=2))
        return path


# -- finding the checkpoint by its content -------------------------------------------------------------
def layout(dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the network for ``dims`` (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = Audio2Expression(dims)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def find_checkpoint(files: list[Path], dims: ModelDims) -> tuple[Path, dict[str, torch.Tensor]]:
    """The one file among ``files`` whose tensors are exactly the layout of ``dims``."""
    expected = layout(dims)
    found: list[tuple[Path, dict[str, torch.Tensor]]] = []
    for path in sorted(files):
        try:
            state = read_state_dict(path)
            shapes = {k: tuple(v.shape) for k, v in normalise_keys(state).items()}
        except CheckpointError:
            continue  # not a checkpoint (an asset, a readme)
        if shapes == expected:
            found.append((path, state))
        else:
            log.info("%s holds %d tensors, not the %d of the LAM-A2E layout: not it", path.name, len(shapes), len(expected))
    if not found:
        raise HubError(
            f"no checkpoint with the {len(expected)} tensors of the LAM-A2E layout in "
            f"{', '.join(p.name for p in files) or 'the download (it holds no files)'}"
        )
    if len(found) > 1:
        raise HubError(f"more than one checkpoint of the LAM-A2E layout in the download: {[p.name for p, _ in found]}")
    return found[0]


# -- the download -------------------------------------------------------------------------------------
def _progress_class():
    """huggingface_hub's progress bar (shown on a terminal), also telling the log every 10 %."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class LoggedProgress(hub_tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            # Our own count: a bar that is not shown (no terminal) counts nothing itself.
            self._name = kwargs.get("desc") or "weights"
            self._total = int(kwargs.get("total") or 0)
            self._done = int(kwargs.get("initial") or 0)
            self._told = -1
            if self._done:
                log.info("resuming the download of %s at %.0f MB", self._name, self._done / 1e6)

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            step = int(10 * self._done / self._total) if self._total else -1
            if step > self._told:
                self._told = step
                log.info("downloading %s: %d %% (%.0f of %.0f MB)", self._name, 10 * step, self._done / 1e6,
                         self._total / 1e6)  # fmt: skip
            return super().update(n)

    return LoggedProgress


def _download(ref: HubRef, commit: str, endpoint: str | None, folder: Path) -> tuple[Path, str | None]:
    """The file at ``commit``, downloaded into ``folder``; and its SHA-256 as the hub states it.

    huggingface_hub resolves the address, adds the token (HF_TOKEN), follows
    redirects, retries and resumes within one run; the partial file here
    (``<file>.part``) also outlives the process, so a download that was
    stopped (Ctrl-C, a node going away) goes on from where it was next time,
    which the hub client's own cache no longer does across processes."""
    from urllib.parse import urlsplit

    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(ref.repo_id, ref.filename, revision=commit, endpoint=endpoint)
    meta = get_hf_file_metadata(url)
    headers = build_hf_headers()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a storage host's signed address: the token stays with the hub
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / Path(ref.filename).name
    part = done.with_name(done.name + ".part")
    t0 = time.monotonic()
    with part.open("ab") as fh:
        have = fh.tell()
        if meta.size is not None and have > meta.size:  # not a prefix of this file
            fh.truncate(0)
            have = 0
        http_get(meta.location, fh, resume_size=have, headers=headers, expected_size=meta.size,
                 displayed_filename=done.name, tqdm_class=_progress_class())  # fmt: skip
    os.replace(part, done)
    log.info("%s is here (%.0f MB, %.1f s)", ref.filename, done.stat().st_size / 1e6, time.monotonic() - t0)
    etag = (meta.etag or "").strip('"').lower()
    return done, etag if _SHA256.match(etag) else None


def _resolve_commit(ref: HubRef, cache: ConvertedCache, endpoint: str | None) -> str:
    """The commit ``ref.revision`` names: asked of the hub (a HEAD request, no download); offline or
    unreachable, the one recorded when it was last fetched."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if offline_mode():
        commit = cache.commit_of(ref.revision)
        if commit is None:
            raise HubError(f"{ref} is not in the cache and HF_HUB_OFFLINE is set. {manual_steps(ref)}")
        return commit
    where = f"{ref} ({endpoint or os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'})"
    try:
        meta = get_hf_file_metadata(hf_hub_url(ref.repo_id, ref.filename, revision=ref.revision, endpoint=endpoint))
    except GatedRepoError:
        raise HubError(f"{where}: the repository is gated; accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"{where}: no such repository (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: the repository has no revision {ref.revision!r}") from None
    except RemoteEntryNotFoundError:
        raise HubError(f"{where}: the repository has no file {ref.filename!r}") from None
    except Exception as exc:  # no network, refused, timed out, a proxy's error page: the client raises many kinds
        commit = cache.commit_of(ref.revision)
        if commit is not None and cache.verified(commit) is not None:
            log.warning("the hub is not reachable (%s): using the cached %s at %s", exc, ref.filename, commit[:12])
            return commit
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HubError(f"cannot reach the hub for {where}: {reason}. {manual_steps(ref)}") from None
    if not meta.commit_hash or not _COMMIT.match(meta.commit_hash):
        raise HubError(f"{where}: the server did not say which commit it serves; is HF_ENDPOINT a hub?")
    return meta.commit_hash


def fetch(uri: str, dims: ModelDims | None = None, endpoint: str | None = None) -> Path:
    """A verified safetensors checkpoint for ``uri``, from the converted cache or downloaded and converted now."""
    ref = parse(uri)
    dims = dims or ModelDims.released()
    cache = ConvertedCache(cache_root(), ref)
    commit = _resolve_commit(ref, cache, endpoint)
    cached = cache.verified(commit)
    if cached is not None:
        log.info("weights of %s at %s from the cache: %s", ref, commit[:12], cached)
        cache.remember(ref.revision, commit)
        return cached
    if offline_mode():
        raise HubError(f"{ref} at {commit[:12]} is not converted in the cache and HF_HUB_OFFLINE is set. {manual_steps(ref)}")
    log.info("fetching %s at %s", ref, commit[:12])
    try:
        archive, sha256 = _download(ref, commit, endpoint, cache.path(commit).parent)
    except CheckpointError:
        raise
    except Exception as exc:  # the hub's client raises many kinds; all mean 'not downloaded'
        raise HubError(f"downloading {ref} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
                       f"Run the same command again to resume. {manual_steps(ref)}") from None  # fmt: skip
    try:  # the download is judged now, kept or refused: either way it is not needed again
        if sha256 is not None and _sha256(archive) != sha256:
            raise HubError(f"{ref.filename} does not match the SHA-256 the hub states for it: the download is "
                           "damaged or was tampered with; it was removed, run the same command again")  # fmt: skip
        with tempfile.TemporaryDirectory(prefix=".unpack-", dir=archive.parent) as tmp:  # on the cache's disk
            files = unpack(archive, Path(tmp)) if is_tar(archive) else [archive]
            member, state = find_checkpoint(files, dims)
            inside = member.relative_to(tmp).as_posix() if member.is_relative_to(tmp) else member.name
            log.info("checkpoint found in %s: %s (%d tensors); converting to safetensors", ref.filename, inside, len(state))
            path = cache.store(commit, state, {"repo": ref.repo_id, "revision": ref.revision, "commit": commit,
                                               "file": ref.filename, "file_sha256": sha256, "member": inside})  # fmt: skip
    finally:
        archive.unlink(missing_ok=True)
    cache.remember(ref.revision, commit)
    log.info("weights of %s at %s ready: %s", ref, commit[:12], path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m a2e.hub", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    get = sub.add_parser("fetch", help="download, verify and convert weights into the cache; prints the file's path")
    get.add_argument("uri", nargs="?", default=RELEASED, help=f"hf://OWNER/REPO[@REVISION][/FILE] (default {RELEASED})")
    get.add_argument("--config-file", help="model config whose layout the checkpoint must have (default: the released streaming model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    dims = None
    if args.config_file:
        from .config import model_dims, read_config

        dims = model_dims(read_config(Path(args.config_file)), base_dir=Path(__file__).resolve().parent.parent)
    try:
        path = fetch(args.uri, dims)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
