"""CUDA graphs for the decoding step, and a pool that keeps captured decoders for reuse.

A Medusa step is dozens of small kernels per layer; launched one by one from Python the GPU idles
between them and a 135M or even 7B model runs CPU-bound. The step has static shapes (fixed tree,
preallocated cache, state in fixed buffers), so it is captured once per (cache length, tree, attention
span) and replayed. Prefill stays eager: it runs once per generation.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from medusa.decoding import WARMUP_STEPS, MedusaDecoder

logger = logging.getLogger("medusa")

CACHE_BUCKET = 256  # cache lengths are rounded up to this, so one capture serves many prompts


class GraphedStep:
    """``decoder.step`` captured as CUDA graphs, one per attention span; calling it replays the span's graph
    on the decoder's buffers.

    The decoder must be prefilled (its cache allocated). Capturing rewinds and advances its state, so
    prefill again before decoding for real. The graphs share one memory pool: they never run at once.
    """

    def __init__(self, decoder: MedusaDecoder, compile_step: bool | str = False) -> None:
        # Inside a graph every kernel still costs a few microseconds; compiling first fuses the many
        # small elementwise kernels (norms, rotary embeddings, masks) that dominate a small batch.
        # "max-autotune" also lets inductor time its own matrix-vector kernels against cuBLAS.
        step = decoder.step
        if compile_step:
            options = {"coordinate_descent_tuning": True, "max_autotune": compile_step == "max-autotune"}
            step = torch.compile(decoder.step, dynamic=False, options=options)
        self.step_function = step  # what the graphs captured (compiled or not), for profiling it uncaptured
        self.decoder = decoder
        pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        for span in decoder.spans:
            self._capture(step, span, pool)

    def _capture(self, step: Callable[[int], torch.Tensor], span: int, pool: tuple) -> None:
        decoder = self.decoder
        side = torch.cuda.Stream(decoder.device)
        side.wait_stream(torch.cuda.current_stream(decoder.device))
        with torch.cuda.stream(side), torch.inference_mode():
            # From slot 0, so that the warm-up steps' trees stay inside the span (decoder.spans allows for them).
            decoder.length.zero_()
            decoder.cache.set_length(decoder.length)
            for _ in range(WARMUP_STEPS):
                step(span)
        torch.cuda.current_stream(decoder.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Sampling draws from the decoder's own seeded generator, not the device's default one; a graph may
        # only use a generator registered with it, whose offset then advances on every replay.
        graph.register_generator_state(decoder.generator)
        with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
            self.outputs[span] = step(span)
        self.graphs[span] = graph

    def __call__(self, span: int | None = None) -> torch.Tensor:
        span = span or self.decoder.max_length
        self.graphs[span].replay()
        return self.outputs[span]


class DecoderPool:
    """Reusable decoders (and their captured steps) per configuration, least recently used dropped first.

    Held by one model instance; each entry owns a whole KV cache, hence the small capacity.
    """

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[Hashable, tuple[MedusaDecoder, GraphedStep | None]] = OrderedDict()
        self.refused: set[Hashable] = set()

    def acquire(
        self,
        key: Hashable,
        build: Callable[[int], MedusaDecoder],
        needed_length: int,
        prompt_ids: torch.Tensor,
        use_graphs: bool,
        compile_step: bool | str = False,
    ) -> tuple[MedusaDecoder, GraphedStep | None]:
        """A decoder with at least ``needed_length`` slots, and its graphed step when capture is on and works."""
        bucket = -(-needed_length // CACHE_BUCKET) * CACHE_BUCKET
        full_key = (key, bucket, use_graphs, compile_step)
        if full_key in self.entries:
            self.entries.move_to_end(full_key)
            return self.entries[full_key]
        decoder = build(bucket + 64)  # room for a capture's warm-up steps, which run from slot 0
        step = None
        if use_graphs and decoder.device.type == "cuda" and key not in self.refused:
            step = self._capture(decoder, prompt_ids, key, compile_step)
        self.entries[full_key] = (decoder, step)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return decoder, step

    def _capture(
        self, decoder: MedusaDecoder, prompt_ids: torch.Tensor, key: Hashable, compile_step: bool | str
    ) -> GraphedStep | None:
        try:
            with torch.inference_mode():
                decoder.prefill(prompt_ids)
            return GraphedStep(decoder, compile_step)
        except Exception as error:  # a model whose forward cannot be captured still decodes eagerly
            self.refused.add(key)
            logger.warning("CUDA graph capture failed for %s, decoding eagerly instead: %s", key, error)
            return None
