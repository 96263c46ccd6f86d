"""What a Hugging Face ``config.json`` says about a ternary model, in one checked dataclass.

Three families of checkpoints exist, and they differ in names and in scale conventions, not
in the arithmetic of the forward pass:

- ``BitNetForCausalLM`` (model_type "bitnet", microsoft/bitnet-b1.58-2B-4T and its -bf16
  variant): sub-norms before o_proj and down_proj, relu2; linears as transformers'
  ``AutoBitLinear`` (packed "offline" weights with a multiplying weight_scale, or
  full-precision "online" weights ternarized at load with the absmean rule).
- ``LlamaForCausalLM`` with a "bitnet" quantization_config (HF1BitLLM Llama3-8B-1.58,
  tiiuae Falcon3-*-1.58bit): no sub-norms, SiLU-gated MLP, linears as transformers'
  ``BitLinear`` (packed weights, the integer result DIVIDED by weight_scale).
- 1bitLLM's ``BitnetForCausalLM`` (model_type "llama", bitnet_b1_58-large / -3B): full
  precision weights ternarized by absmean, sub-norms named ``inner_attn_ln`` and
  ``ffn_layernorm``, SiLU-gated MLP.

``Linear groups`` are the matmuls the runtime actually runs: q|k|v and gate|up fused (one
activation quantization, one kernel call), except where each projection normalizes its own
input first (``use_rms_norm``), which makes the inputs differ and fusion impossible.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError

ACTIVATIONS = ("relu2", "silu")
ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class LinearGroup:
    """One ternary matmul: the checkpoint modules it concatenates (along the output rows)."""

    name: str
    modules: tuple[str, ...]  # checkpoint module paths relative to the layer, e.g. "self_attn.q_proj"
    rows: tuple[int, ...]  # output rows of each module
    k: int

    @property
    def n(self) -> int:
        return sum(self.rows)


@dataclass(frozen=True)
class Quantization:
    """How a linear's stored weights become {-1, 0, +1} and one scale per output row."""

    linear_class: str  # "autobitlinear": y = acc/act_scale * weight_scale; "bitlinear": y = acc / (act_scale * weight_scale)
    mode: str  # "offline": packed ternary + weight_scale stored; "online": full precision, absmean at load
    use_rms_norm: bool = False  # an RMSNorm (with its own weight) on each linear's input
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rms_eps: float
    act: str
    rope_theta: float
    rope_scaling: dict | None
    max_positions: int
    tied: bool
    quant: Quantization
    sub_norms: tuple[str, str] | None  # (attention, ffn) norm names, relative to the layer
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = "model"

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_groups(self) -> list[LinearGroup]:
        h, q, kv, f = self.hidden, self.q_dim, self.kv_dim, self.ffn
        attn = [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)]
        mlp = [("mlp.gate_proj", f), ("mlp.up_proj", f)]
        if self.quant.use_rms_norm:  # each projection normalizes its input with its own weight
            first = [LinearGroup(m.split(".")[-1].removesuffix("_proj"), (m,), (n,), h) for m, n in attn]
            mid = [LinearGroup(m.split(".")[-1].removesuffix("_proj"), (m,), (n,), h) for m, n in mlp]
        else:
            first = [LinearGroup("qkv", tuple(m for m, _ in attn), tuple(n for _, n in attn), h)]
            mid = [LinearGroup("gate_up", tuple(m for m, _ in mlp), tuple(n for _, n in mlp), h)]
        return [*first, LinearGroup("o", ("self_attn.o_proj",), (h,), q), *mid, LinearGroup("down", ("mlp.down_proj",), (h,), f)]

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(name, out, in) of every distinct ternary matmul: what the artifact must hold."""
        return [(g.name, g.n, g.k) for g in self.linear_groups()]

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies in float32, with Llama-3 scaling where configured."""
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            inv = (1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float32) / self.head_dim))).astype(np.float32)
            if self.rope_scaling and self.rope_scaling.get("rope_type", "default") != "default":
                inv = _llama3_inv_freq(inv, self.rope_scaling)
        if not np.isfinite(inv).all():  # a positive but tiny rope_theta overflows: the rotations would be NaN
            raise UserError(f"config.json: rope_theta {self.rope_theta!r} (with its rope scaling) gives non-finite rotary frequencies")
        return inv


def _llama3_inv_freq(inv: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def read_json(path: Path, missing_ok: bool = False) -> dict:
    """A JSON object from a model directory's file; missing (where allowed: {}) or broken files
    are user errors."""
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def _architecture(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise _Field(f"architectures must be a list, got {type(archs).__name__}")
    arch = archs[0] if archs else ""
    quant = _object(cfg, "quantization_config").get("quant_method")
    if cfg.get("model_type") == "bitnet" or arch == "BitNetForCausalLM":
        return "bitnet"
    if arch == "BitnetForCausalLM":  # 1bitLLM's remote-code class (model_type "llama")
        return "1bitllm"
    if cfg.get("model_type") == "llama" and quant == "bitnet":
        return "llama-bitnet"
    raise UserError(
        f"unsupported architecture {arch or cfg.get('model_type')!r}: bitnet-compile runs BitNetForCausalLM, "
        "1bitLLM's BitnetForCausalLM, and LlamaForCausalLM with a bitnet quantization_config"
    )


def _quantization(cfg: dict, architecture: str) -> Quantization:
    if architecture == "1bitllm":
        return Quantization("autobitlinear", "online")
    q = _object(cfg, "quantization_config")
    if architecture == "bitnet" and not q:
        raise UserError("this BitNet config has no quantization_config: cannot tell packed from full-precision weights")
    if q.get("quant_method", "bitnet") != "bitnet":
        raise UserError(f"unsupported quant_method {q.get('quant_method')!r}: only 'bitnet' ternary checkpoints are supported")
    linear_class, mode = q.get("linear_class", "bitlinear"), q.get("quantization_mode", "offline")
    if linear_class not in ("bitlinear", "autobitlinear") or mode not in ("offline", "online"):
        raise UserError(f"unsupported quantization_config: linear_class {linear_class!r}, quantization_mode {mode!r}")
    eps = _float(q, "rms_norm_eps", 1e-6) if q.get("rms_norm_eps") is not None else 1e-6
    return Quantization(linear_class, mode, bool(q.get("use_rms_norm", False)), eps)


class _Field(ValueError):
    """A config field of the wrong type or out of range (its message names it)."""


def _int(cfg: dict, key: str, default: int | None = None, low: int = 1) -> int:
    """An integer field (not a float, string or bool) of at least ``low``; absent or null
    gives ``default``, where there is one."""
    value = cfg.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _Field(f"{key} must be an integer >= {low}, got {value!r}")
    return value


def _float(cfg: dict, key: str, default: float, positive: bool = True) -> float:
    """A finite number field, above 0 where ``positive``."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        raise _Field(f"{key} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    return float(value)


def _object(cfg: dict, key: str) -> dict:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise _Field(f"{key} must be a JSON object, got {type(value).__name__}")
    return value


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """rope_theta and scaling, from transformers 5's rope_parameters or the older fields."""
    params = _object(cfg, "rope_parameters")
    theta = _float(params, "rope_theta", _float(cfg, "rope_theta", 10000.0))
    scaling = _object(cfg, "rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise UserError(f"unsupported rope scaling {kind!r}: supported are {', '.join(ROPE_TYPES)}")
        scaling = dict(scaling, rope_type=kind)
        if kind == "llama3":
            scaling["factor"] = _float(scaling, "factor", 0.0)  # required: its absence is an error (0 fails the range)
            for key, default in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192)):
                scaling[key] = _float(scaling, key, default)
            if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
                raise _Field("rope_scaling.high_freq_factor must be above low_freq_factor")
    return theta, scaling


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def load_config(model_dir: Path) -> ModelConfig:
    """The checked config of a model directory (config.json, and generation_config.json's EOS ids)."""
    path = Path(model_dir) / "config.json"
    cfg = read_json(path)
    try:
        architecture = _architecture(cfg)
        hidden, heads = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
        act = cfg.get("hidden_act", "silu")
        theta, scaling = _rope(cfg)
        gen = Path(model_dir) / "generation_config.json"
        eos = _eos_ids(read_json(gen, missing_ok=True).get("eos_token_id"))
        config = ModelConfig(
            architecture=architecture,
            hidden=hidden,
            layers=_int(cfg, "num_hidden_layers"),
            heads=heads,
            kv_heads=_int(cfg, "num_key_value_heads", heads),
            head_dim=_int(cfg, "head_dim", hidden // heads),
            ffn=_int(cfg, "intermediate_size"),
            vocab=_int(cfg, "vocab_size"),
            rms_eps=_float(cfg, "rms_norm_eps", 1e-6),
            act=act,
            rope_theta=theta,
            rope_scaling=scaling,
            max_positions=_int(cfg, "max_position_embeddings", 2048),
            tied=bool(cfg.get("tie_word_embeddings", False)),  # transformers' default for both classes
            quant=_quantization(cfg, architecture),
            sub_norms={
                "bitnet": ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
                "1bitllm": ("self_attn.inner_attn_ln", "mlp.ffn_layernorm"),
            }.get(architecture),
            bos_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
            eos_ids=eos or _eos_ids(cfg.get("eos_token_id")),
            name=str(cfg.get("_name_or_path") or Path(model_dir).name),
        )
    except _Field as err:
        raise UserError(f"{path} is not a usable model config: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path} is not a usable model config: missing or bad field {err}") from None
    _check(config, cfg, path)
    return config


def _check(c: ModelConfig, cfg: dict, path: Path) -> None:
    if c.act not in ACTIVATIONS:
        raise UserError(f"{path}: unsupported hidden_act {c.act!r} (supported: {', '.join(ACTIVATIONS)})")
    if min(c.hidden, c.layers, c.heads, c.kv_heads, c.head_dim, c.ffn, c.vocab) <= 0 or c.heads % c.kv_heads or c.head_dim % 2:
        raise UserError(f"{path}: inconsistent sizes (heads {c.heads}, kv heads {c.kv_heads}, head_dim {c.head_dim})")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError(f"{path}: linear layers with bias are not supported")
