"""What this torch's CPU ``torch._scaled_mm`` emulates, for the CPU tests of the fp8 GEMM paths."""
import functools

import torch


@functools.cache
def rowwise_scaled_mm_on_cpu() -> bool:
    """Whether the CPU ``_scaled_mm`` takes row-wise scales (torch 2.14 does; 2.11 only tensor-wise)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True
