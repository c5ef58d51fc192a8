"""What the Triton kernels take and how they run, answerable without importing triton."""
from __future__ import annotations

import math
import os

MAX_HEAD_DIM = 256


def padded_head_dim(head_dim: int) -> int:
    """The power of two (at least 16: tl.dot's minimum) the kernels run at; the rest is zero padding."""
    return max(16, 1 << math.ceil(math.log2(max(head_dim, 1))))


def head_dim_supported(head_dim: int) -> bool:
    return 1 <= head_dim and padded_head_dim(head_dim) <= MAX_HEAD_DIM


def triton_interpreted() -> bool:
    """TRITON_INTERPRET is on: the kernels run in Triton's interpreter on CPU tensors (it must be set before
    triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
