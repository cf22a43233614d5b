"""Stream the frozen transformer blocks from host memory: the smallest hook that is correct for LoRA training.

`stream_blocks(model, resident_blocks)` keeps the frozen tensors (base weights, biases, norm scales, fp8 scales) of
all but the last `resident_blocks` transformer blocks in (pinned) host memory. Each streamed block's frozen tensors
are copied to the GPU just before the block runs, on a side CUDA stream one block ahead (block i+1 is copied while
block i computes), and dropped right after. The LoRA weights (`requires_grad`) never move: their gradients and
optimizer state stay on the GPU. With activation checkpointing of every block (required, see below) the backward
pass recomputes each block, and the hook copies it in again for that, prefetching in backward order (i-1 while i
recomputes). Per step each streamed block crosses the bus twice; `BlockStreamer.bytes_moved` counts it.

Why not diffusers' group offloading (`apply_group_offloading(..., offload_type="block_level", use_stream=True)`,
diffusers/hooks/group_offloading.py), which does the same for inference:
- It moves every parameter of a group, trainable ones included: on offload it sets `param.data` back to the pinned
  copy taken when the hook was applied. The LoRA weights would then sit on the CPU when the optimizer steps (a
  device mismatch with their GPU gradients), and every update would be overwritten by the stale initial copy at
  the next offload.
- Its prefetch order is the first forward's execution order. In training the backward recomputes the blocks in
  the reverse order, so each recompute would wait for a synchronous copy while the prefetched block is the wrong one.
Both need the hook to know about gradients and about backward, which is what this module adds, in ~150 lines.

Why every streamed block must be checkpointed: without checkpointing, autograd saves each Linear's weight for the
backward pass *by reference* (a parameter is a leaf; its saved variable is the parameter itself), so dropping the
device copy after the forward would make the backward read the host copy. Under non-reentrant checkpointing the
forward saves nothing inside the block, and the recompute saves `detach()`ed aliases of the weights
(torch/utils/checkpoint.py, pack_hook of the recompute), which keep the device copy alive exactly until the block's
backward has used it, however the `.data` of the parameter changes afterwards.

On a CPU (tests) the "device" copy is a real copy into fresh CPU memory and the same bookkeeping runs, so the hook
logic (load before use, drop after, the byte count) is exercised without a GPU; there is no side stream.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn


def _in_backward() -> bool:
    """True while the autograd engine runs (a checkpointed block being recomputed for its backward)."""
    return torch._C._current_graph_task_id() != -1


class _StreamedBlock:
    """The frozen tensors of one block: their host copies, and the device copies while the block is loaded."""

    def __init__(self, index: int, block: nn.Module, pin: bool):
        self.index = index
        # (owner module, table name "_parameters" / "_buffers", key, host tensor)
        self.entries: list[tuple[nn.Module, str, str, torch.Tensor]] = []
        for module in block.modules():
            for table_name in ("_parameters", "_buffers"):
                for key, tensor in getattr(module, table_name).items():
                    if tensor is None or tensor.requires_grad:
                        continue  # LoRA weights stay where they are (the GPU)
                    host = tensor.detach().cpu()
                    host = host.pin_memory() if pin else host
                    self._set(module, table_name, key, host)
                    self.entries.append((module, table_name, key, host))
        self.nbytes = sum(host.numel() * host.element_size() for *_, host in self.entries)
        self.loaded = False
        self.ready: torch.cuda.Event | None = None

    @staticmethod
    def _set(module: nn.Module, table_name: str, key: str, value: torch.Tensor) -> None:
        current = getattr(module, table_name)[key]
        if isinstance(current, nn.Parameter):
            current.data = value  # keep the Parameter object: PEFT and the optimizer hold references to it
        else:
            getattr(module, table_name)[key] = value

    def owners(self) -> set[nn.Module]:
        return {module for module, *_ in self.entries}


class BlockStreamer:
    """The frozen tensors of `model.transformer_blocks[:len - resident_blocks]` live in host memory; hooks copy a
    block in before it runs (forward and checkpoint recompute) and drop it after.

    `bytes_moved`: host->device bytes copied so far (reset it per step to read a step's traffic).
    `streamed_bytes`: the frozen bytes kept in host memory. `device`: where blocks are copied to; follows the
    model's `.to()` / `.cuda()` (which leave the streamed tensors in host memory).
    """

    def __init__(self, model: nn.Module, resident_blocks: int = 0):
        blocks = model.transformer_blocks
        if not 0 <= resident_blocks <= len(blocks):
            raise ValueError(f"resident_blocks must be in [0, {len(blocks)}], got {resident_blocks}")
        first = next((p for p in model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        pin = torch.cuda.is_available()
        self.blocks = [_StreamedBlock(index, blocks[index], pin) for index in range(len(blocks) - resident_blocks)]
        self.num_blocks = len(blocks)
        self.streamed_bytes = sum(block.nbytes for block in self.blocks)
        self.bytes_moved = 0
        self._stream: torch.cuda.Stream | None = None
        owners = set().union(*(block.owners() for block in self.blocks)) if self.blocks else set()
        streamed = {
            (id(module), table_name, key) for block in self.blocks for module, table_name, key, _ in block.entries
        }
        for owner in owners:
            owner._apply = functools.partial(self._owner_apply, owner, streamed)
        for index, block in enumerate(blocks):
            block.forward = functools.partial(self._run, index, block.forward)

    # -- moves of the model ----------------------------------------------------------------------------------------
    def _owner_apply(
        self, owner: nn.Module, streamed: set[tuple[int, str, str]], fn, recurse: bool = True
    ) -> nn.Module:
        """`Module._apply` for modules that own streamed tensors: the target device is recorded, the streamed
        tensors stay in host memory (a 40 GB base must not be copied to the GPU by Lightning's `model.to(device)`),
        everything else is converted as usual. Dtype casts of streamed tensors are ignored, as for fp8 storage."""
        if recurse:
            for child in owner.children():
                child._apply(fn)
        probe = fn(torch.zeros((), device=torch.device("cpu")))
        if isinstance(probe, torch.Tensor):
            self.device = probe.device
        for table_name in ("_parameters", "_buffers"):
            table = getattr(owner, table_name)
            for key, tensor in table.items():
                if tensor is None or (id(owner), table_name, key) in streamed:
                    continue
                if isinstance(tensor, nn.Parameter):
                    tensor.data = fn(tensor.data)
                else:
                    table[key] = fn(tensor)
        return owner

    # -- loading ---------------------------------------------------------------------------------------------------
    def _side_stream(self) -> torch.cuda.Stream | None:
        if self.device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    def _load(self, position: int) -> None:
        """Start copying block `position` (in `self.blocks`) to the device; on CUDA asynchronously on the side stream."""
        streamed = self.blocks[position]
        if streamed.loaded:
            return
        stream = self._side_stream()
        if stream is not None:
            # The copy must not start before the compute stream is done with whatever the allocator hands out.
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for module, table_name, key, host in streamed.entries:
                copy = torch.empty_like(host, device=self.device)
                copy.copy_(host, non_blocking=stream is not None)
                _StreamedBlock._set(module, table_name, key, copy)
            if stream is not None:
                streamed.ready = torch.cuda.Event()
                streamed.ready.record(stream)
        streamed.loaded = True
        self.bytes_moved += streamed.nbytes

    def _wait(self, position: int) -> None:
        streamed = self.blocks[position]
        if streamed.ready is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(streamed.ready)
        for _, _, _, tensor in self._device_tensors(streamed):
            # Allocated on the side stream, used on the compute stream: free only after the compute stream used it.
            tensor.record_stream(compute)
        streamed.ready = None

    @staticmethod
    def _device_tensors(streamed: _StreamedBlock) -> Iterator[tuple[nn.Module, str, str, torch.Tensor]]:
        for module, table_name, key, _ in streamed.entries:
            yield module, table_name, key, getattr(module, table_name)[key]

    def _drop(self, position: int) -> None:
        streamed = self.blocks[position]
        for module, table_name, key, host in streamed.entries:
            _StreamedBlock._set(module, table_name, key, host)
        streamed.loaded = False
        streamed.ready = None

    def _run(self, index: int, forward, *args, **kwargs):
        """Every block's forward: load it if streamed, prefetch the next streamed block in the direction of travel
        (forward: higher index; checkpoint recompute in backward: lower), run, drop."""
        ahead = range(index - 1, -1, -1) if _in_backward() else range(index + 1, self.num_blocks)
        following = next((i for i in ahead if i < len(self.blocks)), None)
        streamed = index < len(self.blocks)
        if streamed:
            self._load(index)
            self._wait(index)
        if following is not None:
            self._load(following)
        try:
            return forward(*args, **kwargs)
        finally:
            if streamed:
                self._drop(index)


def stream_blocks(model: nn.Module, resident_blocks: int = 0) -> BlockStreamer:
    """Keep all transformer blocks but the last `resident_blocks` in host memory and stream them in per use.

    Needs activation checkpointing of every block (module docstring). The streamer is kept on the model as
    `model._fusedit_streamer` (the bench reads its byte count there)."""
    streamer = BlockStreamer(model, resident_blocks)
    model._fusedit_streamer = streamer
    return streamer


def block_streamer(model: nn.Module) -> BlockStreamer | None:
    """The streamer `stream_blocks` attached to `model` (or to a module wrapping it), if any."""
    for module in model.modules():
        streamer = getattr(module, "_fusedit_streamer", None)
        if streamer is not None:
            return streamer
    return None
