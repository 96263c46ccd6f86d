"""Finding a checkpoint and reading its linear layers as ternary matrices with row scales.

Every supported format ends up as the same two things per linear group: an int8 matrix of
{-1, 0, +1} and one float32 multiplier per output row, such that
``y = (q @ W^T) * multiplier / act_scale`` is what transformers computes for that layer:

- packed (uint8 [out/4, in], "offline"): 2 bits per weight along the OUTPUT rows in four
  contiguous blocks, bits 2i..2i+1 of packed[r, c] holding W[r + i*out/4, c] + 1; the stored
  scalar weight_scale multiplies (AutoBitLinear) or divides (BitLinear) the result.
- full precision ("online", and 1bitLLM): absmean ternarization at load,
  s = 1 / max(mean|W|, 1e-5), W_q = clamp(round(W * s), -1, 1), multiplier 1 / s.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import UserError
from .model_config import LinearGroup, ModelConfig
from .safetensors_file import Checkpoint, to_float32

ABSMEAN_FLOOR = np.float32(1e-5)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]


def locate(model: str) -> Path:
    """A local model directory, or a Hugging Face hub id resolved through huggingface_hub's
    cache (downloading only when the hub is reachable and HF_HUB_OFFLINE is not set)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    if path.exists():
        raise UserError(f"{path} is a file; give the model's directory (the one holding config.json)")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise UserError(f"model {model!r} is neither a directory nor a hub id like microsoft/bitnet-b1.58-2B-4T")
    return _from_hub(model)


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"{repo_id!r} is a hub id and huggingface_hub is not installed: pip install huggingface_hub, or give a directory"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except Exception as err:  # huggingface_hub raises many types: offline, not cached, not found, network
        why = (
            "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
            if offline
            else f"not in the Hugging Face cache and not fetched from the hub ({type(err).__name__})"
        )
        raise UserError(f"model {repo_id}: {why}; download it where the hub is reachable, or pass a local directory") from None


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def group_weights(ckpt: Checkpoint, config: ModelConfig, layer: int, group: LinearGroup) -> tuple[np.ndarray, np.ndarray]:
    """(ternary int8 [n, k], float32 multiplier [n]) of one linear group of one layer."""
    parts = [module_weights(ckpt, config, layer_prefix(layer) + m, rows, group.k) for m, rows in zip(group.modules, group.rows)]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([w for w, _ in parts]), np.concatenate([s for _, s in parts])


def module_weights(ckpt: Checkpoint, config: ModelConfig, module: str, rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    name = module + ".weight"
    dtype, shape = ckpt.dtype(name), ckpt.shape(name)
    if dtype == "U8":
        if shape != (-(-rows // 4), k):
            raise UserError(f"{ckpt.dir}: packed {name} has shape {list(shape)} but config.json implies {[-(-rows // 4), k]}")
        weights = unpack_rows(ckpt.tensor(name), rows)
        return weights, _stored_multiplier(ckpt, config, module, rows)
    if shape != (rows, k):
        raise UserError(f"{ckpt.dir}: {name} has shape {list(shape)} but config.json implies {[rows, k]}")
    full = to_float32(ckpt.tensor(name), dtype)
    if config.quant.mode == "online":
        weights, multiplier = absmean_ternary(full)
        return weights, np.full(rows, multiplier, np.float32)
    if config.quant.linear_class == "bitlinear":
        raise UserError(f"{ckpt.dir}: {name} is {dtype}, but BitLinear checkpoints store packed uint8 weights")
    weights = full.astype(np.int8)
    if not np.array_equal(weights, full) or np.abs(weights).max(initial=0) > 1:
        raise UserError(f"{ckpt.dir}: {name} should hold ternary values (quantization_mode offline) but does not")
    return weights, _stored_multiplier(ckpt, config, module, rows)


def unpack_rows(packed: np.ndarray, rows: int) -> np.ndarray:
    """transformers' 2-bit packing along the output rows, inverted; a field of 3 is corruption."""
    block = packed.shape[0]
    out = np.empty((4 * block, packed.shape[1]), np.int8)
    for i in range(4):
        out[i * block : (i + 1) * block] = (packed >> (2 * i)) & 3
    if (out == 3).any():
        raise UserError("packed ternary weights contain the invalid 2-bit value 3: the checkpoint is corrupted")
    out -= 1
    return out[:rows]


def absmean_ternary(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """BitNet b1.58's weight quantization, in float32 as transformers' WeightQuant does it."""
    scale = np.float32(1.0) / max(np.float32(np.abs(w).mean(dtype=np.float32)), ABSMEAN_FLOOR)
    ternary = np.clip(np.rint(w * scale), -1, 1).astype(np.int8)
    return ternary, np.float32(1.0) / scale


def _stored_multiplier(ckpt: Checkpoint, config: ModelConfig, module: str, rows: int) -> np.ndarray:
    name = module + ".weight_scale"
    stored = ckpt.float32(name).reshape(-1)
    if stored.size != 1 or not np.isfinite(stored[0]) or stored[0] == 0:
        raise UserError(f"{ckpt.dir}: {name} must be one finite non-zero number, got shape {list(ckpt.shape(name))}")
    value = stored[0] if config.quant.linear_class == "autobitlinear" else np.float32(1.0) / stored[0]
    return np.full(rows, value, np.float32)


def norm_weight(ckpt: Checkpoint, name: str, size: int) -> np.ndarray:
    return np.ascontiguousarray(ckpt.float32(name + ".weight", (size,)))
