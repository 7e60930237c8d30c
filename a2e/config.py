"""Upstream-style Python config files, read without executing them.

``configs/lam_audio2exp_config_streaming.py`` is Python in the upstream
project (``model = dict(backbone=dict(...))``). We parse it with ``ast`` and
accept only module-level assignments of literals, ``dict(...)`` calls with
keyword arguments, lists, tuples and dicts: a config file cannot run code.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .model import ModelDims


def _value(node: ast.AST, where: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(n, where) for n in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ConfigError(f"{where}: '**' expansion is not allowed")
        return {_value(k, where): _value(v, where) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        if node.args or any(kw.arg is None for kw in node.keywords):
            raise ConfigError(f"{where}: only dict(key=value, ...) is allowed")
        return {kw.arg: _value(kw.value, where) for kw in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand, where)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    raise ConfigError(
        f"{where}: only literals, lists, tuples, dicts and dict(...) are allowed, found {ast.dump(node)[:60]}"
    )


def read_config(path: str | Path) -> dict[str, Any]:
    """Module-level ``name = value`` assignments of a config file, as plain data."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"config file {path} is not valid Python: {exc}") from None
    values: dict[str, Any] = {}
    for stmt in tree.body:
        where = f"{path}:{stmt.lineno}"
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring
        if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
            raise ConfigError(f"{where}: only 'name = value' statements are allowed")
        values[stmt.targets[0].id] = _value(stmt.value, where)
    return values


def model_dims(config: dict[str, Any], base_dir: str | Path = ".") -> ModelDims:
    """ModelDims from a config's ``model.backbone`` section (streaming defaults otherwise)."""
    # The network (torch, transformers) only where it is needed: reading
    # settings happens in HTTP workers too.
    from .model import DEFAULT_WAV2VEC2_CONFIG, ModelDims

    backbone = dict(config.get("model", {}).get("backbone", {}))
    w2v_path = backbone.get("wav2vec2_config_path")
    w2v_file = Path(w2v_path) if w2v_path else DEFAULT_WAV2VEC2_CONFIG
    if not w2v_file.is_absolute() and not w2v_file.exists():
        w2v_file = Path(base_dir) / w2v_file
    if not w2v_file.exists():
        w2v_file = DEFAULT_WAV2VEC2_CONFIG
    try:
        w2v = json.loads(w2v_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read wav2vec2 config {w2v_file}: {exc}") from None
    known = {
        "num_identity_classes",
        "identity_feat_dim",
        "hidden_dim",
        "expression_dim",
        "decoder_depth",
        "use_transformer",
        "num_attention_heads",
        "num_transformer_layers",
    }
    kwargs = {k: v for k, v in backbone.items() if k in known}
    if backbone.get("norm_type", "ln") != "ln":
        raise ConfigError(f"norm_type {backbone['norm_type']!r} is not supported (the released model uses 'ln')")
    return ModelDims(wav2vec2=w2v, **kwargs)
