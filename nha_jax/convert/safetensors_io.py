"""Reading and writing Hugging Face safetensors folders (one file or shards plus model.safetensors.index.json).

numpy only (safetensors.numpy / safe_open(framework="np")): no torch, no pickle. bfloat16 arrives as ml_dtypes'
bfloat16. Tensors are read lazily, one at a time, so an 8B checkpoint never sits in memory twice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 4 << 30  # the size at which export starts a new shard


class MissingTensorError(KeyError):
    """A tensor the architecture needs is absent from the checkpoint."""

    def __str__(self):
        return str(self.args[0])


class TensorReader:
    """name -> np.ndarray over a checkpoint folder; `names` lists every stored tensor."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if (folder / INDEX_FILE).is_file():
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / SINGLE_FILE).is_file():
            with safe_open(folder / SINGLE_FILE, framework="np") as handle:
                self.files = {name: folder / SINGLE_FILE for name in handle.keys()}
        else:
            raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE}; the converter reads "
                                    "safetensors checkpoints only (save with safe_serialization=True).")
        self.folder = folder
        self.names = set(self.files)

    def read(self, name: str) -> np.ndarray:
        """The stored tensor `name`, in its stored dtype."""
        if name not in self.files:
            raise MissingTensorError(f"tensor {name!r} is missing from the checkpoint in {self.folder}.")
        with safe_open(self.files[name], framework="np") as handle:
            return handle.get_tensor(name)


def write_tensors(folder: str | Path, tensors: Iterator[tuple[str, np.ndarray]], total_bytes: int, *,
                  shard_bytes: int = SHARD_BYTES) -> None:
    """Writes (name, array) pairs as model.safetensors, or as shards plus an index when over shard_bytes."""
    folder = Path(folder)
    if total_bytes <= shard_bytes:
        save_file(dict(tensors), str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return
    # Each shard is written as soon as it is full (memory stays at one shard); names get the count at the end.
    written, current, current_bytes = [], {}, 0

    def flush():
        file = folder / f"shard-{len(written) + 1:05d}.partial"
        save_file(current, str(file), metadata={"format": "pt"})
        written.append((file, list(current)))

    for name, array in tensors:
        if current and current_bytes + array.nbytes > shard_bytes:
            flush()
            current, current_bytes = {}, 0
        current[name] = array
        current_bytes += array.nbytes
    flush()
    weight_map = {}
    for number, (file, names) in enumerate(written, start=1):
        final = f"model-{number:05d}-of-{len(written):05d}.safetensors"
        file.rename(folder / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
