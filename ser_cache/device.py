"""Where tensors run: the GPU when there is one, else the CPU."""
from __future__ import annotations

import torch

from .errors import OptionError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps if available, else cpu; otherwise as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise OptionError(f"--device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu or auto")
    return device
