"""Reader for the IDX format of (Fashion-)MNIST (`*-idx3-ubyte.gz`)."""

import gzip
import struct

import numpy as np

# The third byte of the magic number gives the element type; only uint8 occurs
# in (Fashion-)MNIST, but the others are part of the format.
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Reads an IDX file (`.gz`: decompressed on the fly) into a NumPy array with the
    file's shape and element type.

    Raises:
        ValueError: the file is not a well-formed (or complete) IDX file.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # Not gzip, or truncated.
        raise ValueError(f"{path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) < header or len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX header says {shape} ({expected} bytes) but "
            f"{len(data) - header} bytes follow")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))
