"""A copy of a GGUF file with new rope metadata (and rope factor tensors), written with the ``gguf`` package.

Tensors are copied byte for byte; every metadata key is copied except the rope keys being
replaced (``<arch>.rope.freq_base``, ``.dimension_count``, ``.scaling.*``, ``<arch>.context_length``)
and the rope factor tensors (``rope_freqs``, ``rope_factors_long`` / ``_short``), which the new
settings supply when they need them. The file is written to a temporary name in the target's
folder, read back and checked (metadata, tensor names, types, shapes and bytes), and only then
renamed over the target: the original is never opened for writing, and a failed write leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _replaced(key: str, arch: str) -> bool:
    return key in (f"{arch}.rope.freq_base", f"{arch}.rope.dimension_count", f"{arch}.context_length") or \
        key.startswith(f"{arch}.rope.scaling.")


def _value_type(value: Any):
    import gguf

    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    raise ValueError(f"cannot write GGUF metadata value {value!r}")


def _digest(reader) -> dict[str, tuple]:
    """Tensor name -> (type, shape, sha256 of its bytes)."""
    return {t.name: (int(t.tensor_type), tuple(int(n) for n in t.shape),
                     hashlib.sha256(np.ascontiguousarray(t.data).view(np.uint8).tobytes()).hexdigest())
            for t in reader.tensors}


def rewrite_gguf(source: str | os.PathLike, target: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Write ``target``: ``source`` with its rope settings replaced by ``metadata`` (``RopeConfig.to_gguf``
    output: keys, and ``*.weight`` entries as float32 tensors). Returns the target path."""
    import gguf

    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        raise ValueError(f"--out {target} is the model file itself; write the copy elsewhere")
    if target.exists() and not target.is_file():
        raise ValueError(f"--out {target} exists and is not a file")
    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    keys = {k: v for k, v in metadata.items() if not k.endswith(".weight")}
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in metadata.items() if k.endswith(".weight")}
    for key in keys:
        if not key.startswith(f"{arch}."):
            raise ValueError(f"metadata key {key} is not of the file's architecture {arch!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        _write(reader, Path(tmp), arch, keys, tensors)
        _verify(reader, Path(tmp), arch, keys, tensors)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600 files; the copy gets the user's umask
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _write(reader, path: Path, arch: str, keys: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        name = field.name
        if name == "general.architecture" or name.startswith("GGUF.") or _replaced(name, arch):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    for key, value in keys.items():
        writer.add_key_value(key, value, _value_type(value))
    kept = [t for t in reader.tensors if t.name not in ROPE_TENSORS]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    for name, values in tensors.items():
        writer.add_tensor_info(name, values.shape, values.dtype, values.nbytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    for values in tensors.values():
        writer.write_tensor_data(values)
    writer.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _verify(reader, path: Path, arch: str, keys: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Read the written file back: new keys as given, other keys and tensors as in the source."""
    import gguf

    written = gguf.GGUFReader(path)
    fields = {name: f for name, f in written.fields.items() if not name.startswith("GGUF.")}
    for key, value in keys.items():
        got = fields[key].contents() if key in fields else None
        if got != value and not (isinstance(value, float) and got is not None and np.float32(value) == np.float32(got)):
            raise ValueError(f"written GGUF {path}: {key} reads back as {got!r}, expected {value!r}")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or _replaced(name, arch):
            continue
        if name not in fields or fields[name].contents() != field.contents():
            raise ValueError(f"written GGUF {path}: {name} differs from the source")
    source = {k: v for k, v in _digest(reader).items() if k not in ROPE_TENSORS}
    copied = _digest(written)
    for name, values in tensors.items():
        entry = copied.pop(name, None)
        if entry is None or entry[2] != hashlib.sha256(values.tobytes()).hexdigest():
            raise ValueError(f"written GGUF {path}: tensor {name} did not read back")
    if copied != source:
        raise ValueError(f"written GGUF {path}: tensors differ from the source")
