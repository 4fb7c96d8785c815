"""Hostile model files: mutated GGUF files and HF folders load in a sandboxed child process.

Every case must end in one of two ways: the model loads (exit 0), or ``load_model`` raises a
one-line ``ValueError`` / ``FileNotFoundError`` (the driver prints ``ERROR: <message>``, exit
2). A timeout, a signal (crash, memory) or any other exception (a traceback, exit 1) fails.

The driver (tests/sandbox.py) is one long-lived process that imports torch once and forks a child
per case; the child runs under an address-space cap (its size at fork plus ``ROPEKIT_FUZZ_AS_MB``,
default 2048 MiB) and an alarm (``ROPEKIT_FUZZ_TIMEOUT`` seconds, default 30).
``ROPEKIT_FUZZ_EXAMPLES`` sets the number of cases per fuzz test (default 120 GGUF + 80 HF); the
summary line lists the outcome counts and the largest RSS any child reached.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from sandbox import EXTRA_AS_MB, Sandbox, hypothesis_settings, show_summary
from tiny_llama import tiny_model, write_gguf, write_hf_folder

V = gguf.GGUFValueType
SCALAR_FORMATS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
                  V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
TIMEOUT_S = int(os.environ.get("ROPEKIT_FUZZ_TIMEOUT", "30"))

# ---------------------------------------------------------------- GGUF files as editable parts


@dataclass
class KV:
    """One metadata pair; ``types`` as gguf-py lists them: ``(UINT32,)``, ``(ARRAY, STRING)``, ..."""

    key: str
    types: tuple[int, ...]
    value: Any


@dataclass
class TensorEntry:
    """One tensor: ``dims`` in GGUF order (the contiguous dimension first), raw ``data`` bytes."""

    name: str
    dims: list[int]
    ggml_type: int
    data: bytes


@dataclass
class GGUFParts:
    """A GGUF file as metadata and tensors; ``gguf_bytes`` writes it back byte for byte."""

    kvs: list[KV]
    tensors: list[TensorEntry]
    version: int = 3

    def __repr__(self) -> str:
        return f"GGUFParts({len(self.kvs)} keys, {len(self.tensors)} tensors, version {self.version})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis' reports
        printer.text(repr(self))

    def index(self, key: str) -> int | None:
        return next((i for i, kv in enumerate(self.kvs) if kv.key == key), None)

    def set(self, key: str, types: tuple[int, ...] | int, value: Any) -> None:
        types = (types,) if isinstance(types, int) else tuple(types)
        i = self.index(key)
        if i is None:
            self.kvs.append(KV(key, types, value))
        else:
            self.kvs[i] = KV(key, types, value)

    def delete(self, key: str) -> None:
        self.kvs = [kv for kv in self.kvs if kv.key != key]

    def alignment(self) -> int:
        """The alignment the writer pads to (32 unless general.alignment is a usable small number)."""
        i = self.index("general.alignment")
        value = self.kvs[i].value if i is not None else 32
        return value if isinstance(value, int) and 1 <= value <= 4096 else 32


def gguf_parts(path: Path) -> GGUFParts:
    """The parts of a valid GGUF file, read with gguf-py's reader (llama.cpp's own)."""
    reader = gguf.GGUFReader(path)
    kvs = [KV(key, tuple(f.types), f.contents()) for key, f in reader.fields.items() if not key.startswith("GGUF.")]
    tensors = [TensorEntry(t.name, [int(d) for d in t.shape], int(t.tensor_type), t.data.tobytes())
               for t in reader.tensors]
    return GGUFParts(kvs, tensors, int(reader.fields["GGUF.version"].contents()))


@dataclass
class Slot:
    """An integer field of a written file: a count, length, type, dimension, offset or scalar value."""

    offset: int
    fmt: str
    label: str


@dataclass
class _Writer:
    buf: bytearray = field(default_factory=bytearray)
    slots: list[Slot] = field(default_factory=list)

    def put(self, fmt: str, value: Any, label: str | None = None) -> None:
        if label is not None and fmt[-1] not in "f?d":
            self.slots.append(Slot(len(self.buf), fmt, label))
        if fmt[-1] in "BbHhIiQq":  # integers wrap to the field's width (fuzzed values may not fit)
            bits = 8 * struct.calcsize(fmt)
            value = int(value) % (1 << bits)
            if fmt[-1].islower() and value >= 1 << (bits - 1):
                value -= 1 << bits
        self.buf += struct.pack(fmt, value)

    def string(self, text: str | bytes, label: str | None = None) -> None:
        raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        self.put("<Q", len(raw), None if label is None else f"{label} length")
        self.buf += raw

    def value(self, types: tuple[int, ...], value: Any, label: str, record: bool = True) -> None:
        kind = types[0]
        if kind == V.STRING:
            self.string(value, label if record else None)
        elif kind == V.ARRAY:
            self.put("<I", types[1], f"{label} item type" if record else None)
            self.put("<Q", len(value), f"{label} item count" if record else None)
            for i, item in enumerate(value):
                self.value(types[1:], item, f"{label}[{i}]", record and i < 3)
        else:
            self.put(SCALAR_FORMATS[V(kind)], value, f"{label} value" if record else None)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def gguf_bytes(parts: GGUFParts) -> tuple[bytes, list[Slot], int]:
    """``(file bytes, integer slots, end of the header)``: the layout gguf-py's writer produces."""
    w = _Writer()
    w.buf += b"GGUF"
    w.put("<I", parts.version, "version")
    w.put("<Q", len(parts.tensors), "tensor_count")
    w.put("<Q", len(parts.kvs), "kv_count")
    for kv in parts.kvs:
        w.string(kv.key, f"key {kv.key}")
        w.put("<I", kv.types[0], f"{kv.key} type")
        w.value(kv.types, kv.value, kv.key)
    alignment, offset, offsets = parts.alignment(), 0, []
    for tensor in parts.tensors:
        offsets.append(offset)
        offset = _pad(offset + len(tensor.data), alignment)
    for tensor, offset in zip(parts.tensors, offsets, strict=True):
        w.string(tensor.name, f"tensor {tensor.name} name")
        w.put("<I", len(tensor.dims), f"tensor {tensor.name} n_dims")
        for j, dim in enumerate(tensor.dims):
            w.put("<Q", dim, f"tensor {tensor.name} dim {j}")
        w.put("<I", tensor.ggml_type, f"tensor {tensor.name} type")
        w.put("<Q", offset, f"tensor {tensor.name} offset")
    header_end = len(w.buf)
    w.buf += bytes(_pad(len(w.buf), alignment) - len(w.buf))
    for tensor in parts.tensors:
        w.buf += tensor.data + bytes(_pad(len(tensor.data), alignment) - len(tensor.data))
    return bytes(w.buf), w.slots, header_end


def tiny_gguf_parts(folder: Path) -> GGUFParts:
    """The parts of the tiny test model's GGUF (2 layers, 259 tokens, F32)."""
    return gguf_parts(write_gguf(folder / "tiny-base.gguf", tiny_model()))


def write_parts(path: Path, parts: GGUFParts) -> Path:
    path.write_bytes(gguf_bytes(parts)[0])
    return path


# Chat templates that try to exhaust time, memory or the stack, or fail to parse.
HOSTILE_TEMPLATES = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    '{{ "x" * 3000000000 }}',
    '{{ "x" * 100000 * 100000 }}',
    '{{ [1] * 3000000000 }}',
    '{% set ns = namespace(s="x") %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}',
    '{% set ns = namespace(s="x") %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}',
    '{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + [i] %}{% endfor %}',
    '{% set s %}{% for i in range(100000) %}{{ "x" * 100000 }}{% endfor %}{% endset %}{{ s|length }}',
    '{% for i in range(100000) %}{{ "x" * 1000 }}{% endfor %}',
    '{{ "x".ljust(3000000000) }}',
    '{{ "x"|center(3000000000) }}',
    '{{ "x"|indent(3000000000) }}',
    '{{ {"a": 1}|tojson(indent=3000000000) }}',
    '{{ "{:>3000000000}".format(1) }}',
    '{{ "{:{w}}".format(1, w=3000000000) }}',
    '{{ "%3000000000d" % 1 }}',
    '{{ "%*d" % (3000000000, 1) }}',
    '{{ ("x" * 1000000)|replace("x", "xxxxxxxxxx") }}',
    '{{ ("\t" * 100000).expandtabs(100000) }}',
    '{{ ("ab" * 400000)|list|join("yyyyyyyyyy") }}',
    '{{ range(100000)|map("string")|join("x" * 100) }}',
    '{{ ("a " * 1000)|wordwrap(1, true, "x" * 100000) }}',
    "{{ 2 ** 100000000 }}",
    "{{ range(10 ** 12)|list }}",
    "{{ lipsum(1000000000) }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% for i in range(3) recursive %}{{ loop(range(3)) }}{% endfor %}",
    "{% for %}",
    "{{ (" * 10000,
    "{{ raise_exception('no') }}",
    "{{ foo.bar.baz }}",
    "{{ messages.__class__.__mro__[1].__subclasses__() }}x{{ undefined_function() }}",
]

# ---------------------------------------------------------------- the sandboxed driver (tests/sandbox.py)

CASES = r'''
import os, signal, traceback

import torch

torch.set_num_threads(1)
from ropekit.loading import load_model, load_tokenizer
from ropekit.kernels.decode import extension
from ropekit.loading.tokenizer import render_chat_template

MESSAGES = [{"role": "user", "content": "hi"}]


def prepare(args):
    extension()  # build or load the fused kernels once, before forking
    with torch.device("meta"):  # and import what building a model on the meta device imports
        torch.nn.Embedding(2, 2)
    import jinja2.sandbox  # noqa: F401


def load(path):
    load_tokenizer(path)
    model, tokenizer = load_model(path)
    with torch.no_grad():
        model(torch.tensor([[0]]))
    if tokenizer.chat_template:
        tokenizer.apply_chat_template(MESSAGES)


def work(request):
    if "template" in request:
        render_chat_template(request["template"], MESSAGES, True, source="test template")
    else:
        load(request["path"])


def run(request, fd):
    try:
        work(request)
        return 0, "OK"
    except (ValueError, FileNotFoundError) as err:
        return 2, "ERROR: " + str(err)
    except BaseException:
        return 1, traceback.format_exc()


def outcome(status, message):
    if os.WIFSIGNALED(status):
        return "hang" if os.WTERMSIG(status) == signal.SIGALRM else "crash"
    code = os.WEXITSTATUS(status)
    if code == 0:
        return "ok"
    if code == 2 and "\n" not in message and len(message) <= 1200:
        return "error"
    return "traceback" if code in (1, 2) else "crash"
'''


class Driver(Sandbox):
    """A long-lived process that loads each requested model in a forked, capped child."""

    def __init__(self, workdir: Path, timeout_s: int = TIMEOUT_S, extra_as_mb: int = EXTRA_AS_MB):
        super().__init__(CASES, timeout_s=timeout_s, extra_as_mb=extra_as_mb, cwd=workdir,
                         stderr_path=workdir / "driver-stderr.txt")

    def load(self, path: Path, kind: str = "other") -> dict[str, Any]:
        """``{"outcome": ok|error|hang|crash|traceback, "message", "maxrss_kb", "seconds"}`` for one case."""
        return self.request({"path": str(path)}, kind)

    def render(self, template: str) -> dict[str, Any]:
        return self.request({"template": template}, "template")

    def summary(self) -> str:
        counts = ", ".join(f"{name} {self.counts[name]}" for name in ("ok", "error", "hang", "crash", "traceback"))
        return (f"{sum(self.counts.values())} cases: {counts}; largest child RSS {self.max_rss_kb / 1024:.0f} MiB "
                f"(the driver, which each child starts as a fork of: {self.driver_rss_kb / 1024:.0f} MiB)")


def assert_clean(reply: dict[str, Any], what: str) -> None:
    """The case loaded, or failed with a one-line ValueError / FileNotFoundError."""
    assert reply["outcome"] in ("ok", "error"), f"{what}: {reply['outcome']} after {reply['seconds']} s, " \
                                                 f"RSS {reply['maxrss_kb'] // 1024} MiB:\n{reply['message']}"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def driver(tmp_path_factory, request):
    """The sandboxed driver, shared by this module's tests; its outcome counts are printed at the end."""
    instance = Driver(tmp_path_factory.mktemp("fuzz-driver"))
    yield instance
    summary = f"hostile files: {instance.summary()}"
    lines = [summary, *(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                        for kind, counts in sorted(instance.by_kind.items()))]
    show_summary(request, lines)
    instance.close()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def gguf_base(fuzz_dir) -> GGUFParts:
    return tiny_gguf_parts(fuzz_dir)


class Files(dict):
    """File name -> bytes (shown by name only in hypothesis' reports)."""

    def __repr__(self) -> str:
        return f"Files({', '.join(self)})"


@pytest.fixture(scope="module")
def hf_files(fuzz_dir) -> Files:
    """The files of the tiny model's HF folder, by name."""
    folder = write_hf_folder(fuzz_dir / "hf-base", tiny_model(seed=1))
    return Files({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def fuzz_settings(default: int):
    """``default`` examples (deterministic), or ``ROPEKIT_FUZZ_EXAMPLES`` (random) when set."""
    return hypothesis_settings(default, [HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])


def test_valid_tiny_files_load_in_the_sandbox(driver, fuzz_dir, gguf_base, hf_files):
    """The address-space cap sits above what loading a valid model needs (the fuzz tests' baseline)."""
    assert gguf_bytes(gguf_base)[0] == (fuzz_dir / "tiny-base.gguf").read_bytes()  # the writer round-trips
    assert_clean(driver.load(write_parts(fuzz_dir / "valid.gguf", gguf_base)), "valid GGUF")
    folder = fuzz_dir / "valid-hf"
    folder.mkdir()
    for name, content in hf_files.items():
        (folder / name).write_bytes(content)
    for path in (fuzz_dir / "valid.gguf", folder):
        reply = driver.load(path)
        assert reply["outcome"] == "ok", reply


# ---------------------------------------------------------------- GGUF mutations

ARCH_KEYS = ["general.architecture", "general.alignment", "llama.block_count", "llama.context_length",
             "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
             "llama.attention.head_count_kv", "llama.attention.key_length", "llama.attention.value_length",
             "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.freq_base",
             "llama.rope.dimension_count", "llama.rope.scaling.type", "llama.rope.scaling.factor",
             "llama.rope.scaling.original_context_length", "tokenizer.ggml.model", "tokenizer.ggml.pre",
             "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
             "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]
HOSTILE_VALUES = [((V.UINT32,), 0), ((V.UINT32,), 1), ((V.UINT32,), 3), ((V.UINT32,), 7), ((V.UINT32,), 1 << 31),
                  ((V.UINT32,), 100_000_000), ((V.UINT32,), (1 << 32) - 1), ((V.INT32,), -1),
                  ((V.UINT64,), (1 << 64) - 1), ((V.INT64,), -(1 << 63)), ((V.FLOAT32,), math.nan),
                  ((V.FLOAT32,), math.inf), ((V.FLOAT32,), -1.0), ((V.FLOAT32,), 0.0), ((V.FLOAT32,), 0.5),
                  ((V.FLOAT32,), 1e30), ((V.FLOAT64,), 1e-300), ((V.BOOL,), True), ((V.STRING,), ""),
                  ((V.STRING,), "llama"), ((V.STRING,), "yarn"), ((V.STRING,), "x" * 1000),
                  ((V.ARRAY, V.UINT32), [1, 2, 3]), ((V.ARRAY, V.STRING), ["a b", "ab"]),
                  ((V.ARRAY, V.ARRAY, V.UINT8), [[1], [2]]), ((V.ARRAY, V.UINT8), [])]
INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
                    1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
TENSOR_NAMES = ["blk.2.attn_q.weight", "blk.99.attn_norm.weight", "output.weight", "x" * 70, "rope_freqs.weight",
                "blk.0.attn_q.bias", "blk.-1.attn_q.weight", "token_embd.weight", "blk.0.ffn_gate.weight"]
STRUCTURAL, BYTEWISE = ("meta", "shape", "tensor", "template"), ("slot", "truncate", "flip")


def _scaled(value: int) -> st.SearchStrategy:
    return st.sampled_from([value * 2, value + 1, max(value - 1, 0), value // 2, value * 1000, 0])


def mutate_meta(data, parts: GGUFParts) -> str:
    key = data.draw(st.sampled_from(ARCH_KEYS), label="key")
    action = data.draw(st.sampled_from(["set", "set", "scale", "delete"]), label="action")
    i = parts.index(key)
    if action == "delete":
        parts.delete(key)
        return f"delete {key}"
    if action == "scale" and i is not None and isinstance(parts.kvs[i].value, int) and \
            parts.kvs[i].types[0] not in (V.BOOL, V.FLOAT32, V.FLOAT64):
        value = data.draw(_scaled(parts.kvs[i].value), label="value")
        parts.set(key, parts.kvs[i].types, value)
        return f"{key} = {value}"
    types, value = data.draw(st.sampled_from(HOSTILE_VALUES), label="value")
    parts.set(key, types, value)
    return f"{key} = {value!r:.40}"


def mutate_shape(data, parts: GGUFParts) -> str:
    tensor = data.draw(st.sampled_from(parts.tensors), label="tensor")
    how = data.draw(st.sampled_from(["drop", "append", "zero", "double", "plus1", "swap", "many", "type"]))
    dims = tensor.dims
    if how == "type":
        tensor.ggml_type = data.draw(st.sampled_from([1, 2, 8, 14, 20, 30, 99, 1 << 31]), label="ggml type")
    else:
        j = data.draw(st.integers(0, len(dims) - 1), label="dim")
        tensor.dims = {"drop": dims[:-1] or [1], "append": [*dims, 1], "zero": [*dims[:j], 0, *dims[j + 1:]],
                       "double": [*dims[:j], dims[j] * 2, *dims[j + 1:]],
                       "plus1": [*dims[:j], dims[j] + 1, *dims[j + 1:]], "swap": dims[::-1], "many": [1] * 5 + dims,
                       }[how]
    return f"tensor {tensor.name} {how}: {tensor.dims} type {tensor.ggml_type}"


def mutate_tensor(data, parts: GGUFParts) -> str:
    i = data.draw(st.integers(0, len(parts.tensors) - 1), label="tensor")
    how = data.draw(st.sampled_from(["remove", "duplicate", "rename", "swap data"]))
    if how == "remove":
        del parts.tensors[i]
    elif how == "duplicate":
        parts.tensors.append(copy.deepcopy(parts.tensors[i]))
    elif how == "rename":
        parts.tensors[i].name = data.draw(st.sampled_from(TENSOR_NAMES), label="name")
    else:
        j = data.draw(st.integers(0, len(parts.tensors) - 1), label="other")
        parts.tensors[i].data, parts.tensors[j].data = parts.tensors[j].data, parts.tensors[i].data
    return f"{how} tensor #{i}"


def mutate_template(data, parts: GGUFParts) -> str:
    template = data.draw(st.sampled_from(HOSTILE_TEMPLATES), label="template")
    parts.set("tokenizer.chat_template", V.STRING, template)
    return f"chat template {template[:40]!r}"


def mutate_bytes(data, raw: bytes, slots: list[Slot], header_end: int, kind: str) -> tuple[bytes, str]:
    buf = bytearray(raw)
    slots = [s for s in slots if s.offset + struct.calcsize(s.fmt) <= len(buf)]
    header_end = min(header_end, len(buf))
    if not buf or not header_end or kind == "slot" and not slots:
        return raw, f"{kind}: nothing left to change"
    if kind == "slot":
        slot = data.draw(st.sampled_from(slots), label="slot")
        bits = 8 * struct.calcsize(slot.fmt)
        (old,) = struct.unpack_from(slot.fmt, buf, slot.offset)
        value = data.draw(st.one_of(st.sampled_from([v for v in INTERESTING_INTS if v < 1 << bits]),
                                    _scaled(abs(old)), st.integers(0, (1 << bits) - 1)), label="value")
        struct.pack_into(slot.fmt.upper(), buf, slot.offset, value % (1 << bits))
        return bytes(buf), f"{slot.label}: {old} -> {value}"
    if kind == "truncate":
        size = data.draw(st.one_of(st.integers(0, header_end), st.integers(0, len(buf) - 1)), label="size")
        return bytes(buf[:size]), f"truncate at {size}"
    flips = data.draw(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(1, 255)), min_size=1,
                               max_size=8), label="flips")
    for offset, mask in flips:
        buf[offset] ^= mask
    return bytes(buf), f"flip {flips}"


def mutated_gguf(data, base: GGUFParts) -> tuple[bytes, list[str]]:
    """The tiny GGUF after one or two mutations (structural ones first, then byte-level ones)."""
    kinds = data.draw(st.lists(st.sampled_from(STRUCTURAL + BYTEWISE), min_size=1, max_size=2), label="kinds")
    parts, done = copy.deepcopy(base), []
    mutate = {"meta": mutate_meta, "shape": mutate_shape, "tensor": mutate_tensor, "template": mutate_template}
    for kind in (k for k in kinds if k in STRUCTURAL):
        done.append(mutate[kind](data, parts))
    raw, slots, header_end = gguf_bytes(parts)
    for kind in (k for k in kinds if k in BYTEWISE):
        raw, description = mutate_bytes(data, raw, slots, header_end, kind)
        done.append(description)
    return raw, done


@fuzz_settings(120)
@given(data=st.data())
def test_mutated_gguf_files_load_or_fail_cleanly(data, driver, fuzz_dir, gguf_base):
    raw, mutations = mutated_gguf(data, gguf_base)
    path = fuzz_dir / "case.gguf"
    path.write_bytes(raw)
    assert_clean(driver.load(path, kind="gguf"), f"GGUF after {mutations}")


# ---------------------------------------------------------------- HF folder mutations

JSON_VALUES = [0, -1, 1, 3, 7, 100_000_000, 1e8, 1 << 63, 1 << 64, 1.5, "4", None, [], {}, [4], True, False,
               math.nan, math.inf, -math.inf, "x" * 10, "gelu"]
CONFIG_DOCS = ["[]", "[1, 2]", "42", '"str"', "null", "{", "", b"\xff\xfe{}", "[" * 100_000, '{"model_type": "llama"}',
               "1" * 5000, '{"model_type": "llama", "hidden_size": 1e999}']
ROPE_VALUES = [{"rope_type": "yarn", "factor": 0}, {"rope_type": "nope"}, "str", {"rope_type": "linear", "factor": -1},
               {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 0},
               {"rope_type": "yarn", "factor": 4, "beta_fast": 0, "beta_slow": 0}, {"rope_type": "llama3", "factor": 8},
               {"rope_type": "dynamic", "factor": 1e308}, {"rope_type": "longrope", "short_factor": [1]},
               {"rope_theta": 0}, {"rope_theta": 1e308}, {"rope_type": "default", "partial_rotary_factor": 0.01},
               {"rope_type": "yarn", "factor": 1e308, "original_max_position_embeddings": 1}]
TOKENIZER_JSONS = ["", "{}", "[]", "x", '{"model": {"type": "BPE", "vocab": 5}}', "[" * 100_000,
                   '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {}, "unk_token": "x"}}']
TOKENIZER_CONFIGS = ['{"bos_token": 5}', '{"chat_template": 5}', "[]", '{"add_bos_token": "yes"}', "{",
                     '{"eos_token": {"content": 7}}', '{"chat_template": [{"name": "default", "template": 5}]}']
HEADER_EDITS = {"dtype": ["F64", "I64", "BOOL", "X", 5, None],
                "shape": [[], [0], [1], [-1], [64, 65], [1 << 40, 1 << 40], "x", [1] * 9, [1.5]],
                "data_offsets": [[0, 0], [0, 1 << 60], [-1, 5], [5], "x", [10, 5]]}
HF_KINDS = ["config_value", "config_delete", "config_doc", "rope", "safetensors_cut", "safetensors_header",
            "safetensors_length", "tokenizer_json", "tokenizer_config", "remove"]


def _header(raw: bytes) -> tuple[dict, bytes] | None:
    """The JSON header and the data of a safetensors file, or None if a former mutation broke the header."""
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
    except (struct.error, ValueError, RecursionError):
        return None
    return (header, raw[8 + n:]) if isinstance(header, dict) and header else None


def _with_header(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def mutate_config(data, files: dict[str, bytes], kind: str) -> str:
    if kind == "config_doc":
        doc = data.draw(st.sampled_from(CONFIG_DOCS), label="config.json")
        files["config.json"] = doc if isinstance(doc, bytes) else doc.encode()
        return f"config.json = {doc[:40]!r}"
    try:
        config = json.loads(files["config.json"])
    except (ValueError, RecursionError):
        return f"{kind}: config.json already broken"
    if not isinstance(config, dict) or not config:
        return f"{kind}: config.json already not an object"
    key = data.draw(st.sampled_from(sorted(config)), label="key")
    if kind == "config_delete":
        del config[key]
        change = f"delete {key}"
    elif kind == "rope":
        config["rope_parameters"] = data.draw(st.sampled_from(ROPE_VALUES), label="rope")
        change = f"rope_parameters = {config['rope_parameters']}"
    else:
        config[key] = data.draw(st.sampled_from(JSON_VALUES), label="value")
        change = f"{key} = {config[key]!r:.40}"
    files["config.json"] = json.dumps(config).encode()
    return change


def mutate_safetensors(data, files: dict[str, bytes], kind: str) -> str:
    raw = files["model.safetensors"]
    if len(raw) < 9 or kind != "safetensors_header" and _header(raw) is None:
        return f"{kind}: model.safetensors already broken"
    if kind == "safetensors_cut":
        size = data.draw(st.integers(0, len(raw) - 1), label="size")
        files["model.safetensors"] = raw[:size]
        return f"truncate model.safetensors at {size}"
    if kind == "safetensors_length":
        value = data.draw(st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(0, len(raw))), label="length")
        files["model.safetensors"] = struct.pack("<Q", value) + raw[8:]
        return f"header length {value}"
    if _header(raw) is None:
        return f"{kind}: model.safetensors header already broken"
    header, rest = _header(raw)
    name = data.draw(st.sampled_from(sorted(header)), label="tensor")
    field_name = data.draw(st.sampled_from([*HEADER_EDITS, "delete", "rename", "junk"]), label="field")
    if field_name == "delete":
        del header[name]
    elif field_name == "rename":
        header["model.layers.99.mlp.up_proj.weight"] = header.pop(name)
    elif field_name == "junk":
        header[name] = data.draw(st.sampled_from([5, "x", [], None, {}]), label="junk")
    elif isinstance(header[name], dict):
        header[name][field_name] = data.draw(st.sampled_from(HEADER_EDITS[field_name]), label="value")
    files["model.safetensors"] = _with_header(header, rest)
    return f"safetensors header {name} {field_name}"


def mutate_tokenizer(data, files: dict[str, bytes], kind: str) -> str:
    if kind == "tokenizer_json":
        raw = files["tokenizer.json"]
        junk = data.draw(st.one_of(st.sampled_from(TOKENIZER_JSONS), st.integers(0, max(len(raw) - 1, 0))),
                         label="junk")
        files["tokenizer.json"] = raw[:junk] if isinstance(junk, int) else junk.encode()
        return f"tokenizer.json = {junk!r:.40}"
    content = data.draw(st.one_of(st.sampled_from(TOKENIZER_CONFIGS),
                                  st.sampled_from(HOSTILE_TEMPLATES).map(lambda t: json.dumps({"chat_template": t}))),
                        label="tokenizer_config.json")
    files["tokenizer_config.json"] = content.encode()
    return f"tokenizer_config.json = {content[:60]!r}"


def mutated_hf_folder(data, base: dict[str, bytes]) -> tuple[dict[str, bytes], list[str]]:
    files, done = dict(base), []
    for kind in data.draw(st.lists(st.sampled_from(HF_KINDS), min_size=1, max_size=2), label="kinds"):
        if kind == "remove":
            name = data.draw(st.sampled_from(sorted(files)), label="file")
            files.pop(name)
            done.append(f"remove {name}")
        elif kind.startswith("safetensors") and "model.safetensors" in files:
            done.append(mutate_safetensors(data, files, kind))
        elif kind.startswith("tokenizer") and "tokenizer.json" in files:
            done.append(mutate_tokenizer(data, files, kind))
        elif "config.json" in files:
            done.append(mutate_config(data, files, kind))
    return files, done


@fuzz_settings(80)
@given(data=st.data())
def test_mutated_hf_folders_load_or_fail_cleanly(data, driver, fuzz_dir, hf_files):
    files, mutations = mutated_hf_folder(data, hf_files)
    folder = Path(tempfile.mkdtemp(dir=fuzz_dir))
    for name, content in files.items():
        (folder / name).write_bytes(content)
    reply = driver.load(folder, kind="hf")
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    assert_clean(reply, f"HF folder after {mutations}")
