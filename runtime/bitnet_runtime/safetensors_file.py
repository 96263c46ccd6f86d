"""Memory-mapped reading of safetensors checkpoints, single files and sharded ones.

Written here rather than taken from the ``safetensors`` package because its numpy front end
cannot return bfloat16 (the dtype of every BitNet checkpoint's embedding and norms) and the
runtime must not need torch. Tensors come back as read-only views of the mapped file, so a
2.4B-parameter model costs no memory until its pages are touched; bfloat16 comes back as its
uint16 bit patterns (``to_float32`` widens it). Every header field is checked against the
file size first, so a truncated or corrupted file is a UserError, never a bus error.
"""

from __future__ import annotations

import json
import math
import mmap
import stat
import struct
from pathlib import Path

import numpy as np

from .errors import UserError
from .manifest import file_sha256

# safetensors dtype -> numpy storage dtype (bfloat16 stored as its bit pattern)
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 << 20  # the format's own limit


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    """One .safetensors file: its header parsed and checked, its data mapped read-only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            if not stat.S_ISREG(self.path.stat().st_mode):  # a FIFO would block the open forever
                raise UserError(f"{self.path} is not a regular file")
            with self.path.open("rb") as f:
                size = self.path.stat().st_size
                if size < 8:
                    raise UserError(f"{self.path} is truncated: {size} bytes, not a safetensors file")
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > min(MAX_HEADER, size - 8):
                    raise UserError(f"{self.path} is corrupted or truncated: header of {header_len} bytes in a {size}-byte file")
                header = self._parse_header(f.read(header_len))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as err:
            raise UserError(f"cannot read {self.path}: {err.strerror or err}") from None
        self._base = 8 + header_len
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self._check_entries(size - self._base)

    def _parse_header(self, raw: bytes) -> dict:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{self.path} is corrupted: its header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise UserError(f"{self.path} is corrupted: its header is not a JSON object")
        return header

    def _check_entries(self, data_size: int) -> None:
        """Every entry typed (dtype known, shape and offsets non-negative integers), sized as its
        shape says, inside the data section, and no two overlapping."""
        spans = []
        for name, e in self.entries.items():
            try:
                dtype, shape, (start, end) = DTYPES[e["dtype"]], list(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{self.path} is corrupted: bad header entry for {name!r}") from None
            if not all(_is_count(v) for v in (*shape, start, end)):
                raise UserError(f"{self.path} is corrupted: {name}'s shape and offsets must be non-negative integers")
            want = math.prod(shape) * np.dtype(dtype).itemsize  # Python integers: no overflow
            if not start <= end or end - start != want:
                raise UserError(f"{self.path} is corrupted: {name} has {end - start} bytes for shape {shape} {e['dtype']}")
            if end > data_size:
                raise UserError(f"{self.path} is truncated: {name} ends at byte {end} of a {data_size}-byte data section")
            spans.append((start, end, name))
        spans.sort()
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise UserError(f"{self.path} is corrupted: the data of {first} and {second} overlap")

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        """A read-only view into the mapped file (bfloat16 as uint16 bit patterns)."""
        e = self.entries[name]
        start, end = e["data_offsets"]
        dtype = DTYPES[e["dtype"]]
        count = (end - start) // np.dtype(dtype).itemsize
        if count == 0:
            return np.zeros(e["shape"], dtype)
        return np.frombuffer(self._map, dtype, count, self._base + start).reshape(e["shape"])


class Checkpoint:
    """All tensors of a model directory: ``model.safetensors`` or the shards an index names."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.files = self._open_files()
        self._where = {name: f for f in self.files for name in f.entries}

    def _open_files(self) -> list[SafetensorsFile]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            return self._open_shards(index)
        if (self.dir / SINGLE_FILE).exists():
            return [SafetensorsFile(self.dir / SINGLE_FILE)]
        found = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if len(found) == 1:
            return [SafetensorsFile(self.dir / found[0])]
        raise UserError(f"no weights in {self.dir}: expected {SINGLE_FILE} or {INDEX_FILE} (PyTorch .bin checkpoints are not supported)")

    def _open_shards(self, index: Path) -> list[SafetensorsFile]:
        """The shards the index names: bare file names in the model directory, each holding the
        tensors the index's weight_map puts in it."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{index} is corrupted: {err}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} is corrupted: weight_map must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        outside = [s for s in shards if s in ("", ".", "..") or any(c in s for c in "/\\\0")]
        if outside:
            raise UserError(f"{index} names shard(s) outside the model directory: {', '.join(map(repr, outside))}")
        missing = [s for s in shards if not (self.dir / s).exists()]
        if missing:
            raise UserError(f"{self.dir} is incomplete: shard(s) {', '.join(missing)} named by {INDEX_FILE} are missing")
        files = {s: SafetensorsFile(self.dir / s) for s in shards}
        for name, shard in weight_map.items():
            if name not in files[shard].entries:
                raise UserError(f"{index} puts {name} in {shard}, which does not hold it")
        return list(files.values())

    def __contains__(self, name: str) -> bool:
        return name in self._where

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise UserError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        return self._where[name]

    def dtype(self, name: str) -> str:
        return self._file(name).dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The raw stored tensor; with ``shape``, a UserError unless it has exactly that shape."""
        f = self._file(name)
        if shape is not None and f.shape(name) != tuple(shape):
            raise UserError(f"{self.dir}: {name} has shape {list(f.shape(name))} but config.json implies {list(shape)}")
        return f.tensor(name)

    def float32(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        return to_float32(self.tensor(name, shape), self.dtype(name))

    def fingerprint(self, hashes: dict | None = None) -> list:
        """What identifies these weights: per file its name, header and the sha256 of its
        contents. A file's hash is computed once (streamed) and remembered in ``hashes`` under
        its device, inode, size, mtime and ctime: a file replaced by another of the same name,
        size and mtime (cp -p, rsync -a) has a new ctime, so it is hashed, and keyed, anew."""
        out = []
        for f in self.files:
            out.append([f.path.name, content_hash(f.path, hashes), json.dumps(f.entries, sort_keys=True)])
        return out


def content_hash(path: Path, hashes: dict | None = None) -> str:
    st = path.stat()
    identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    if hashes is not None and hashes.get(str(path), {}).get("identity") == identity:
        return hashes[str(path)]["sha256"]
    sha256 = file_sha256(path)
    if hashes is not None:
        hashes[str(path)] = {"identity": identity, "sha256": sha256}
    return sha256


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 copy of a stored tensor; bfloat16 bit patterns are widened exactly."""
    if dtype == "BF16":
        return (np.asarray(array, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array).astype(np.float32)
