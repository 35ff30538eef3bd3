"""CUDA graphs for the decoding loop. NOT YET RUN ON A GPU: this machine has no CUDA device, so
the capture path below has never executed. The bookkeeping (static buffers, address checks,
output aliasing) is the same code on every device and is tested on the CPU, where a "replay" runs
the function on the static buffers instead of launching a captured graph.

A captured graph replays fixed kernels on fixed addresses, so:
* Pinned inputs, the KV caches, are read in place: at a given context bucket each layer's cache is
  a view at a fixed address of the runtime's preallocated buffers (``KVCache``), so a graph is
  captured per step name (which names the bucket) and replays on the very tensors it was captured
  with. Replaying on any other tensor would read stale memory; it is refused.
* Every other input (tokens, positions, lengths, uniforms) is copied into a static buffer.
* Outputs are static buffers that the next replay overwrites: consume them first.

The runtime captures the draft step and the verify step of each bucket (``GraphedSteps``) and, for
the draft, the whole gamma-step round (drafting, cache writes and token selection have no host
values), so a round costs one replay for the drafts, one for the verify, and one host read of the
accept/reject outcome.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def _flatten(inputs) -> list[torch.Tensor]:
    return [t for x in inputs for t in (x if isinstance(x, (list, tuple)) else [x])]


class StaticInputs:
    """The fixed input buffers of a captured call. ``pinned(i, t)`` says which flat inputs are
    read in place (their address is part of the graph)."""

    def __init__(self, inputs: Sequence, pinned: Callable[[int, torch.Tensor], bool]):
        flat = _flatten(inputs)
        self.pinned = [pinned(i, t) for i, t in enumerate(flat)]
        self.buffers = [t if p else t.clone() for t, p in zip(flat, self.pinned)]
        self.structure = [len(x) if isinstance(x, (list, tuple)) else None for x in inputs]

    def load(self, inputs: Sequence) -> list:
        """Copy the values of ``inputs`` into the static buffers (checking pinned addresses) and
        return the buffers structured like ``inputs``."""
        flat = _flatten(inputs)
        if len(flat) != len(self.buffers):
            raise ValueError(f"the graph takes {len(self.buffers)} tensors, got {len(flat)}")
        for i, (t, buf, pinned) in enumerate(zip(flat, self.buffers, self.pinned)):
            if t.shape != buf.shape or t.dtype != buf.dtype or t.device != buf.device:
                raise ValueError(
                    f"input {i} is {t.dtype} {list(t.shape)} on {t.device}; the graph was captured with "
                    f"{buf.dtype} {list(buf.shape)} on {buf.device}"
                )
            if pinned:
                if t.data_ptr() != buf.data_ptr():
                    raise ValueError(f"input {i} must be the tensor the graph was captured on (it is read in place)")
            else:
                buf.copy_(t, non_blocking=True)
        out, it = [], iter(self.buffers)
        for n in self.structure:
            out.append(next(it) if n is None else [next(it) for _ in range(n)])
        return out


class GraphedCall:
    """``fn(*inputs)`` captured once, then replayed on static buffers. On CUDA the replay launches
    the captured CUDA graph; elsewhere it runs ``fn`` on the static buffers (same bookkeeping)."""

    @torch.inference_mode()
    def __init__(self, fn: Callable, inputs: Sequence, pinned: Callable[[int, torch.Tensor], bool], warmup: int = 2):
        self.fn = fn
        self.inputs = StaticInputs(inputs, pinned)
        static = self.inputs.load(inputs)
        self.graph = None
        if self.inputs.buffers[0].is_cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):  # lazy initialisation (allocator, kernels) must not be captured
                    fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = fn(*static)
            self.graph.replay()  # capture records without running: this call's outputs come from here
        else:
            self.outputs = fn(*static)

    @torch.inference_mode()
    def __call__(self, *inputs):
        static = self.inputs.load(inputs)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.outputs = fn_outputs_into(self.outputs, self.fn(*static))
        return self.outputs


def fn_outputs_into(static, fresh):
    """Write ``fresh`` outputs into the ``static`` ones, as a graph replay does (same tensors,
    new values), so callers see the same aliasing on every device."""
    for s, f in zip(_flatten(static), _flatten(fresh)):
        s.copy_(f)
    return static


def replay(graphs: dict, key, fn: Callable, inputs: Sequence, pinned: Callable[[int, torch.Tensor], bool]):
    """Run ``fn(*inputs)`` through the graph stored under ``key``, capturing it (with these
    inputs, whose outputs the capture produces) the first time."""
    graph = graphs.get(key)
    if graph is None:
        graph = graphs[key] = GraphedCall(fn, inputs, pinned)
        return graph.outputs
    return graph(*inputs)


class GraphedSteps:
    """An engine's steps with the draft and verify steps captured, one graph per step name, on the
    cache tensors of the first call. Prefill chunks run uncaptured: they are compute-bound and
    their cache views move with the row."""

    def __init__(self, steps):
        self.steps, self.model, self.device, self.graphs = steps, steps.model, steps.device, {}

    def __call__(self, name: str, *inputs):
        if name.startswith(("prefill", "observe")):
            return self.steps(name, *inputs)
        caches = range(2, 2 + 2 * len(inputs[2]))  # flat indices of the per-layer caches: read in place
        return replay(self.graphs, name, lambda *x: self.steps(name, *x), inputs, lambda i, _: i in caches)
