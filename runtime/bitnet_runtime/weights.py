"""A model's weights in the artifact's kernel layouts: converted once, cached, memory-mapped.

Converting a checkpoint (unpacking or ternarizing each linear, packing it for the kernels,
tiling the output layer for its GEMV, the embedding rows for lookups in the checkpoint's own
dtype) takes seconds to minutes; the result is kept under the cache directory, keyed by the
checkpoint's contents (the sha256 of each file, computed once and remembered under the file's
inode, size, mtime and ctime in ``hashes.json``, so a replaced file is noticed even with its
old size and mtime) and by every layout parameter of the artifact: a new artifact or a changed
checkpoint converts again, and nothing else does.

Each array is one ``.npy`` file (numpy pads its header to 64 bytes, so a mapping is aligned as
the kernels need) with its sha256 in ``meta.json``, which is written last: a directory
without it is ignored and rebuilt. Every file is checked against its sha256 on the first load
in a process (a damaged one is converted again, with a message), written under a temporary
name, fsynced and renamed into place; a conversion that fails (a full disk included) removes
its partial directory, and partial directories of dead processes are swept at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import checkpoint, layout, layout_dot2, layout_f16, layout_i8
from .artifact import Artifact
from .errors import UserError
from .linear import pack_weights
from .manifest import LinearEntry, file_sha256
from .model_config import ModelConfig
from .progress import progress
from .safetensors_file import Checkpoint

CONVERTER_VERSION = 5  # 5: content-addressed, per-file sha256; 4: embedding rows in the checkpoint's dtype
META_FILE = "meta.json"
HASHES_FILE = "hashes.json"  # in the converted/ directory: checkpoint files' sha256 by file identity
_VERIFIED: set[Path] = set()  # converted directories checked in this process
_VERIFIED_ARRAYS: set[tuple[Path, str]] = set()


def cache_root() -> Path:
    """BITNET_CACHE, else $XDG_CACHE_HOME/bitnet-compile, else ~/.cache/bitnet-compile."""
    if os.environ.get("BITNET_CACHE"):
        return Path(os.environ["BITNET_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "bitnet-compile"


PACKING_PARAMS = {layout.VERSION: layout.PACKING_PARAMS, layout_dot2.VERSION: layout_dot2.PACKING_PARAMS}


def _packing(entry: LinearEntry) -> dict:
    """What of a linear's manifest entry decides its packed bytes (a new GEMM knob must not
    force a new conversion); the same dict, and so the same cache key, as format 2's entries gave."""
    params = {k: entry.layout_params[k] for k in PACKING_PARAMS.get(entry.layout, entry.layout_params)}
    return entry.shape | {"layout": entry.layout, "params": params}


def cache_key(ckpt: Checkpoint, config_text: str, artifact: Artifact, config: ModelConfig, hashes: dict | None = None) -> str:
    layouts = [_packing(e) for e in _entries(artifact, config).values()]
    ident = [CONVERTER_VERSION, config_text, ckpt.fingerprint(hashes), layouts, layout_f16.VERSION, layout_i8.VERSION]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def _read_hashes(root: Path) -> dict:
    """The remembered content hashes (a damaged or unreadable file: start over)."""
    try:
        data = json.loads((root / HASHES_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_hashes(root: Path, hashes: dict) -> None:
    """Best effort: a read-only cache only means hashing again next time."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{HASHES_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(hashes))
        os.replace(tmp, root / HASHES_FILE)
    except OSError:
        pass


def _damage(directory: Path) -> str | None:
    """What is wrong with a converted directory (None: every file has its meta.json sha256)."""
    try:
        files = json.loads((directory / META_FILE).read_text())["files"]
        for name, sha256 in files.items():
            if file_sha256(directory / name) != sha256:
                return f"{name} does not match its sha256"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _entries(artifact: Artifact, config: ModelConfig) -> dict[str, LinearEntry]:
    return {g.name: artifact.linear(g.n, g.k) for g in config.linear_groups()}


class ModelWeights:
    """The converted arrays of one model for one artifact, read from the cache."""

    def __init__(self, model_dir: Path, config: ModelConfig, artifact: Artifact, echo: Callable[[str], None] = lambda s: None):
        self.config = config
        ckpt = Checkpoint(model_dir)
        root = cache_root() / "converted"
        _sweep_partials(root)
        hashes = _read_hashes(root)
        key = cache_key(ckpt, (Path(model_dir) / "config.json").read_text(), artifact, config, hashes)
        _write_hashes(root, hashes)
        self.dir = root / key
        self._ckpt = ckpt
        self._arrays: dict[str, np.ndarray] = {}
        if (self.dir / META_FILE).is_file() and self.dir not in _VERIFIED:
            problem = _damage(self.dir)
            if problem:
                echo(f"converted weights in {self.dir} are damaged ({problem}): converting again")
                shutil.rmtree(self.dir, ignore_errors=True)
        if not (self.dir / META_FILE).is_file():
            echo(f"converting {model_dir} into the artifact's layouts (once; cached in {self.dir})")
            _convert(ckpt, config, artifact, self.dir)
        else:
            echo(f"using converted weights from {self.dir}")
        _VERIFIED.add(self.dir)

    def array(self, name: str) -> np.ndarray:
        """A copy-on-write mapping: writeable (DLPack refuses read-only arrays), never written;
        one per file, as two mappings of the same pages would both count as resident."""
        if name not in self._arrays:
            self._arrays[name] = self._load(name)
        return self._arrays[name]

    def _load(self, name: str) -> np.ndarray:
        path = self.dir / f"{name}.npy"
        side = self.dir / f"{name}.sha256"  # arrays made after the conversion (output_f32, output_i8*)
        if side.is_file() and (self.dir, name) not in _VERIFIED_ARRAYS:
            if file_sha256(path) != side.read_text().strip():
                raise UserError(
                    f"converted weights in {self.dir} are damaged ({path.name} does not match its sha256); delete the directory to convert again"
                )
            _VERIFIED_ARRAYS.add((self.dir, name))
        try:
            return np.load(path, mmap_mode="c")
        except (OSError, ValueError) as err:
            raise UserError(
                f"converted weights in {self.dir} are damaged ({path.name}: {err}); delete the directory to convert again"
            ) from None

    def rows(self, name: str) -> RowReader:
        """A cached matrix read row by row from its file, not mapped (embedding lookups)."""
        return RowReader(self.dir / f"{name}.npy")

    def output_f32(self) -> np.ndarray:
        """The output layer as float32 rows [vocab, hidden], exactly the checkpoint's values
        (``--output-layer f32``, for checking against a reference), made on first use."""
        if not (self.dir / "output_f32.npy").is_file():
            source, bf16 = _output_source(self._ckpt, self.config)
            rows = np.empty(source.shape, np.float32)
            for start in range(0, source.shape[0], layout_f16.CHUNK_ROWS):
                stop = min(start + layout_f16.CHUNK_ROWS, source.shape[0])
                rows[start:stop] = layout_f16.rows_as_float32(source, start, stop, bf16)
            _guarded(self.dir, lambda: _save_with_sha(self.dir, "output_f32", rows))
        return self.array("output_f32")

    def output_i8(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The int8 output layer (rows, per-row scale, correction term), made on first use and
        cached beside the rest (the correction file is written last: its presence means done)."""
        names = ("output_i8", "output_i8_scale", "output_i8_correction")
        if not (self.dir / f"{names[-1]}.npy").is_file():
            source, bf16 = _output_source(self._ckpt, self.config)
            for name, array in zip(names, layout_i8.quantize_rows(source, bf16=bf16)):
                _guarded(self.dir, lambda name=name, array=array: _save_with_sha(self.dir, name, array))
        return tuple(self.array(name) for name in names)


class RowReader:
    """Rows of an .npy matrix by ``pread``, as float32: a lookup costs its own bytes and leaves
    nothing resident. A memory-mapped lookup would map in whole large page-cache folios around
    each row (measured: 288 MB of a 657 MB embedding resident after ~900 distinct tokens). A
    uint16 matrix holds bfloat16 bit patterns (``_save_rows``)."""

    def __init__(self, path: Path):
        mapped = np.load(path, mmap_mode="r")
        self.shape, self.dtype, self.offset = mapped.shape, mapped.dtype, mapped.offset
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        del mapped
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)

    def __getitem__(self, ids) -> np.ndarray:
        ids = [int(i) for i in np.atleast_1d(ids)]
        out = np.empty((len(ids), *self.shape[1:]), self.dtype)
        flat = out.reshape(len(ids), -1).view(np.uint8)
        for row, i in enumerate(ids):
            if os.preadv(self._fd, [flat[row]], self.offset + i * self.row_bytes) != self.row_bytes:
                raise UserError(f"converted weights are truncated (row {i}): delete {self.path.parent} to convert again")
        if out.dtype == np.uint16:
            return (out.astype(np.uint32) << 16).view(np.float32)
        return out.astype(np.float32, copy=False)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _output_source(ckpt: Checkpoint, config: ModelConfig) -> tuple[np.ndarray, bool]:
    """The output layer matrix as stored (bfloat16 as uint16 bits, flagged) and checked."""
    return _float_matrix(ckpt, "model.embed_tokens.weight" if config.tied else "lm_head.weight", config)


def _float_matrix(ckpt: Checkpoint, name: str, config: ModelConfig) -> tuple[np.ndarray, bool]:
    source = ckpt.tensor(name, (config.vocab, config.hidden))
    dtype = ckpt.dtype(name)
    if dtype not in ("BF16", "F16", "F32"):
        raise UserError(f"{ckpt.dir}: {name} is {dtype}; a float output layer is expected")
    return source, dtype == "BF16"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(directory: Path, name: str, array: np.ndarray) -> str:
    """``name``.npy written whole (temporary name, fsync, rename); returns its sha256."""
    tmp = directory / f"{name}.tmp.npy"
    np.save(tmp, array)
    _fsync(tmp)
    os.replace(tmp, directory / f"{name}.npy")
    return file_sha256(directory / f"{name}.npy")


def _save_with_sha(directory: Path, name: str, array: np.ndarray) -> None:
    """An array added after the conversion, with its sha256 beside it (written after it)."""
    (directory / f"{name}.sha256").write_text(_save(directory, name, array) + "\n")


def _guarded(directory: Path, write: Callable[[], object]) -> None:
    """A write into the cache whose OSError (a full disk, a read-only cache) is one line."""
    try:
        write()
    except OSError as err:
        raise UserError(f"cannot write converted weights into {directory}: {err.strerror or err}") from None


def _save_rows(directory: Path, name: str, source: np.ndarray, bf16: bool) -> str:
    """The embedding row-major for lookups (a token touches its own row, where the output
    layer's 64-row tiles would bring 64), in the checkpoint's own dtype so a lookup is exact:
    float32 or float16 as they are, bfloat16 as its uint16 bit patterns. Written with plain
    writes, not a memory map: on a full disk a mapped write is a SIGBUS, a write an OSError."""
    tmp = directory / f"{name}.tmp.npy"
    header = {"descr": np.lib.format.dtype_to_descr(source.dtype), "fortran_order": False, "shape": source.shape}
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        for start in range(0, source.shape[0], layout_f16.CHUNK_ROWS):
            stop = min(start + layout_f16.CHUNK_ROWS, source.shape[0])
            if not np.isfinite(layout_f16.rows_as_float32(source, start, stop, bf16)).all():
                raise UserError(f"embedding rows {start}..{stop - 1} are not finite")
            f.write(np.ascontiguousarray(source[start:stop]).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / f"{name}.npy")
    return file_sha256(directory / f"{name}.npy")


def _sweep_partials(root: Path) -> None:
    """Remove the partial conversions of processes that are gone (a crash, a kill -9)."""
    for stale in root.glob("*.partial-*") if root.is_dir() else ():
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)


def _needed_bytes(ckpt: Checkpoint, config: ModelConfig) -> int:
    """About what a conversion writes: the checkpoint's size plus the float16 output tiles."""
    return sum(f.path.stat().st_size for f in ckpt.files) + 2 * config.vocab * config.hidden


def _convert(ckpt: Checkpoint, config: ModelConfig, artifact: Artifact, out: Path) -> None:
    """Into a directory of this process's own, renamed into place when complete; on any
    failure the partial directory is removed (a full disk is a one-line error). Two processes
    converting at once each finish, the second to finish keeping the first one's result."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free, needed = shutil.disk_usage(out.parent).free, _needed_bytes(ckpt, config)
    except OSError as err:
        raise UserError(f"cannot use the cache directory {out.parent}: {err.strerror or err} (BITNET_CACHE moves it)") from None
    if free < needed:
        raise UserError(
            f"not enough disk space in {out.parent} for the converted weights: about {needed / 1e9:.1f} GB needed, "
            f"{free / 1e9:.1f} GB free (free some, or point BITNET_CACHE elsewhere)"
        )
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        files = _write_converted(ckpt, config, artifact, tmp)
        meta = {"converter": CONVERTER_VERSION, "source": str(ckpt.dir), "config": config.name, "files": files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        _fsync(tmp / META_FILE)
        if (out / META_FILE).is_file():  # another process finished first: its result is as good
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(out, ignore_errors=True)  # an incomplete directory without meta.json
        os.replace(tmp, out)
        _fsync(out.parent)
    except OSError as err:
        raise UserError(f"converting the weights into {out.parent} failed: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_converted(ckpt: Checkpoint, config: ModelConfig, artifact: Artifact, tmp: Path) -> dict[str, str]:
    """Every converted array into ``tmp``; their sha256 by file name."""
    files: dict[str, str] = {}

    def save(name: str, array: np.ndarray) -> None:
        files[f"{name}.npy"] = _save(tmp, name, array)

    entries = _entries(artifact, config)
    for i in progress(range(config.layers), "converting", "layer"):
        for group in config.linear_groups():
            w, scale = checkpoint.group_weights(ckpt, config, i, group)
            save(f"layers.{i}.{group.name}", pack_weights(entries[group.name], w))
            save(f"layers.{i}.{group.name}.scale", scale)
            if config.quant.use_rms_norm:
                module = checkpoint.layer_prefix(i) + group.modules[0]
                save(f"layers.{i}.{group.name}.norm", checkpoint.norm_weight(ckpt, module + ".rms_norm", group.k))
        for name, key, size in _layer_norms(config):
            save(f"layers.{i}.{key}", checkpoint.norm_weight(ckpt, checkpoint.layer_prefix(i) + name, size))
    save("norm", checkpoint.norm_weight(ckpt, "model.norm", config.hidden))
    files["embed.npy"] = _save_rows(tmp, "embed", *_float_matrix(ckpt, "model.embed_tokens.weight", config))
    output, bf16 = _output_source(ckpt, config)
    save("output", layout_f16.pack_rows(output, bf16=bf16))
    return files


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _layer_norms(config: ModelConfig) -> list[tuple[str, str, int]]:
    """(checkpoint name, cache key, size) of a layer's RMSNorm weights."""
    norms = [("input_layernorm", "input_norm", config.hidden), ("post_attention_layernorm", "post_norm", config.hidden)]
    if config.sub_norms:
        norms += [(config.sub_norms[0], "attn_sub_norm", config.hidden), (config.sub_norms[1], "ffn_sub_norm", config.ffn)]
    return norms
