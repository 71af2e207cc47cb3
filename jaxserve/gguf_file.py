"""A GGUF file's metadata and tensor table, read straight from the memory map.

    f = GGUFFile("SmolLM2-135M-Instruct.Q4_1.gguf")
    f.metadata["llama.block_count"], [t.name for t in f.tensors], f.tensors[0].data

The ``gguf`` package's ``GGUFReader`` builds a numpy slice for every part of every metadata value; a
GGUF tokenizer is ~100k strings (SmolLM2: 49,152 tokens and 48,900 merges), so opening SmolLM2's file
that way takes about a second of the README command.  Here the header is parsed with ``struct`` from
the mapped bytes, string arrays with one ``bytes`` slice each, scalar arrays with one ``np.frombuffer``.
The tensors (``GGUFTensor``: name, ``gguf.GGMLQuantizationType``, dims, data) carry the same arrays
``GGUFReader`` gives: a view of the map of the tensor's element type, or for block-quantized types its
bytes ``[rows..., bytes per row]``.  Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
(version 2 and 3, little-endian; a big-endian file is refused by name).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format of a scalar (8: string, 9: array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
# Tensor element types stored as plain arrays (ggml type id -> numpy dtype); others are byte blocks.
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclasses.dataclass
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # uint64 dims, fastest-varying first (GGUF's order)
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GGUFFile:
    """The metadata (``metadata``: key -> int / float / bool / str / list) and tensors of a GGUF file."""

    def __init__(self, path: str):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        self.path = path
        self.data = np.memmap(path, mode="r").view(np.ndarray)
        buf = self.data.data  # memoryview of the map
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise ValueError("GGUF magic invalid")
        version, = struct.unpack_from("<I", buf, 4)
        if version & 0xFFFF == 0:
            raise ValueError("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        self.version = version
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        self._buf, self._offs = buf, 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            vtype = self._u32()
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._u32()
            dims = np.frombuffer(buf, np.uint64, n_dims, self._offs).copy()
            self._offs += 8 * n_dims
            ttype, offset = struct.unpack_from("<IQ", buf, self._offs)
            self._offs += 12
            infos.append((name, dims, ttype, offset))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment: must be a power of two, got {alignment}")
        start = -(-self._offs // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        seen = set()
        for name, dims, ttype, offset in infos:
            if name in seen:
                raise ValueError(f"duplicated tensor {name}")
            seen.add(name)
            qtype = GGMLQuantizationType(ttype)
            n = int(np.prod(dims)) if len(dims) else 1
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = n * type_size // block
            at = start + int(offset)
            np_dims = tuple(int(d) for d in reversed(dims.tolist()))
            if ttype in _PLAIN:
                data = np.frombuffer(buf, _PLAIN[ttype], n, at).reshape(np_dims)
            else:
                data = np.frombuffer(buf, np.uint8, n_bytes, at).reshape(quant_shape_to_byte_shape(np_dims, qtype))
            self.tensors.append(GGUFTensor(name, qtype, dims, n, n_bytes, at, data))
        del self._buf

    def _u32(self) -> int:
        v, = struct.unpack_from("<I", self._buf, self._offs)
        self._offs += 4
        return v

    def _string(self) -> str:
        n, = struct.unpack_from("<Q", self._buf, self._offs)
        start = self._offs + 8
        self._offs = start + n
        return bytes(self._buf[start:start + n]).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype = self._u32()
            count, = struct.unpack_from("<Q", self._buf, self._offs)
            self._offs += 8
            if itype in _NUMPY:
                arr = np.frombuffer(self._buf, _NUMPY[itype], count, self._offs)
                self._offs += arr.nbytes
                return arr.tolist()
            return [self._value(itype) for _ in range(count)]
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown GGUF metadata type {vtype} at byte {self._offs}")
        v, = struct.unpack_from("<" + fmt, self._buf, self._offs)
        self._offs += struct.calcsize(fmt)
        return v
