"""The one place that picks a device: the one asked for, else CUDA when available, else the CPU."""

from __future__ import annotations

import torch

from minidpo.errors import ParameterError


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:1"; None or "auto": cuda when available, else cpu) as a device.

    A name torch does not know, or CUDA where there is none, is a ParameterError naming `device`.
    """
    if requested is None or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ParameterError(f"device {requested!r}: unknown; use cpu, cuda or cuda:N", "device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {requested!r}: CUDA is not available here; use cpu", "device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ParameterError(f"device {requested!r}: there are {torch.cuda.device_count()} CUDA devices", "device")
    return device
