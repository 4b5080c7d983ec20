"""Real low-bit kernels that PyTorch ships, for comparison with fake quantisation.

PyTorch has no kernels for 2-4-bit activations. On CPU it has int8: dynamic
quantisation of ``nn.Linear`` (int8 weights per tensor, activations quantised
per batch on the fly, fbgemm/oneDNN GEMMs) in ``torch.ao.quantization``. That
module is deprecated in favour of torchao, which is not installed here and
targets GPUs; it still works in this torch build, so it is wrapped here and
its deprecation warnings are silenced. Everything else (convs, attention
matmuls) stays fp32, so this is W8A8 for the Linear layers only.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

__all__ = ["dynamic_int8", "dynamic_int8_available"]


def dynamic_int8_available() -> bool:
    """Whether this torch build can run dynamically quantised int8 Linears on CPU."""
    try:
        import torch.ao.quantization as tq
    except ImportError:
        return False
    return hasattr(tq, "quantize_dynamic") and bool(torch.backends.quantized.supported_engines)


def dynamic_int8(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` whose ``nn.Linear`` layers run int8 GEMMs.

    Raises ``RuntimeError`` when this torch build lacks the kernels.
    """
    if not dynamic_int8_available():
        raise RuntimeError(
            "torch.ao.quantization.quantize_dynamic is not available in torch "
            f"{torch.__version__}; no int8 CPU kernel to benchmark"
        )
    import torch.ao.quantization as tq

    cpu = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        return tq.quantize_dynamic(cpu, {nn.Linear}, dtype=torch.qint8)
