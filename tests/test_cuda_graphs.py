"""CUDA-graph bookkeeping, tested on the CPU: static buffers, pinned cache addresses, output
aliasing, and the runtime driven through it. The capture itself needs a GPU and has not run."""

from __future__ import annotations

import pytest
import torch

from magicdec_rt import Runtime
from magicdec_rt.cuda_graphs import GraphedCall, StaticInputs


def test_static_inputs_copy_values_into_fixed_buffers():
    cache = [torch.zeros(2, 3), torch.zeros(2, 3)]
    s = StaticInputs((torch.tensor([1, 2]), cache), pinned=lambda i, t: i >= 1)
    first = s.buffers[0].data_ptr()
    out = s.load((torch.tensor([5, 6]), cache))
    assert out[0].tolist() == [5, 6] and out[0].data_ptr() == first and out[1][0] is cache[0]
    with pytest.raises(ValueError, match=r"input 0 is torch.int64 \[3\] on cpu; the graph was captured with torch.int64 \[2\]"):
        s.load((torch.tensor([1, 2, 3]), cache))
    with pytest.raises(ValueError, match="input 2 must be the tensor the graph was captured on"):
        s.load((torch.tensor([1, 2]), [cache[0], torch.zeros(2, 3)]))
    with pytest.raises(ValueError, match="the graph takes 3 tensors, got 2"):
        s.load((torch.tensor([1, 2]), cache[:1]))


def test_graphed_call_replays_on_static_buffers_and_aliases_outputs():
    weight = torch.arange(6.0).view(2, 3)
    g = GraphedCall(lambda x, w: (x * 2, x.sum() + w.sum()), (torch.ones(3), weight), pinned=lambda i, t: i == 1)
    a = g(torch.tensor([1.0, 2.0, 3.0]), weight)
    assert a[0].tolist() == [2.0, 4.0, 6.0] and a[1].item() == 21.0
    weight += 1  # pinned inputs are read in place: their new values are seen
    b = g(torch.tensor([0.0, 0.0, 1.0]), weight)
    assert b[0] is a[0] and a[0].tolist() == [0.0, 0.0, 2.0] and b[1].item() == 22.0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_runtime_through_graph_bookkeeping_matches_plain_runtime(tiny_engine, tiny_runtime, temperature):
    """Greedy and seeded sampling, 12 prompts over 8 rows (refills, bucket changes): the runtime
    driving its draft rounds and verify steps through the graph bookkeeping gives the same tokens."""
    graphed = Runtime.load(tiny_engine, cuda_graphs=True)
    prompts = [[(5 * i + j) % 16 for j in range(n)] for i, n in enumerate([3, 30, 70, 12, 5, 17, 40, 8, 2, 33, 9, 21])]
    kw = dict(max_new_tokens=24, gamma=3, temperature=temperature, seed=7)
    want = [r.token_ids for r in tiny_runtime.generate(prompts, **kw)]
    assert [r.token_ids for r in graphed.generate(prompts, **kw)] == want
    assert graphed.steps.graphs and any(n.startswith("verify3@") for n in graphed.steps.graphs)
    assert len(graphed.core._draft_graphs) == 1
