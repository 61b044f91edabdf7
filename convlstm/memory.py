"""Peak tensor memory of a piece of work, on any device, from the tensors themselves.

CUDA's caching allocator counts its own peak (torch.cuda.max_memory_allocated); PyTorch keeps
no such count for the CPU. LiveTensors does it from above: inside it, every tensor an operator
returns (forward and backward alike) is noted by its storage, once, with a finaliser that
takes its bytes off when the storage is freed; the peak is the most bytes live at once. Views
share their base's storage and count once. Tensors that exist before (parameters, optimizer
state, a batch) count once registered with keep().

oneDNN's opaque tensors (the packed weights of convlstm.packed) have no storage: each counts
by its elements, from when an operator returns it until the tensor is freed (a lower bound:
oneDNN's blocked layouts may pad the channels).

What it cannot see: memory that is no tensor (oneDNN's scratch space, the C kernels' tile
buffers in convlstm/tiles.c), other tensors without a strided storage (sparse, nested), and
work replayed by a CUDA graph, which dispatches nothing. A tensor made before and not kept
counts in full when a view of it first comes out of an operator. torch.compile does not
compile frames run inside the mode, so compiled code runs eagerly there.

    with LiveTensors() as live:
        live.keep(model.parameters(), batch)
        step(batch)
    live.peak_bytes
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensors(TorchDispatchMode):
    """Bytes of tensor storage live inside the mode, now (live_bytes) and at most (peak_bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[Any, int] = {}  # storage (or mkldnn tensor) -> bytes, while it lives
        self._finalisers: dict[Any, weakref.finalize] = {}

    def keep(self, *tensors: Any) -> None:
        """Count tensors made before (nested lists, dicts and iterables of them, such as
        model.parameters() or an optimizer's state): live until they are freed."""
        leaves = []
        for item in tensors:
            if isinstance(item, torch.Tensor | dict | list | tuple):
                leaves.extend(tree_flatten(item)[0])
            elif isinstance(item, Iterable):
                leaves.extend(tree_flatten(list(item))[0])
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                self._note(leaf)

    def _note(self, tensor: torch.Tensor) -> None:
        if tensor.is_meta:
            return
        if tensor.is_mkldnn:  # opaque, no storage: the tensor itself, by its elements
            owner: Any = tensor
            key, size = ("mkldnn", id(tensor)), tensor.numel() * tensor.element_size()
        elif tensor.layout != torch.strided:
            return  # no storage of its own to count (sparse, nested: not counted)
        else:
            try:
                owner = tensor.untyped_storage()
            except (NotImplementedError, RuntimeError):  # a wrapper subclass without one
                return
            key, size = owner._cdata, owner.nbytes()
        if key in self._sizes:  # seen before: only a resize_ (or out=) can have grown it
            self.live_bytes += size - self._sizes[key]
            self._sizes[key] = size
        else:
            self._sizes[key] = size
            self._finalisers[key] = weakref.finalize(owner, self._freed, key)
            self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _freed(self, key: Any) -> None:
        self._finalisers.pop(key, None)
        self.live_bytes -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self._note(leaf)
        return out

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for finaliser in self._finalisers.values():  # the counts stay; the hooks go
            finaliser.detach()
        self._finalisers.clear()
        self._sizes.clear()
