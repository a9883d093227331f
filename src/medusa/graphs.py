"""CUDA graphs for the decoding step: one per (batch bucket, attention span, step kind), captured on first use.

A Medusa step is dozens of small kernels per layer; launched one by one from Python the GPU idles
between them and a 135M or even 7B model runs CPU-bound. The step has static shapes (a fixed tree per
bucket, preallocated cache, state in fixed buffers), so it is captured once and replayed; rows join and
leave by changing what the buffers hold, never the graph. Prefill stays eager: it runs once per row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from medusa.acceptance import StepKind
from medusa.decoding import Decoder

logger = logging.getLogger("medusa")

WARMUP_STEPS = 2  # eager runs on a side stream before a capture (cuBLAS handles, lazy allocations, compiling)
GraphKey = tuple[int, int, StepKind]  # (rows, span, kind)


@dataclass
class CaptureReport:
    graphs: int = 0
    seconds: float = 0.0  # spent capturing (warm-up runs included)
    memory_bytes: int = 0  # what the captures left allocated (the graphs' private pool: their intermediates)


class StepGraphs:
    """``decoder.step`` captured as CUDA graphs, one per (rows, span, kind), sharing one memory pool (they never
    run at once). Calling it replays the key's graph, capturing it first if needed.

    A capture must not disturb the rows already running: the warm-up runs happen with every row marked
    idle (they commit nothing), and the small row state they overwrite is restored before the capture.
    """

    def __init__(self, decoder: Decoder, compile_step: bool | str = False) -> None:
        step: Callable[..., tuple[torch.Tensor, ...]] = decoder.step
        if compile_step:
            # Inside a graph every kernel still costs a few microseconds; compiling first fuses the many
            # small elementwise kernels (norms, rotary embeddings, masks) that dominate a small batch.
            # "max-autotune" also lets inductor time its own matrix-vector kernels against cuBLAS. Each
            # (rows, span, kind) is its own specialisation: allow more of them than dynamo's default.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            options = {"coordinate_descent_tuning": True, "max_autotune": compile_step == "max-autotune"}
            step = torch.compile(decoder.step, dynamic=False, options=options)
        self.step_function = step  # what the graphs captured (compiled or not), for profiling it uncaptured
        self.decoder = decoder
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self.report = CaptureReport()

    def prepare(self, rows: int, span: int, kind: StepKind) -> None:
        """Capture the key's graph now if it is not captured yet (the engine does this before timed steps)."""
        key = (rows, span, kind)
        if key not in self.graphs:
            self.graphs[key] = self._capture(rows, span, kind)

    def __call__(self, rows: int, span: int, kind: StepKind) -> tuple[torch.Tensor, ...]:
        self.prepare(rows, span, kind)
        graph, outputs = self.graphs[(rows, span, kind)]
        graph.replay()
        return outputs

    def _capture(self, rows: int, span: int, kind: StepKind) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        decoder = self.decoder
        started = time.perf_counter()
        allocated = torch.cuda.memory_allocated(decoder.device)
        state = (
            decoder.active,
            decoder.lengths,
            decoder.root_token,
            decoder.last_hidden,
            decoder.root_logprob,
            decoder.root_top_ids,
            decoder.root_top_logprobs,
        )
        saved = [tensor.clone() for tensor in state]
        decoder.active.zero_()
        side = torch.cuda.Stream(decoder.device)
        side.wait_stream(torch.cuda.current_stream(decoder.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARMUP_STEPS):
                self.step_function(rows, span, kind)
        torch.cuda.current_stream(decoder.device).wait_stream(side)
        with torch.inference_mode():
            for tensor, copy in zip(state, saved):
                tensor.copy_(copy)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            outputs = self.step_function(rows, span, kind)
        torch.cuda.synchronize(decoder.device)
        self.report.graphs += 1
        self.report.seconds += time.perf_counter() - started
        self.report.memory_bytes += torch.cuda.memory_allocated(decoder.device) - allocated
        return graph, outputs
