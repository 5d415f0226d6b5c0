"""A `transformers` folder's files, read as plain data and bounded, for hf_import.py.

config.json is JSON of at most 64 MiB. The weights are safetensors (one file, or shards named
by model.safetensors.index.json) or a weights-only pytorch_model.bin; `read_weights_header`
gives every tensor's dtype and shape without reading one (the safetensors headers, or the .bin
mapped into memory, which reads no tensor's bytes), so that the model they describe can be
checked against the bounds and the memory before `read_hf_weights` loads anything.
tokenizer.json (at most 64 MiB) must give every character its own id.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from chargpt.errors import ChargptError, CheckpointError
from chargpt.fileio import read_json
from chargpt.interop.hf_export import WEIGHT_FILES
from chargpt.interop.imported import is_dense_tensor_dict, load_plain_torch
from chargpt.runs.checkpoint import MAX_JSON_BYTES
from chargpt.runs.safety import read_header
from chargpt.text.tokenizer import CharTokenizer

__all__ = ["read_char_tokenizer", "read_config", "read_hf_weights", "read_weights_header",
           "weight_files"]

BIN_FILE = "pytorch_model.bin"


def read_config(path: Path) -> dict[str, Any]:
    """A JSON object from the folder (config.json, the shard index), or one line."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    data = read_json(path, error=CheckpointError, max_bytes=MAX_JSON_BYTES)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def weight_files(src: Path) -> list[Path]:
    """The files holding the folder's tensors: model.safetensors, the shards its index names,
    or pytorch_model.bin."""
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_config(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        for shard in weight_map.values():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise CheckpointError(f"{index} names a shard outside the folder: "
                                      f"{str(shard)[:80]!r}")
        return [src / shard for shard in sorted(set(weight_map.values()))]
    if (src / BIN_FILE).is_file():
        return [src / BIN_FILE]
    raise CheckpointError(f"{src} has no weights (expected one of {', '.join(WEIGHT_FILES)})")


def _load_bin(path: Path) -> dict[str, Tensor]:
    """pytorch_model.bin, weights only and mapped: its tensors' bytes are read when used."""
    if not zipfile.is_zipfile(path):  # torch.save's format before PyTorch 1.6 cannot be mapped
        raise CheckpointError(f"{path} is not in torch.save's zip format (PyTorch >= 1.6), the "
                              "one chargpt reads; save it again, or as safetensors")
    state = load_plain_torch(path, mmap=True)
    if not is_dense_tensor_dict(state):
        raise CheckpointError(f"{path} is not a dict of dense tensors")
    return state


def read_weights_header(files: list[Path]) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype, shape)} of every tensor in `files`, without reading a tensor."""
    header: dict[str, tuple[str, list[int]]] = {}
    for path in files:
        if path.name == BIN_FILE:
            header.update({name: (str(t.dtype), list(t.shape))
                           for name, t in _load_bin(path).items()})
        else:
            header.update(read_header(path))
    return header


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {' '.join(str(e).split())}") from None


def read_hf_weights(src: Path) -> dict[str, Tensor]:
    """The folder's tensors, from safetensors (one file or shards) or a weights-only .bin."""
    out: dict[str, Tensor] = {}
    for path in weight_files(src):
        out.update(_load_bin(path) if path.name == BIN_FILE else _load_safetensors(path))
    return out


def read_char_tokenizer(src: Path, vocab_size: int) -> CharTokenizer:
    """chargpt's vocabulary from the folder's tokenizer.json, checked to work character-wise."""
    from tokenizers import Tokenizer

    path = src / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{src} has no tokenizer.json (a character tokenizer is needed)")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is too large for a tokenizer (more than "
                              f"{MAX_JSON_BYTES:,} bytes)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for malformed files
        raise CheckpointError(f"{path} is unreadable: {' '.join(str(e).split())}") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) != vocab_size or set(by_id) != set(range(vocab_size)):
        raise CheckpointError(f"{path} has {len(vocab)} tokens with ids that are not "
                              f"0..{vocab_size - 1}, the model's vocabulary")
    chars = [by_id[i] for i in range(vocab_size)]
    long = [t for t in chars if len(t) != 1]
    if long:
        raise CheckpointError(f"{path} is not a character tokenizer: token {long[0]!r} is "
                              f"{len(long[0])} characters long")
    text = "".join(chars)
    try:
        ids = tok.encode(text, add_special_tokens=False).ids
    except Exception as e:
        raise CheckpointError(f"{path} cannot encode its own vocabulary: {e}") from None
    # Only the ids matter: chargpt decodes with its own vocabulary, not the file's decoder.
    if ids != list(range(vocab_size)):
        raise CheckpointError(f"{path} does not give each character its own token (its "
                              "normaliser or pre-tokeniser changes or groups the text)")
    try:
        return CharTokenizer(chars)
    except ChargptError as e:
        raise CheckpointError(f"{path}: {e}") from None
