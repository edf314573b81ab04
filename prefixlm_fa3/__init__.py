"""prefixlm_fa3: Hopper varlen attention with a native PrefixLM mask and zero-written padding.

Importing the package registers torch.ops.prefixlm.varlen_fwd / varlen_bwd (CPU: the
reference implementation; CUDA: the compiled kernels, when the extension is built).
"""

from . import ops  # noqa: F401  (registers the ops)
from ._library import cuda_kernels_available
from ._version import __version__
from .interface import flash_attn_varlen_func, flash_attn_varlen_prefixlm

__all__ = ["__version__", "cuda_kernels_available", "flash_attn_varlen_func", "flash_attn_varlen_prefixlm"]
