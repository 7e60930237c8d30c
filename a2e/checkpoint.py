"""Reading and writing LAM-A2E checkpoints, strictly and without running pickled code.

The released file is a ``torch.save`` zip pickle holding ``{"state_dict": ...}``
with keys ``[module.]backbone.<name>``. We load it with ``weights_only=True``;
a file that needs more than that is refused with a one-line command that
converts a *trusted* file to safetensors, which is loaded too.

Run ``python -m a2e.checkpoint --help`` for the conversion command.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError
from .model import Audio2Expression, ModelDims

PREFIX = "backbone."
DDP_PREFIX = "module."
# Older torch writes weight norm as weight_g / weight_v; newer as parametrizations.
_OLD_TO_NEW_WEIGHT_NORM = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}
CONVERT_HINT = "python -m a2e.checkpoint convert --trust {src} {dst}"


def _is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header size, then a JSON object.
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 28)


def _verify_zip(path: Path) -> None:
    """Check every record against the CRC-32 the archive stores for it; torch.load
    does not, and a damaged file would otherwise serve wrong numbers silently."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from None
    if bad is not None:
        hint = " (the storage of one or more tensors)" if "/data/" in bad else ""
        raise CheckpointError(
            f"checkpoint {path} is corrupt: record {bad!r}{hint} does not match its CRC-32 checksum; "
            "download or copy the file again"
        )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file (torch zip pickle, legacy pickle or
    safetensors), choosing the format by content, never running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    with path.open("rb") as fh:
        head = fh.read(16)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty")
    if _is_safetensors(head):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated or damaged (its zip directory is unreadable)")
    if head.startswith(b"PK"):
        _verify_zip(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "allowed global" not in text and "Unsupported global" not in text:
            raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint (not a pickle torch wrote)") from None
        dst = path.with_suffix(".safetensors")
        what = next((line.strip() for line in text.splitlines() if "global" in line), "")
        raise CheckpointError(
            f"checkpoint {path} holds Python objects beyond tensors and plain containers, so it "
            f"cannot be loaded safely with weights_only=True ({what[:160]}). "
            f"If you trust the file, convert it once with: {CONVERT_HINT.format(src=path, dst=dst)}"
        ) from None
    except Exception as exc:  # torch raises many types for garbage input; all mean 'unreadable'
        raise CheckpointError(
            f"checkpoint {path} is not a readable torch checkpoint (truncated or not a checkpoint): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    return _extract_state_dict(obj, path)


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint {path} holds no state_dict (expected a dict with a 'state_dict' entry)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path}: state_dict entries that are not tensors: {bad[:5]}")
    return dict(obj)


def normalise_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.``/``backbone.`` prefixes and map old weight-norm names to new ones."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(DDP_PREFIX) or name.startswith(PREFIX):
            name = name[len(DDP_PREFIX) :] if name.startswith(DDP_PREFIX) else name[len(PREFIX) :]
        head, _, leaf = name.rpartition(".")
        if leaf in _OLD_TO_NEW_WEIGHT_NORM:
            name = f"{head}.{_OLD_TO_NEW_WEIGHT_NORM[leaf]}"
        if name in out:
            raise CheckpointError(f"checkpoint has the tensor {name!r} twice (under two prefixes or namings)")
        out[name] = value
    return out


def _describe_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    problems = []
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[:4]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[:4]}")
    shapes = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:4]))
    return problems


def load_model(path: str | Path, dims: ModelDims, device: str | torch.device = "cpu") -> Audio2Expression:
    """Build the network for ``dims`` and load ``path`` into it strictly (eval mode)."""
    state = normalise_keys(read_state_dict(path))
    model = Audio2Expression(dims)
    expected = model.state_dict()
    problems = _describe_mismatch(expected, state)
    if problems:
        hint = ""
        id_key = "identity_encoder.id_mlp.weight"
        if id_key in state and state[id_key].shape[1] != dims.num_identity_classes:
            hint = (
                f" (the file has {state[id_key].shape[1]} identities, the config "
                f"{dims.num_identity_classes}: is it the matching config file?)"
            )
        raise CheckpointError(
            f"checkpoint {path} does not fit the LAM-A2E layout of the config{hint}: " + " | ".join(problems)
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path} has non-finite values in {bad[:4]}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model.to(device).eval()


def save_checkpoint(
    model: Audio2Expression,
    path: str | Path,
    *,
    weight_norm_naming: str = "parametrizations",
    ddp_prefix: bool = False,
    fmt: str = "torch",
) -> None:
    """Write ``model`` in the released layout (``backbone.`` keys inside ``state_dict``).

    ``weight_norm_naming`` is ``"parametrizations"`` or ``"weight_g"`` (older torch);
    ``fmt`` is ``"torch"`` (zip pickle, like the released file) or ``"safetensors"``.
    """
    state = {}
    for key, value in model.state_dict().items():
        if weight_norm_naming == "weight_g":
            key = key.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v"
            )
        elif weight_norm_naming != "parametrizations":
            raise ValueError(f"unknown weight_norm_naming {weight_norm_naming!r}")
        prefix = (DDP_PREFIX if ddp_prefix else "") + PREFIX
        state[prefix + key] = value.detach().cpu().contiguous()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.clone() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    elif fmt == "torch":
        torch.save({"state_dict": state, "epoch": 0}, path)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")


def convert_to_safetensors(src: str | Path, dst: str | Path) -> int:
    """Convert a trusted checkpoint (any pickle) to safetensors; returns the tensor count.

    This is the one place that unpickles without ``weights_only``: only for files
    the operator explicitly trusts, offline, never in the server.
    """
    from safetensors.torch import save_file

    obj = torch.load(src, map_location="cpu", weights_only=False)
    state = _extract_state_dict(obj, Path(src))
    buf = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(buf, str(dst), metadata={"format": "pt", "converted_from": Path(src).name})
    return len(buf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m a2e.checkpoint", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="convert a trusted pickle checkpoint to safetensors")
    conv.add_argument("--trust", action="store_true", help="confirm the file comes from a source you trust")
    conv.add_argument("src")
    conv.add_argument("dst")
    check = sub.add_parser("check", help="check that a checkpoint fits the released layout")
    check.add_argument("path")
    args = parser.parse_args(argv)
    if args.cmd == "convert":
        if not args.trust:
            parser.error("converting unpickles the file; pass --trust if it comes from a source you trust")
        n = convert_to_safetensors(args.src, args.dst)
        print(f"wrote {n} tensors to {args.dst}")
        return 0
    try:
        model = load_model(args.path, ModelDims.released())
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n = sum(p.numel() for p in model.parameters())
    print(f"ok: {len(model.state_dict())} tensors, {n / 1e6:.1f} M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
