"""Peak memory of a LoRA training step, predicted on a machine that does not have that memory.

The variant is built and two training steps run (the second one has the optimizer state) on *fake* tensors
(`torch._subclasses.FakeTensorMode`: shapes, dtypes and strides propagate, nothing is allocated or computed), with a
dispatch mode underneath that adds up the bytes of every storage the step creates and subtracts them when the
storage dies. The peak of that running sum, plus what was resident before the step (weights, inputs), is the step's
peak of live tensor memory: what `torch.cuda.max_memory_allocated` reports for the same step, short of allocator
rounding (512-byte blocks) and the GEMM/attention workspaces (tens of MB). Fragmentation, the CUDA context and
cuBLAS workspaces are not tensors and are not in either number.

So `fusedit bench --size full --estimate-memory` says on a CPU whether the 20B step fits an 80 GB card under each
checkpointing / fp8 plan, and on a GPU the same report sets the prediction beside the measurement.

Fake tensors live on the CPU: there, scaled_dot_product_attention takes the flash kernel, which saves the output and
the log-sum-exp like CUDA's flash / cuDNN / memory-efficient kernels do (fake CUDA tensors would take the math path,
which materialises the S x S attention matrix a GPU never holds). What this cannot represent:
- `compile`: inductor's graphs are not traced here; the variant is estimated eagerly (compiled blocks save the same
  or fewer activations, so the eager figure is an upper bound).
- `offload`: checkpoints offloaded to host memory live on the same fake device; not estimated.
- `float8` GEMMs: the weights are the same float8 bytes as fp8 storage; estimated as fp8 storage.

Qwen-Image-2.1's forward derives its token layout from the values of its image-slot mask (`repeat_interleave` by
it, boolean indexing, `.tolist()` for RoPE positions and the attention segments), which fake tensors, having no
values, cannot run. `RealMetadata` runs those for real: every op whose tensor arguments are all real (the slot mask
the step passes, and what is computed from it) runs on real tensors, and a real boolean index into a fake tensor is
turned into its real positions first. The heavy tensors (weights, activations) stay fake; the real ones are counted
like the others (what the GPU would hold of them: masks, the S x 64 RoPE table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, is_fake
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from fusedit.bench.shapes import QWEN21, BenchShape, make_inputs
from fusedit.bench.variants import Variant, build_variant, make_step
from fusedit.lora.adapter import lora_parameters
from fusedit.step.conditioning import trim_prompt_padding
from fusedit.step.objective import FlowMatchObjective

METHOD = "fake-tensor live bytes"


class LiveStorageBytes(TorchDispatchMode):
    """Bytes held by the storages created under this mode and still alive; `peak` is the running maximum.

    Storages that existed before (weights, inputs) are registered with `known` and never counted, also not when an
    op returns a view of them.
    """

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self.live = 0
        self.peak = 0
        # Holding the storage objects keeps their ids from being reused while the mode is active.
        self._known = [tensor.untyped_storage() for tensor in known]
        self._bytes: dict[int, int] = {id(storage): 0 for storage in self._known}

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._bytes:
            return
        size = storage.nbytes()
        self._bytes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._bytes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


# Ops that take a list of index tensors (a boolean one selects by its values: data-dependent for a fake tensor).
_INDEX_OPS = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}


def _positions(indices: list) -> list:
    """An index list with each real boolean mask replaced by the integer positions it selects (one per dim)."""
    out = []
    for index in indices:
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool and not is_fake(index):
            with _disable_current_modes():
                out.extend(index.nonzero().unbind(1))
        else:
            out.append(index)
    return out


def _constant(value):
    """A fake tensor that carries its value (a Python scalar wrapped by an op, e.g. `torch.where(mask, 4, 1)`) as
    that real value; anything else as it is."""
    if isinstance(value, FakeTensor) and value.constant is not None:
        return value.constant
    return value


class RealMetadata(TorchDispatchMode):
    """Under a FakeTensorMode: an op whose tensor arguments are all real (or scalars) runs for real (no mode below
    sees it), as does an integer or boolean factory (`torch.ones(..., dtype=torch.bool)`, `torch.arange`); a real
    boolean index into a fake tensor becomes integer positions; everything else goes on to the fake mode."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        fakes = [tensor for tensor in tensors if is_fake(tensor)]
        if len(fakes) < len(tensors) and all(_constant(tensor) is not tensor for tensor in fakes):
            args, kwargs = tree_map(_constant, (args, kwargs))
            with _disable_current_modes():
                return func(*args, **kwargs)
        if func in _INDEX_OPS:
            args = (args[0], _positions(args[1]), *args[2:])
        out = func(*args, **kwargs)
        if not tensors and isinstance(out, torch.Tensor) and not (out.is_floating_point() or out.is_complex()):
            with _disable_current_modes():
                return func(*args, **kwargs)
        return out


def _estimable(variant: Variant) -> tuple[Variant, list[str]]:
    """The eager variant whose memory stands for `variant`, and what was changed to get it."""
    notes = []
    changes = {}
    if variant.offload:
        raise ValueError(f"{variant.name}: checkpoints offloaded to host memory are not estimated")
    if variant.compile:
        changes["compile"] = False
        notes.append("estimated eagerly (compiled blocks save the same or fewer activations)")
    if variant.fp8 == "float8":
        changes["fp8"] = "storage"
        notes.append("float8 GEMMs estimated as fp8 storage (same float8 weight bytes)")
    return (dataclasses.replace(variant, **changes) if changes else variant), notes


def _fake_on_cpu(model: nn.Module, fake_mode: FakeTensorMode) -> list[torch.Tensor]:
    """Turn `model`'s parameters, buffers and plain tensor attributes (RoPE tables) into fake CPU tensors, in place;
    returns the attributes (state a GPU holds too, which `parameters()` and `buffers()` do not list).

    The model is built on the meta device (PEFT, fp8 quantization and `.to()` all work there) and converted
    afterwards: built under FakeTensorMode, every `.to()` fails (it swaps parameters, and fake tensors carry weakrefs).
    """
    cpu = torch.device("cpu")
    attributes = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, value in table.items():
                if value is None or not value.is_meta:
                    continue
                fake = FakeTensor(fake_mode, value.detach(), cpu)
                table[name] = (
                    nn.Parameter(fake, requires_grad=value.requires_grad) if table is module._parameters else fake
                )
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
                fake = fake_mode.from_tensor(value)
                setattr(module, name, fake)
                attributes.append(fake)
    return attributes


def _storage_bytes(tensors) -> int:
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())


def estimate_step_memory(variant: Variant, shape: BenchShape, dtype: torch.dtype, seed: int = 0) -> dict:
    """Predicted peak memory (GB, 1e9 bytes, like the bench's `peak_mem_gb`) of `variant`'s LoRA training step.

    Returns {"peak_gb", "resident_gb" (weights + inputs before the step), "step_gb" (the most the step adds on
    top), "method", "notes"}. Raises ValueError for variants it cannot represent (offload).
    """
    estimated, notes = _estimable(variant)
    objective = FlowMatchObjective(weighting="none")  # builds its schedule with real tensors: outside fake mode
    # Real inputs, the prompt mask trimmed while its values are still known (fake tensors have none).
    real_inputs = make_inputs(shape, "cpu", dtype, seed)
    if not estimated.keep_mask:
        real_inputs.prompt_embeds, real_inputs.prompt_mask = trim_prompt_padding(
            real_inputs.prompt_embeds, real_inputs.prompt_mask
        )
    model = build_variant(estimated, shape, torch.device("meta"), dtype, seed)
    # Real tensors may meet fake ones: the noise-level table the step indexes is built once, outside fake mode.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    attributes = _fake_on_cpu(model, fake_mode)
    with fake_mode:
        optimizer = torch.optim.AdamW(list(lora_parameters(model).values()), lr=1e-5)
        tensor_fields = ("target", "condition", "prompt_embeds", "prompt_mask")
        inputs = dataclasses.replace(
            real_inputs,
            **{
                name: None if getattr(real_inputs, name) is None else fake_mode.from_tensor(getattr(real_inputs, name))
                for name in tensor_fields
            },
        )
        step = make_step(model, inputs, estimated, optimizer, objective, dtype, seed)
        # 2.1's image-slot mask stays real (RealMetadata computes the token layout from it); resident all the same.
        tensor_fields += ("image_slots",)
        tensor_inputs = [getattr(inputs, name) for name in tensor_fields if getattr(inputs, name) is not None]
        resident = [*model.parameters(), *model.buffers(), *attributes, *tensor_inputs]
        resident_bytes = _storage_bytes(resident)
        # 2.1's token layout is computed for real under the tracker (which counts it); the MMDiT needs no values.
        metadata = RealMetadata() if shape.family == QWEN21 else contextlib.nullcontext()
        with metadata, LiveStorageBytes(resident) as tracker:
            step()  # creates the optimizer state
            step()
    return {
        "peak_gb": (resident_bytes + tracker.peak) / 1e9,
        "resident_gb": resident_bytes / 1e9,
        "step_gb": tracker.peak / 1e9,
        "method": METHOD,
        "notes": notes,
    }
