"""What a benchmark ran on: device name, library versions, time. Numbers mean little without these."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch
import transformers


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (``platform.processor()`` is often empty on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
