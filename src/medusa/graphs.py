"""CUDA graphs for the decoding step, one per (batch bucket, attention span, step kind, tree or plain), and for the
prefill of prompts of up to 2048 tokens, one per (group size, prompt width, kind); each captured on first use.

A Medusa step is dozens of small kernels per layer; launched one by one from Python the GPU idles
between them and a 135M or even 7B model runs CPU-bound. The step has static shapes (a fixed tree per
bucket, preallocated cache, state in fixed buffers), so it is captured once and replayed; rows join and
leave by changing what the buffers hold, never the graph. A prefill is launch-bound the same way (at any
prompt length), so prompts padded to a few widths (``decoding.PREFILL_WIDTHS``) replay captured prefills too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from medusa.acceptance import StepKind
from medusa.decoding import Decoder

logger = logging.getLogger("medusa")

WARMUP_STEPS = 2  # eager runs on a side stream before a capture (cuBLAS handles, lazy allocations, compiling)
StepKey = tuple[int, int, StepKind, bool]  # (rows, span, kind, plain) of a step
PrefillKey = tuple[int, int, StepKind]  # (prompts, width, kind) of a prefill


@dataclass
class CaptureReport:
    graphs: int = 0
    seconds: float = 0.0  # spent capturing (warm-up runs included)
    memory_bytes: int = 0  # what the captures left allocated (the graphs' private pool: their intermediates)


class StepGraphs:
    """``decoder.step`` captured as CUDA graphs, one per (rows, span, kind, plain), and ``decoder.prefill_step``, one
    per (prompts, width, kind), all sharing one memory pool (they never run at once). Calling it replays a step's
    graph, ``prefill`` a prefill's, capturing it first if needed.

    A capture must not disturb the rows already running: a step's warm-up runs happen with every row marked
    idle (they commit nothing), and the small row state they overwrite is restored before the capture. A
    prefill's warm-ups write only the rows its prompts are loaded for, which are free, and write the same
    there each time.
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
        self.graphs: dict[StepKey, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self.prefills: dict[PrefillKey, torch.cuda.CUDAGraph] = {}
        self.report = CaptureReport()

    def prepare(self, rows: int, span: int, kind: StepKind, plain: bool = False) -> None:
        """Capture the key's graph now if it is not captured yet (the engine does this before timed steps)."""
        key = (rows, span, kind, plain)
        if key not in self.graphs:
            self.graphs[key] = self._capture_step(*key)

    def __call__(self, rows: int, span: int, kind: StepKind, plain: bool = False) -> tuple[torch.Tensor, ...]:
        self.prepare(rows, span, kind, plain)
        graph, outputs = self.graphs[(rows, span, kind, plain)]
        graph.replay()
        return outputs

    def prepare_prefill(self, prompts: int, width: int, kind: StepKind) -> None:
        """Capture the prefill of ``prompts`` loaded prompts at ``width`` now, if it is not captured yet; it runs the
        prompts loaded in the decoder's prefill buffers (idle rows, when capturing ahead of any request)."""
        key = (prompts, width, kind)
        if key not in self.prefills:
            self.decoder.prefill_cache(prompts, width)  # the kept prefill cache, made before (outside) the capture
            function = self.decoder.prefill_step
            self.prefills[key] = self._capture(lambda: function(prompts, width, kind), lambda: None)[0]

    def prefill(self, prompts: int, width: int, kind: StepKind) -> None:
        """Replay the prefill of the first ``prompts`` prompts loaded (``Decoder.load_prompts``) at ``width``."""
        self.prepare_prefill(prompts, width, kind)
        self.prefills[(prompts, width, kind)].replay()

    def _capture_step(self, rows: int, span: int, kind: StepKind, plain: bool) -> tuple[torch.cuda.CUDAGraph, tuple]:
        decoder = self.decoder
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

        def restore() -> None:
            for tensor, copy in zip(state, saved):
                tensor.copy_(copy)

        return self._capture(lambda: self.step_function(rows, span, kind, plain), restore)

    def _capture(self, run: Callable[[], object], after_warmup: Callable[[], None]) -> tuple[torch.cuda.CUDAGraph, Any]:
        """Warm ``run`` up on a side stream, call ``after_warmup``, then capture it into the shared pool."""
        decoder = self.decoder
        started = time.perf_counter()
        allocated = torch.cuda.memory_allocated(decoder.device)
        side = torch.cuda.Stream(decoder.device)
        side.wait_stream(torch.cuda.current_stream(decoder.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARMUP_STEPS):
                run()
        torch.cuda.current_stream(decoder.device).wait_stream(side)
        with torch.inference_mode():
            after_warmup()
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            outputs = run()
        torch.cuda.synchronize(decoder.device)
        self.report.graphs += 1
        self.report.seconds += time.perf_counter() - started
        self.report.memory_bytes += torch.cuda.memory_allocated(decoder.device) - allocated
        return graph, outputs
