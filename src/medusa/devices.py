"""Where a model's weights live, and waiting for a device: small helpers every layer uses."""

from __future__ import annotations

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (its input side when split over devices)."""
    return next(model.parameters()).device


def spans_devices(model: torch.nn.Module) -> bool:
    """Whether the module's parameters sit on more than one device (``device_map`` split it)."""
    return len({parameter.device for parameter in model.parameters()}) > 1


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings and host reads need it on CUDA; a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
