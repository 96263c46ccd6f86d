"""Which ternary linear layers a model needs, from a preset name or a Hugging Face config.json.

A BitNet b1.58 decoder layer has four ternary matmuls once Q/K/V and gate/up are fused:
qkv [(heads + 2 * kv_heads) * head_dim, hidden], o [hidden, heads * head_dim],
gate_up [2 * ffn, hidden], down [hidden, ffn] (unfused where each projection normalizes its
own input; ``bitnet_runtime.model_config`` decides, so compiler and runtime agree). Every
layer has the same shapes, so the artifact holds one kernel set per distinct shape, plus the
output layer's kernels for [vocab, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bitnet_runtime.manifest import Decoder

from .errors import UserError


@dataclass(frozen=True)
class Linear:
    name: str
    n: int  # output features
    k: int  # input features


@dataclass(frozen=True)
class ModelShape:
    """What the compiler needs of a model: its ternary matmuls, its output layer's size, and
    its decoder (None where the compiled decode step does not cover it: per-projection input
    norms)."""

    name: str
    linear_shapes: tuple[tuple[str, int, int], ...]  # (name, out, in), as the runtime runs them
    vocab: int
    hidden: int
    decoder: Decoder | None = None

    def linears(self) -> list[Linear]:
        return [Linear(name, n, k) for name, n, k in self.linear_shapes]


def _preset(name: str, d: Decoder, vocab: int) -> ModelShape:
    q, kv, hidden, ffn = d.heads * d.head_dim, d.kv_heads * d.head_dim, d.hidden, d.ffn
    shapes = (("qkv", q + 2 * kv, hidden), ("o", hidden, q), ("gate_up", 2 * ffn, hidden), ("down", hidden, ffn))
    return ModelShape(name, shapes, vocab, hidden, d)


PRESETS = {
    "microsoft/bitnet-b1.58-2B-4T": _preset("microsoft/bitnet-b1.58-2B-4T", Decoder(30, 2560, 20, 5, 128, 6912, "relu2", True), 128256),
    "1bitLLM/bitnet_b1_58-large": _preset("1bitLLM/bitnet_b1_58-large", Decoder(24, 1536, 16, 16, 96, 4096, "silu", True), 32002),
}
ALIASES = {"2b-4t": "microsoft/bitnet-b1.58-2B-4T", "large": "1bitLLM/bitnet_b1_58-large"}


def from_model_dir(model_dir: Path) -> ModelShape:
    """The shapes of a Hugging Face model directory, read as the runtime will run it."""
    from bitnet_runtime.model_config import load_config

    config = load_config(model_dir)
    return ModelShape(config.name, tuple(config.linear_shapes()), config.vocab, config.hidden, decoder_of(config))


def decoder_of(config) -> Decoder | None:
    """A runtime ModelConfig's decoder, or None where each projection normalizes its own input
    (q, k, v unfused: the decode step's program has no form for it yet)."""
    if config.quant.use_rms_norm:
        return None
    c = config
    return Decoder(c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.ffn, c.act, c.sub_norms is not None)


def resolve(model: str) -> ModelShape:
    """A preset name or alias, a model directory, its config.json, or a hub id (from the
    Hugging Face cache, or downloaded where the hub is reachable)."""
    from bitnet_runtime.checkpoint import locate

    name = ALIASES.get(model.lower(), model)
    if name in PRESETS:
        return PRESETS[name]
    path = Path(model)
    if path.is_file() and path.name == "config.json":
        return from_model_dir(path.parent)
    if path.is_dir() or model.count("/") == 1:
        return from_model_dir(locate(model))
    known = ", ".join(list(PRESETS) + list(ALIASES))
    raise UserError(f"unknown model {model!r}: give a model directory, its config.json, a hub id, or a preset ({known})")


@dataclass(frozen=True)
class Request:
    """The linears a command was asked for, by ``--model`` or ``--shapes``: compile, tune,
    bench-kernels and the artifact cache all start here, so a model means the same kernels
    (its linears and its output layer) to each of them."""

    name: str | None  # the model's name; None for bare shapes
    label: str  # how progress lines name it: the model's name, or "shapes NxK,..." as given
    linears: list[Linear]
    output_layer: tuple[int, int] | None  # a model's (vocab, hidden); bare shapes have none
    decoder: Decoder | None = None  # a model's, for the compiled decode step


def resolve_request(model: str | None, shapes: str | None = None) -> Request:
    """``--shapes`` when given (bench-kernels has a default ``--model``, so shapes win), else
    ``--model`` as ``resolve`` reads it."""
    if shapes is not None:
        return Request(None, f"shapes {shapes}", parse_shapes(shapes), None)
    if model is None:
        raise UserError("give a model (--model) or linear shapes (--shapes)")
    shape = resolve(model)
    return Request(shape.name, shape.name, shape.linears(), (shape.vocab, shape.hidden), shape.decoder)


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
