"""A lean GGUF parser: header, key/value metadata and tensor infos over one memory map.

Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3,
little-endian). Layout:

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: u64[n_dims] innermost first,
                    ggml_type: u32, offset: u64 from the start of the data section)
    padding to `general.alignment` (default 32) | tensor data

where a string is (length u64, UTF-8 bytes) and an array is (item_type u32, count u64,
items). The `gguf` package's GGUFReader builds a numpy array for every string and number
(about 250k for a 49k-token vocabulary: seconds and ~100 MB); here scalars come from
`struct.unpack_from`, numeric arrays from one `np.frombuffer` each and strings from one
loop that decodes each string once. Tensor data are numpy views of the map (zero-copy).
Every count and length is checked against the bytes left in the file before it is used,
so a corrupt header raises GGUFFormatError instead of allocating gigabytes; tensor data must
be laid out as llama.cpp's loader requires (in order, consecutive, aligned), so no two
tensors share bytes.
"""
from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType
MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays of ...: GGUF allows them, nothing writes them

# scalar value type -> (struct format, numpy dtype); all little-endian
_SCALARS = {
    V.UINT8: ("<B", "<u1"), V.INT8: ("<b", "<i1"), V.UINT16: ("<H", "<u2"),
    V.INT16: ("<h", "<i2"), V.UINT32: ("<I", "<u4"), V.INT32: ("<i", "<i4"),
    V.FLOAT32: ("<f", "<f4"), V.BOOL: ("<?", "?"), V.UINT64: ("<Q", "<u8"),
    V.INT64: ("<q", "<i8"), V.FLOAT64: ("<d", "<f8"),
}
_SCALAR_BY_INT = {int(k): (v[0], np.dtype(v[1]), struct.calcsize(v[0]), k) for k, v in _SCALARS.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# typed views for float tensors; every other type is raw bytes (rows, bytes_per_row)
_FLOAT_DTYPES = {Q.F32: np.dtype("<f4"), Q.F16: np.dtype("<f2")}


class GGUFFormatError(ValueError):
    """The bytes do not follow the GGUF layout; the message says where and what.

    `problem` sums it up for a sentence about the file: "<path> <problem>: <message>".
    """

    def __init__(self, message: str, problem: str = "is truncated or its GGUF header is corrupt"):
        super().__init__(message)
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor info entry; `data` is a view of the memory map.

    data: F32/F16 typed (*reversed(dims)); every other type uint8 (rows, bytes_per_row)
    with rows = prod(dims[1:]) (BF16 included: 2 bytes a value).
    """
    name: str
    dims: tuple[int, ...]  # innermost first, as stored
    ggml_type: gguf.GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int
    data: np.ndarray = dataclasses.field(compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """Outermost first (numpy / torch order)."""
        return tuple(reversed(self.dims))


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: metadata as plain Python values, tensors as views of its map."""
    version: int
    metadata: dict[str, Any]  # key -> str, int, float, bool, or a list of them
    types: dict[str, tuple[V, ...]]  # key -> (type,) or (ARRAY, item type[, ...])
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int  # start of the tensor data section
    size: int  # bytes in the file


class _Cursor:
    """Sequential reads from a buffer, each checked against its end."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf, pos: int, end: int):
        self.buf, self.pos, self.end = buf, pos, end

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise GGUFFormatError(f"{what} at byte {self.pos} needs {n} bytes, "
                                  f"but the file ends at byte {self.end}")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        start = self.pos
        self.pos += n
        try:
            return self.buf[start:self.pos].decode()
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{what} at byte {start} is not UTF-8: {e}") from None

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row: one unpack, one slice and one decode each."""
        buf, pos, end = self.buf, self.pos, self.end
        unpack = _U64.unpack_from
        out = [""] * count
        try:
            for i in range(count):
                if pos + 8 > end:
                    raise GGUFFormatError(f"length of {what}[{i}] at byte {pos} is past the "
                                          f"end of the file (byte {end})")
                (n,) = unpack(buf, pos)
                pos += 8
                if n > end - pos:
                    raise GGUFFormatError(f"{what}[{i}] at byte {pos} has length {n}, but the "
                                          f"file ends at byte {end}")
                out[i] = buf[pos:pos + n].decode()  # buf[a:b] is bytes: one copy, one decode
                pos += n
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{what}[{i}] at byte {pos} is not UTF-8: {e}") from None
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> tuple[Any, tuple[V, ...]]:
        """One value of type `vtype` -> (Python value, its types as GGUFReader lists them)."""
        scalar = _SCALAR_BY_INT.get(vtype)
        if scalar is not None:
            fmt, _, size, enum = scalar
            self.need(size, what)
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
            self.pos += size
            return v, (enum,)
        if vtype == V.STRING:
            return self.string(what), (V.STRING,)
        if vtype == V.ARRAY:
            item = self.u32(f"item type of {what}")
            count = self.u64(f"length of {what}")
            if item == V.STRING:
                self.need(8 * count, f"{count} strings of {what}")  # 8 length bytes each, at least
                return self.strings(count, what), (V.ARRAY, V.STRING)
            scalar = _SCALAR_BY_INT.get(item)
            if scalar is not None:
                _, dtype, size, enum = scalar
                self.need(size * count, f"{count} items of {what}")
                if not count:
                    return [], (V.ARRAY, enum)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += size * count
                return arr.tolist(), (V.ARRAY, enum)
            if item == V.ARRAY:  # nested arrays: rare; one (item type, count) header each
                if depth >= MAX_NESTING:
                    raise GGUFFormatError(f"{what} nests arrays more than {MAX_NESTING} deep")
                self.need(12 * count, f"{count} arrays of {what}")
                values, sub = [], (V.ARRAY,)
                for i in range(count):
                    v, sub = self.value(V.ARRAY, f"{what}[{i}]", depth + 1)
                    values.append(v)
                return values, (V.ARRAY, *sub)
            raise GGUFFormatError(f"{what} has unknown item type {item}")
        raise GGUFFormatError(f"{what} has unknown value type {vtype}")


def _tensor_bytes(name: str, dims: tuple[int, ...], ggml_type: int) -> tuple[int, int]:
    """(bytes, bytes_per_row) of a tensor, from ggml's (block size, block bytes) table."""
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[Q(ggml_type)]
    except (ValueError, KeyError):
        raise GGUFFormatError(f"tensor {name} has unknown ggml type {ggml_type}") from None
    row = dims[0] if dims else 1
    if row % block:
        raise GGUFFormatError(f"tensor {name}: a row of {row} values is not a whole number of "
                              f"{Q(ggml_type).name} blocks of {block}")
    row_bytes = row // block * type_size
    rows = 1
    for d in dims[1:]:
        rows *= d
    return rows * row_bytes, row_bytes


def parse(buf: mmap.mmap | bytes, whole: np.ndarray | None = None) -> GGUFFile:
    """Parse the GGUF file in `buf`, an mmap.mmap or bytes (their slices are bytes, faster
    to decode than numpy or memoryview slices).

    Tensor data are views of `whole`, a uint8 array of the same bytes (by default
    np.frombuffer(buf)), and writable if it is.
    """
    if whole is None:
        whole = np.frombuffer(buf, dtype=np.uint8)
    size = int(whole.shape[0])
    if len(buf) != size:
        raise ValueError(f"buf has {len(buf)} bytes but whole has {size}")
    cur = _Cursor(buf, 0, size)
    cur.need(24, "the GGUF header (magic, version, tensor count, kv count)")
    if bytes(buf[:4]) != MAGIC:
        raise GGUFFormatError(f"it starts with {bytes(buf[:4])!r}, not {MAGIC!r}", "is not a GGUF file")
    cur.pos = 4
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version:
        raise GGUFFormatError("only little-endian GGUF files are supported", "is a big-endian GGUF file")
    if version not in VERSIONS:
        raise GGUFFormatError("supported versions: 2, 3", f"is GGUF version {version}")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("kv count")
    # the smallest kv is 13 bytes (empty key, type, one byte); a tensor info 24
    if n_kv * 13 + n_tensors * 24 > size - cur.pos:
        raise GGUFFormatError(f"the header claims {n_kv} metadata keys and {n_tensors} tensors, "
                              f"more than {size} bytes can hold")

    metadata: dict[str, Any] = {}
    types: dict[str, tuple[V, ...]] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.u32(f"value type of {key}")
        if key in metadata:
            raise GGUFFormatError(f"metadata key {key!r} appears twice")
        metadata[key], types[key] = cur.value(vtype, key)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if types["general.alignment"] != (V.UINT32,) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"general.alignment must be a uint32 power of two, not {alignment!r}")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"dimension count of tensor {name}")
        if n_dims > MAX_DIMS:
            raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        cur.need(8 * n_dims, f"dimensions of tensor {name}")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos)
        cur.pos += 8 * n_dims
        ggml_type = cur.u32(f"type of tensor {name}")
        offset = cur.u64(f"data offset of tensor {name}")
        infos.append((name, dims, ggml_type, offset))
    data_offset = -(-cur.pos // alignment) * alignment

    # llama.cpp's loader (gguf.cpp) takes tensor data only in the order of the infos, each
    # starting where the previous one ends, padded to the alignment: anything else (overlaps,
    # gaps, a tensor retyped to more or fewer bytes) is refused, as it is here
    tensors, seen, expected = [], set(), 0
    for name, dims, ggml_type, offset in infos:
        if name in seen:
            raise GGUFFormatError(f"tensor {name} appears twice")
        seen.add(name)
        n_bytes, row_bytes = _tensor_bytes(name, dims, ggml_type)
        if offset != expected:
            raise GGUFFormatError(
                f"tensor {name} has data offset {offset}, expected {expected}: tensor data must "
                f"follow one another in the order of the tensor infos, each padded to "
                f"{alignment} bytes (they would overlap or leave gaps)")
        expected += -(-n_bytes // alignment) * alignment
        start = data_offset + offset
        if start + n_bytes > size:
            raise GGUFFormatError(f"tensor {name} ends at byte {start + n_bytes} but the file "
                                  f"has {size}", "is truncated")
        raw = whole[start:start + n_bytes]
        dtype = _FLOAT_DTYPES.get(ggml_type)
        if dtype is not None:
            data = raw.view(dtype).reshape(tuple(reversed(dims)))
        else:
            data = raw.reshape(n_bytes // row_bytes if row_bytes else 0, row_bytes)
        enum = Q(ggml_type)
        tensors.append(TensorInfo(name, tuple(dims), enum, start, n_bytes, data))
    return GGUFFile(version, metadata, types, tensors, alignment, data_offset, size)


def read(path: str | Path, mode: str = "c") -> GGUFFile:
    """Memory-map `path` (`mode` as numpy.memmap's: 'r' read-only, 'c' copy-on-write) and parse it.

    Raises OSError if the file cannot be opened and GGUFFormatError if it is not valid GGUF.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise GGUFFormatError(f"only {size} bytes, less than a GGUF header", "is not a GGUF file")
    mm = np.memmap(path, dtype=np.uint8, mode=mode)
    # slicing a np.memmap runs __array_finalize__ each time; a plain view of it does not,
    # and the tensor views' .base chain still ends at the memmap, which keeps the map open
    return parse(mm.base, mm.view(np.ndarray))


_MADV_DONTNEED = 4  # <sys/mman.h>


def release_file_pages(array: np.ndarray):
    """Drop the whole pages of a memory-mapped, never-written array from the resident set."""
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = base.base if isinstance(base, np.ndarray) else None
    if base is None or os.name != "posix":
        return  # a copy in memory (e.g. un-permuted Q/K rows) is just memory
    start = -(-array.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside
    end = (array.ctypes.data + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                  _MADV_DONTNEED)
