"""Which ternary linear layers a model needs, from a preset name or a Hugging Face config.json.

A BitNet b1.58 decoder layer has four ternary matmuls once Q/K/V and gate/up are fused:
qkv [(heads + 2 * kv_heads) * head_dim, hidden], o [hidden, heads * head_dim],
gate_up [2 * ffn, hidden], down [hidden, ffn]. Every layer has the same shapes, so the
artifact holds one kernel set per distinct shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class Linear:
    name: str
    n: int  # output features
    k: int  # input features


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int

    def linears(self) -> list[Linear]:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return [
            Linear("qkv", q + 2 * kv, self.hidden),
            Linear("o", self.hidden, q),
            Linear("gate_up", 2 * self.ffn, self.hidden),
            Linear("down", self.hidden, self.ffn),
        ]


PRESETS = {
    "microsoft/bitnet-b1.58-2B-4T": ModelShape("microsoft/bitnet-b1.58-2B-4T", 2560, 6912, 20, 5, 128),
    "1bitLLM/bitnet_b1_58-large": ModelShape("1bitLLM/bitnet_b1_58-large", 1536, 4096, 16, 16, 96),
}
ALIASES = {"2b-4t": "microsoft/bitnet-b1.58-2B-4T", "large": "1bitLLM/bitnet_b1_58-large"}


def from_config(path: Path) -> ModelShape:
    """Read the shape fields of a Hugging Face config.json (BitNet / Llama style)."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read model config {path}: {err}") from None
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelShape(
            name=str(cfg.get("_name_or_path") or path.parent.name),
            hidden=hidden,
            ffn=int(cfg["intermediate_size"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} is not a usable model config: missing or bad field {err}") from None


def resolve(model: str) -> ModelShape:
    """A preset name, one of its aliases, a config.json, or a directory holding one."""
    name = ALIASES.get(model.lower(), model)
    if name in PRESETS:
        return PRESETS[name]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return from_config(path)
    known = ", ".join(list(PRESETS) + list(ALIASES))
    raise UserError(f"unknown model {model!r}: give a config.json, a directory holding one, or a preset ({known})")


def parse_shapes(text: str) -> list[Linear]:
    """``NxK,NxK,...`` (output x input features) as anonymous linears."""
    linears = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            n, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise UserError(f"bad shape {item!r} in --shapes: expected NxK, e.g. 2560x6912") from None
        if n <= 0 or k <= 0:
            raise UserError(f"bad shape {item!r} in --shapes: both sizes must be positive")
        linears.append(Linear(f"{n}x{k}", n, k))
    if not linears:
        raise UserError("--shapes is empty: expected NxK[,NxK...]")
    return linears
