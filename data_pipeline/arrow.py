"""numpy <-> Arrow through the buffers. pyarrow's `pa.array` and `Array.to_numpy` import pandas on
first use (0.3-0.4 s), which every build worker process and the planning driver would pay for a
check that never applies here; these functions build and read the buffers directly, zero-copy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def from_numpy(values: np.ndarray) -> pa.Array:
    """A 1-D numeric array as an Arrow array of the same type (no nulls)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def one_chunk(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as it is (memory-mapped stays mapped: combine_chunks
    copies even one chunk), or the chunks combined."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def to_numpy(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric Arrow array without nulls as numpy (a view of the buffer)."""
    if isinstance(array, pa.ChunkedArray):
        array = one_chunk(array)
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)) or array.null_count:
        raise TypeError(f"to_numpy reads numeric arrays without nulls, not {array.type} with {array.null_count} nulls")
    dtype = np.dtype(array.type.to_pandas_dtype())
    return np.frombuffer(array.buffers()[1], dtype, len(array), array.offset * dtype.itemsize)


def strings(values: list[str]) -> pa.StringArray:
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded)))


def dictionary_strings(values: list[str]) -> pa.DictionaryArray:
    """Dictionary-encoded strings (one id per value, each distinct string stored once)."""
    distinct = list(dict.fromkeys(values))
    index = {v: i for i, v in enumerate(distinct)}
    codes = np.fromiter((index[v] for v in values), np.int32, len(values))
    return pa.DictionaryArray.from_arrays(from_numpy(codes), strings(distinct))


def fixed_binary(values: list[bytes], width: int) -> pa.FixedSizeBinaryArray:
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(b"".join(values))])
