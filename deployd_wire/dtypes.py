"""The tensor dtypes deployd carries and their name on each wire. Imports nothing heavy."""

from __future__ import annotations

from typing import NamedTuple


class DType(NamedTuple):
    name: str  # in packed values, and torch's attribute name (torch.float32)
    itemsize: int  # bytes per element
    kserve: str  # KServe v2 / Open Inference Protocol datatype; "" where v2 has none

    @property
    def proto_enum(self) -> str:
        """The name of its value in deployd.v1's DType enum."""
        return "DTYPE_" + self.name.upper()


DTYPES: tuple[DType, ...] = (
    DType("float16", 2, "FP16"),
    DType("float32", 4, "FP32"),
    DType("float64", 8, "FP64"),
    DType("bfloat16", 2, "BF16"),
    DType("int8", 1, "INT8"),
    DType("int16", 2, "INT16"),
    DType("int32", 4, "INT32"),
    DType("int64", 8, "INT64"),
    DType("uint8", 1, "UINT8"),
    DType("bool", 1, "BOOL"),
    DType("complex64", 8, ""),
    DType("complex128", 16, ""),
)
BY_NAME: dict[str, DType] = {dtype.name: dtype for dtype in DTYPES}
BY_KSERVE: dict[str, DType] = {dtype.kserve: dtype for dtype in DTYPES if dtype.kserve}
