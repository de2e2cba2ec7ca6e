"""The most any implementation that returns the reference's tokens can gain over it, measured on the reference.

Identical tokens need identical floating-point results down to the last bit (the Gumbel argmax flips on it), and
in practice that means running the reference's own kernels for the heavy arithmetic: the matrix products (GEMMs),
the attention kernel, the VQ-VAE's convolutions, and the random draws of the Gumbel sampling (the same stream).
Another implementation can only save the rest: elementwise passes, copies, sorts, allocations and fresh pages,
Python. One exception is known: the cross-attention keys and values of the text do not change between steps, so
they are counted once per call instead of once per step (vqbatch computes them once).

So with `forced` the time of the reference's call spent in those kernels, any same-kernel implementation is at most
`call time / forced` faster (`Ceiling.call`). Both times come from one profiled call (torch.profiler, CPU only), so
other load on the machine stretches both alike. The kernels themselves can still run faster in another
implementation (a product writing into memory that is already mapped instead of fresh pages), so the ceiling is a
measured bound on the rest, not a law.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

FORCED_KERNELS = frozenset({
    "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm",  # GEMMs (nn.Linear and matmul end in these)
    "aten::_scaled_dot_product_flash_attention_for_cpu",  # scaled_dot_product_attention's CPU kernel
    "aten::mkldnn_convolution", "aten::_slow_conv2d_forward",  # the VQ-VAE's convolutions
    "aten::uniform_",  # the Gumbel noise's random numbers
})
FORWARD = "ceiling: transformer forward"
TEXT_PROJECTION = "ceiling: text keys and values"


@dataclass(frozen=True)
class Ceiling:
    """Times (seconds) of one profiled reference call and of the transformer forwards in it."""

    call_s: float  # the whole call (wall clock)
    forced_s: float  # the forced kernels' own time in the call, the text projections counted for one forward only
    forward_s: float  # one transformer forward, the mean over the call's forwards
    forward_forced_s: float  # the forced kernels' own time in one forward (mean), the text projections left out
    forwards: int  # transformer forwards in the call

    @property
    def call(self) -> float:
        """The largest speedup of a whole call that runs the same forced kernels."""
        return self.call_s / self.forced_s

    @property
    def forward(self) -> float:
        """The same for one guided transformer forward whose text keys and values were computed before."""
        return self.forward_s / self.forward_forced_s


@contextmanager
def labelled(module: nn.Module, label: str) -> Iterator[None]:
    """Every call of `module` shows in the profile as a range named `label`."""
    open_ranges = []

    def enter(module, args):
        open_ranges.append(record_function(label).__enter__())

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def labels_above(event) -> set[str]:
    """The names of every range that encloses a profiled event."""
    labels, parent = set(), event.cpu_parent
    while parent is not None:
        labels.add(parent.name)
        parent = parent.cpu_parent
    return labels


def reference_ceiling(reference, call: Callable[[], object]) -> Ceiling:
    """Profile `call`, one sampling call of the diffusers pipeline `reference`, on the CPU (see the module doc)."""
    transformer = reference.transformer
    with ExitStack() as labels:
        labels.enter_context(labelled(transformer, FORWARD))
        for block in transformer.transformer_blocks:
            labels.enter_context(labelled(block.attn2.to_k, TEXT_PROJECTION))
            labels.enter_context(labelled(block.attn2.to_v, TEXT_PROJECTION))
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            started = time.perf_counter()
            call()
            call_s = time.perf_counter() - started
    return summarise(profiler.events(), call_s)


def summarise(events, call_s: float) -> Ceiling:
    """Add up the forward ranges and the forced kernels' own time (microseconds) by where they ran."""
    forward_us, forwards = 0.0, 0
    forced_us = {FORWARD: 0.0, TEXT_PROJECTION: 0.0, None: 0.0}  # inside a forward, a text projection, neither
    for event in events:
        if event.name == FORWARD:
            forward_us += event.time_range.elapsed_us()
            forwards += 1
        elif event.name in FORCED_KERNELS:
            labels = labels_above(event)
            where = TEXT_PROJECTION if TEXT_PROJECTION in labels else FORWARD if FORWARD in labels else None
            forced_us[where] += event.self_cpu_time_total
    if forwards == 0:
        raise ValueError("the profiled call never ran the reference transformer")
    call_forced_us = forced_us[FORWARD] + forced_us[None] + forced_us[TEXT_PROJECTION] / forwards
    return Ceiling(call_s=call_s, forced_s=call_forced_us / 1e6, forward_s=forward_us / forwards / 1e6,
                   forward_forced_s=forced_us[FORWARD] / forwards / 1e6, forwards=forwards)
