"""A bounded reader of a GGUF file's header: its metadata and tensor infos, checked against the file.

The layout (little-endian, GGUF versions 2 and 3)::

    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x     string key | u32 value type | value
    tensor_count x string name | u32 n_dims | n_dims x u64 dim | u32 ggml type | u64 offset
    padding to general.alignment (default 32) | data (tensor offsets count from its start)

A string is a u64 byte length and UTF-8 bytes; an array is a u32 item type, a u64 count and the
items (which may be arrays). Every count and length is checked against the bytes left in the file
before anything is read or allocated, so a parse costs time and memory in proportion to the
header's size whatever the counts claim. ``gguf.GGUFReader`` trusts them (an array that claims
2^40 items makes it loop past the end of the file), and keeps ~700 bytes of numpy views per array
item; this reader keeps numeric arrays as one numpy array and strings as ``str``.

Errors are ``ValueError("<file>: <what> = <value>: <what is allowed>")``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Caps. Real files: ~40 keys, ~300k array items (Gemma 3: 262k tokens, scores and types), a few
# thousand tensors (Llama 3.1 405B: 1138). llama.cpp's own limits: 4 dims, 63-byte tensor names.
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 16
MAX_ARRAY_ITEMS = 1 << 21  # in one array
MAX_METADATA_ITEMS = 1 << 22  # in all arrays together, nested items included
MAX_ARRAY_DEPTH = 4  # arrays of arrays of ...
MAX_KEY_BYTES = 1 << 16
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME (64) with its terminating NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = (1 << 63) - 1  # ggml counts elements in int64

# GGUF value types: 0..7 and 10..12 are scalars (struct format), 8 a string, 9 an array.
STRING, ARRAY, BOOL = 8, 9, 7
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q",
                  12: "<d"}
VALUE_TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
                    7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}
_NUMPY_TYPES = {k: np.dtype(fmt) for k, fmt in SCALAR_FORMATS.items()}
_MIN_ITEM_BYTES = {**{k: struct.calcsize(fmt) for k, fmt in SCALAR_FORMATS.items()}, STRING: 8, ARRAY: 12}


@dataclass(eq=False)
class TensorInfo:
    """One tensor of a GGUF file.

    ``shape``: GGUF order, the contiguous dimension first (``[in, out]`` for a matrix).
    ``tensor_type``: a ``gguf.GGMLQuantizationType``. ``data_offset``: absolute byte offset in the
    file; ``n_bytes``: its size. ``data``: a read-only uint8 view of the file,
    ``[*reversed(shape[1:]), bytes per row]`` (what ``gguf.quants.dequantize`` takes).
    """

    name: str
    shape: tuple[int, ...]
    tensor_type: Any
    data_offset: int
    n_bytes: int
    data: np.ndarray = field(repr=False)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=object))


@dataclass(eq=False)
class GGUFFile:
    """A GGUF file's header: ``metadata`` (key -> int, float, bool, str, numpy array for numeric
    arrays, list for string or nested arrays), ``tensors`` in file order, and where the data starts."""

    path: Path
    size: int
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int


class _Cursor:
    """Reads little-endian fields from a buffer; every read checks the bytes left first."""

    def __init__(self, buffer: memoryview, path: Path):
        self.buf, self.pos, self.end, self.path = buffer, 0, len(buffer), path
        self.items = 0

    def fail(self, what: str, value: Any, allowed: str) -> ValueError:
        return ValueError(printable(f"{self.path}: {printable(what, 120)} = {printable(_short(value), 80)}: {allowed}",
                                    1000))

    def need(self, n: int, what: str) -> int:
        """The current offset, after checking that ``n`` bytes remain; advances past them."""
        left = self.end - self.pos
        if n > left:
            raise self.fail(what, f"{n} bytes", f"only {left} bytes remain at offset {self.pos} "
                                                f"(the file is truncated or corrupt)")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.need(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar("<Q", f"{what} length")
        left = self.end - self.pos
        if limit is not None and n > limit:
            raise self.fail(f"{what} length", n, f"at most {limit} bytes")
        if n > left:
            raise self.fail(f"{what} length", n, f"only {left} bytes remain at offset {self.pos} "
                                                 "(the file is truncated or corrupt)")
        start = self.need(n, what)
        try:
            return str(self.buf[start:start + n], "utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(what, bytes(self.buf[start:start + min(n, 40)]), f"not UTF-8 ({err.reason})") from None


def printable(text: str, limit: int = 300) -> str:
    """``text`` on one line: control characters escaped, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _value_type(cur: _Cursor, what: str) -> int:
    vtype = cur.scalar("<I", what)
    if vtype not in VALUE_TYPE_NAMES:
        raise cur.fail(what, vtype, "must be a GGUF value type, 0..12")
    return vtype


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    """One value of type ``vtype``; arrays recurse up to ``MAX_ARRAY_DEPTH`` levels."""
    if vtype == STRING:
        return cur.string(key)
    if vtype == ARRAY:
        return _array(cur, key, depth)
    value = cur.scalar(SCALAR_FORMATS[vtype], key)
    return bool(value) if vtype == BOOL else value


def _array(cur: _Cursor, key: str, depth: int) -> Any:
    if depth >= MAX_ARRAY_DEPTH:
        raise cur.fail(f"{key} nesting", depth + 1, f"arrays nest at most {MAX_ARRAY_DEPTH} deep")
    itype = _value_type(cur, f"{key} item type")
    count = cur.scalar("<Q", f"{key} item count")
    left = cur.end - cur.pos
    if count > MAX_ARRAY_ITEMS:
        raise cur.fail(f"{key} item count", count, f"at most {MAX_ARRAY_ITEMS} items per array")
    if count * _MIN_ITEM_BYTES[itype] > left:
        raise cur.fail(f"{key} item count", count, f"{count} {VALUE_TYPE_NAMES[itype]} items cannot fit in the "
                                                   f"{left} bytes left (the file is truncated or corrupt)")
    cur.items += count
    if cur.items > MAX_METADATA_ITEMS:
        raise cur.fail(f"{key} item count", count, f"the metadata holds at most {MAX_METADATA_ITEMS} array items")
    if itype in _NUMPY_TYPES:
        dtype = _NUMPY_TYPES[itype]
        start = cur.need(count * dtype.itemsize, key)
        values = np.frombuffer(cur.buf, dtype, count, start).copy()
        return values.astype(bool) if itype == BOOL else values
    return [_value(cur, itype, key, depth + 1) for _ in range(count)]


def _metadata(cur: _Cursor, kv_count: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        key = cur.string(f"metadata key #{index}", MAX_KEY_BYTES)
        if key in metadata:
            raise cur.fail(key, "(a second time)", "each metadata key may appear once")
        metadata[key] = _value(cur, _value_type(cur, f"{key} value type"), key)
    return metadata


def _alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise cur.fail("general.alignment", alignment, "must be a power of two")
    return alignment


def _counts(cur: _Cursor) -> tuple[int, int, int]:
    """``(version, tensor_count, kv_count)``, each checked against the caps and the bytes left."""
    raw = cur.scalar("<I", "version")
    if raw & 0xFFFF == 0 and raw:
        raise cur.fail("version", f"{raw:#x}", "a big-endian GGUF file; ropekit reads little-endian ones")
    if raw not in SUPPORTED_VERSIONS:
        raise cur.fail("version", raw, f"ropekit reads GGUF versions {' and '.join(map(str, SUPPORTED_VERSIONS))}")
    tensor_count = cur.scalar("<Q", "tensor_count")
    kv_count = cur.scalar("<Q", "kv_count")
    left = cur.end - cur.pos
    for what, count, cap, smallest in (("tensor_count", tensor_count, MAX_TENSOR_COUNT, 32),
                                       ("kv_count", kv_count, MAX_KV_COUNT, 13)):
        if count > cap:
            raise cur.fail(what, count, f"at most {cap}")
        if count * smallest > left:
            raise cur.fail(what, count, f"{count} entries of at least {smallest} bytes cannot fit in the "
                                        f"{left} bytes left (the file is truncated or corrupt)")
    return raw, tensor_count, kv_count


def _tensor_info(cur: _Cursor, index: int, alignment: int) -> tuple[str, tuple[int, ...], Any, int, int]:
    """``(name, shape, ggml type, offset in the data section, n_bytes)`` of one tensor info."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = cur.string(f"tensor #{index} name", MAX_TENSOR_NAME_BYTES)
    n_dims = cur.scalar("<I", f"tensor {name} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name} n_dims", n_dims, f"must be 1..{MAX_DIMS}")
    start = cur.need(8 * n_dims, f"tensor {name} dims")
    shape = struct.unpack_from(f"<{n_dims}Q", cur.buf, start)
    for j, dim in enumerate(shape):
        if dim < 1:
            raise cur.fail(f"tensor {name} dim {j}", dim, "must be >= 1")
    n_elements = int(np.prod(shape, dtype=object))
    if n_elements > MAX_ELEMENTS:
        raise cur.fail(f"tensor {name} shape", list(shape), "more than 2^63 elements")
    raw_type = cur.scalar("<I", f"tensor {name} type")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name} type", raw_type, "not a ggml tensor type") from None
    if shape[0] % block:
        raise cur.fail(f"tensor {name} dim 0", shape[0], f"must be a multiple of {block} ({ggml_type.name} blocks)")
    offset = cur.scalar("<Q", f"tensor {name} offset")
    if offset % alignment:
        raise cur.fail(f"tensor {name} offset", offset, f"must be a multiple of general.alignment = {alignment}")
    return name, tuple(shape), ggml_type, offset, n_elements // block * type_size


def _place(cur: _Cursor, infos: list[tuple], data_offset: int, file_size: int) -> list[tuple]:
    """Absolute ``(name, shape, type, start, n_bytes)``; each inside the file, none overlapping another."""
    placed, names = [], set()
    for name, shape, ggml_type, offset, n_bytes in infos:
        if name in names:
            raise cur.fail(f"tensor {name}", "(a second time)", "each tensor name may appear once")
        names.add(name)
        start = data_offset + offset
        if start + n_bytes > file_size:
            raise cur.fail(f"tensor {name} bytes", f"[{start}, {start + n_bytes})",
                           f"the file has {file_size} bytes (it is truncated)")
        placed.append((name, shape, ggml_type, start, n_bytes))
    ordered = sorted(placed, key=lambda t: t[3])
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after[3] < before[3] + before[4]:
            raise cur.fail(f"tensor {after[0]} offset", after[3] - data_offset,
                           f"overlaps tensor {before[0]} (bytes [{before[3]}, {before[3] + before[4]}))")
    return placed


def _view(data: np.ndarray, shape: tuple[int, ...], ggml_type: Any, start: int, n_bytes: int) -> np.ndarray:
    """The tensor's bytes as uint8 ``[*reversed(shape[1:]), bytes per row]`` (no copy)."""
    rows = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return data[start:start + n_bytes].reshape(*reversed(shape[1:]), n_bytes // rows)


def parse_gguf(path: str | Path) -> GGUFFile:
    """The checked header of the GGUF file at ``path`` (tensor data mapped, not read).

    ValueError for anything that does not fit the file: counts, lengths, types, dims, duplicate
    keys or tensor names, tensor bytes outside the file or overlapping. FileNotFoundError if absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    if size < 24:
        raise ValueError(f"{path}: header = {size} bytes: a GGUF header needs at least 24 (the file is truncated)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data), path)
    cur.pos = 4
    version, tensor_count, kv_count = _counts(cur)
    metadata = _metadata(cur, kv_count)
    alignment = _alignment(cur, metadata)
    infos = [_tensor_info(cur, i, alignment) for i in range(tensor_count)]
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = [TensorInfo(name, shape, ggml_type, start, n_bytes, _view(data, shape, ggml_type, start, n_bytes))
               for name, shape, ggml_type, start, n_bytes in _place(cur, infos, data_offset, size)]
    return GGUFFile(path, size, version, metadata, tensors, alignment, data_offset)
