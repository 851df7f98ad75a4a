"""Reading and writing Hugging Face model directories: config.json plus single or
sharded safetensors. Our own small safetensors codec so bf16 round-trips through
numpy (ml_dtypes) and large checkpoints are memory-mapped, never copied whole."""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from sc_jax.config import ConfigError

_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsFile:
    """Lazy reader: `file[name]` returns a numpy view backed by an mmap."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, ValueError, UnicodeDecodeError):
                raise ConfigError(f"{path} is not a valid safetensors file (bad header)") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._base = 8 + n
        header.pop("__metadata__", None)
        self.header = header
        size = len(self._map)
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ConfigError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            if self._base + info["data_offsets"][1] > size:
                raise ConfigError(f"{path} is truncated (tensor {name} runs past the end of the file)")

    def keys(self):
        return self.header.keys()

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.header[name]
        start, end = info["data_offsets"]
        buf = memoryview(self._map)[self._base + start:self._base + end]
        return np.frombuffer(buf, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    header, offset = {}, 0
    for name, arr in tensors.items():
        if arr.dtype not in _NAMES:
            raise ConfigError(f"cannot write tensor {name} of dtype {arr.dtype} to safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data aligned to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


class HFCheckpoint:
    """A HF model directory's tensors, whether in one file or sharded with an index."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise ConfigError(f"'{directory}' is not a directory: pass a Hugging Face model directory")
        self.directory = directory
        index = os.path.join(directory, INDEX_NAME)
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._where = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        elif os.path.exists(single):
            self._where = {name: single for name in SafetensorsFile(single).keys()}
        else:
            if any(f.endswith(".bin") for f in os.listdir(directory)):
                raise ConfigError(f"{directory} holds PyTorch .bin weights only: re-save them as safetensors "
                                  "(model.save_pretrained(dir, safe_serialization=True))")
            raise ConfigError(f"{directory} has neither model.safetensors nor {INDEX_NAME}")
        self._files: dict[str, SafetensorsFile] = {}

    def names(self) -> Iterable[str]:
        return self._where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConfigError(f"tensor '{name}' is missing from {self.directory}")
        path = self._where[name]
        if path not in self._files:
            if not os.path.exists(path):
                raise ConfigError(f"shard {path} named in the index does not exist")
            self._files[path] = SafetensorsFile(path)
        return self._files[path][name]


def write_sharded(directory: str, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int) -> list[str]:
    """Writes (name, array) pairs into shards of at most max_shard_bytes (streaming: one
    shard in memory at a time), plus an index when more than one shard results."""
    written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        tmp = os.path.join(directory, f".shard-{len(written)}.tmp")
        write_safetensors(tmp, shard, {"format": "pt"})
        written.append((tmp, list(shard)))

    for name, arr in tensors:
        if shard and size + arr.nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = arr
        size += arr.nbytes
        total += arr.nbytes
    flush()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(directory, "model.safetensors"))
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, (tmp, names) in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, os.path.join(directory, fname))
        files.append(fname)
        weight_map.update({name: fname for name in names})
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [INDEX_NAME]
