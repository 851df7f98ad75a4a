"""Reading and writing Hugging Face model directories: config.json plus single or
sharded safetensors.

Our own small safetensors codec rather than the pinned `safetensors` package: its numpy
API cannot read bf16 ("data type 'bfloat16' not understood") and its writer takes every
tensor at once, where ours streams. A tensor is read with one positioned read into its own
buffer (never through a mapping of the whole file, whose touched pages would count against
the process until it exits), and a shard is written tensor by tensor from a header planned
up front, so neither direction holds more than one tensor."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
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
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as a header describes it, before any data is read or written."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class SafetensorsFile:
    """Lazy reader: `file.read(name)` (or `file[name]`) reads one tensor into a new array."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(n))
            except (struct.error, ValueError, UnicodeDecodeError):
                raise ConfigError(f"{path} is not a valid safetensors file (bad header)") from None
        if not isinstance(header, dict):
            raise ConfigError(f"{path} is not a valid safetensors file (bad header)")
        self._base = 8 + n
        header.pop("__metadata__", None)
        self.header = header
        for name, info in header.items():
            _check_entry(path, name, info, size - self._base)

    def keys(self):
        return self.header.keys()

    def spec(self, name: str) -> TensorSpec:
        info = self.header[name]
        return TensorSpec(name, tuple(info["shape"]), np.dtype(_DTYPES[info["dtype"]]))

    def read(self, name: str) -> np.ndarray:
        spec = self.spec(name)
        start, end = self.header[name]["data_offsets"]
        out = np.empty(spec.shape, spec.dtype)
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - start:
                raise ConfigError(f"{self.path} is truncated (tensor {name})")
        return out

    __getitem__ = read


def _is_int_list(x, length: int | None = None) -> bool:
    return (isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)
            and (length is None or len(x) == length))


def _check_entry(path: str, name: str, info, data_bytes: int) -> None:
    """One header entry is well formed, and its bytes lie inside the file."""
    if not isinstance(info, dict) or not _is_int_list(info.get("shape")) or not _is_int_list(info.get("data_offsets"), 2):
        raise ConfigError(f"{path} is not a valid safetensors file (bad header entry for tensor {name})")
    if info.get("dtype") not in _DTYPES:
        raise ConfigError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
    start, end = info["data_offsets"]
    if end - start != TensorSpec(name, tuple(info["shape"]), np.dtype(_DTYPES[info["dtype"]])).nbytes:
        raise ConfigError(f"{path} is not a valid safetensors file (tensor {name}'s shape and offsets disagree)")
    if end > data_bytes:
        raise ConfigError(f"{path} is truncated (tensor {name} runs past the end of the file)")


def _header_bytes(specs: list[TensorSpec], metadata: dict | None) -> bytes:
    header, offset = {}, 0
    for spec in specs:
        if np.dtype(spec.dtype) not in _NAMES:
            raise ConfigError(f"cannot write tensor {spec.name} of dtype {spec.dtype} to safetensors")
        header[spec.name] = {"dtype": _NAMES[np.dtype(spec.dtype)], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)  # data aligned to 8 bytes, as the reference writer does


def _write_stream(path: str, specs: list[TensorSpec], tensors: Iterator[tuple[str, np.ndarray]],
                  metadata: dict | None) -> None:
    """One safetensors file whose tensors arrive one at a time, in the order of `specs`."""
    blob = _header_bytes(specs, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for spec in specs:
            name, arr = next(tensors)
            if name != spec.name or tuple(arr.shape) != spec.shape or arr.dtype != spec.dtype:
                raise RuntimeError(f"tensor {name} {arr.shape} {arr.dtype} arrived where "
                                   f"{spec.name} {spec.shape} {spec.dtype} was planned")
            f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most max_shard_bytes (a larger tensor gets a shard alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_sharded(directory: str, specs: list[TensorSpec], tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int) -> list[str]:
    """Writes the (name, array) pairs, which must arrive in the order of `specs`, into
    shards of at most max_shard_bytes, plus an index when there is more than one. One
    tensor is in memory at a time."""
    shards = plan_shards(specs, max_shard_bytes)
    stream = iter(tensors)
    if len(shards) == 1:
        _write_stream(os.path.join(directory, "model.safetensors"), shards[0], stream, {"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_stream(os.path.join(directory, fname), shard, stream, {"format": "pt"})
        files.append(fname)
        weight_map.update({spec.name: fname for spec in shard})
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}, f, indent=2)
    return files + [INDEX_NAME]


class HFCheckpoint:
    """A HF model directory: its config.json and its tensors, whether in one file or
    sharded with an index."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            what = "a file" if os.path.exists(directory) else "not found"
            raise ConfigError(f"'{directory}' is {what}: pass a Hugging Face model directory")
        self.directory = directory
        self._where = self._weight_map(directory)
        self._files: dict[str, SafetensorsFile] = {}

    @staticmethod
    def _weight_map(directory: str) -> dict[str, str]:
        index = os.path.join(directory, INDEX_NAME)
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{index} is not a valid safetensors index (no weight_map)") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConfigError(f"{index} is not a valid safetensors index (weight_map must map names to files)")
            return {name: os.path.join(directory, file) for name, file in weight_map.items()}
        if os.path.exists(single):
            return {name: single for name in SafetensorsFile(single).keys()}
        if any(f.endswith(".bin") for f in os.listdir(directory)):
            raise ConfigError(f"{directory} holds PyTorch .bin weights only: re-save them as safetensors "
                              "(model.save_pretrained(dir, safe_serialization=True))")
        raise ConfigError(f"{directory} has neither model.safetensors nor {INDEX_NAME}")

    def config(self) -> dict:
        path = os.path.join(self.directory, CONFIG_NAME)
        if not os.path.exists(path):
            raise ConfigError(f"'{self.directory}' has no config.json: pass a Hugging Face model directory")
        try:
            with open(path) as f:
                config = json.load(f)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}): restore the file from the model's release") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{path} is not a JSON object: restore the file from the model's release")
        return config

    def names(self) -> Iterable[str]:
        return self._where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise ConfigError(f"tensor '{name}' is missing from {self.directory}")
        path = self._where[name]
        if path not in self._files:
            if not os.path.exists(path):
                raise ConfigError(f"shard {path} named in the index does not exist")
            self._files[path] = SafetensorsFile(path)
        file = self._files[path]
        if name not in file.header:
            raise ConfigError(f"the index says tensor '{name}' is in {path}, but it is not")
        return file

    def spec(self, name: str) -> TensorSpec:
        return self._file(name).spec(name)

    def read(self, name: str) -> np.ndarray:
        return self._file(name).read(name)

    __getitem__ = read
