"""Streaming the frozen transformer blocks from host memory (fusedit.model.streaming, build stage `stream`).

On a CPU the "device" copy is a real copy into fresh memory and the hook logic is the GPU's, so these tests fail if
a block is not loaded before use, not dropped after, or the backward's recompute does not load it again."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from fusedit.model.streaming import block_streamer
from fusedit.step.build import build_transformer, stages_applied
from fusedit.step.config import ModelConfig
from fusedit.step.objective import FlowMatchObjective
from fusedit.step.precision import Precision
from fusedit.training.module import EditLoRAModule
from fusedit.training.validate_config import validate_train_config
from tests.test_perf_training import LORA, tiny_inputs
from tests.training_utils import compose_train


def loss_and_grads(path, resident_blocks=None, fp8=False, spy=None):
    torch.manual_seed(0)
    transformer = build_transformer(
        path,
        ModelConfig(activation_checkpointing=1, resident_blocks=resident_blocks),
        LORA,
        Precision(fp8="storage" if fp8 else "none"),
    )
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    if spy is not None:
        spy(transformer)
    module = EditLoRAModule(transformer, torch.nn.Module(), FlowMatchObjective(), functools.partial(torch.optim.AdamW))
    loss, _ = module.compute_loss(tiny_inputs(lengths=(6, 6)), seed=3)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in transformer.named_parameters() if p.requires_grad}
    return loss.detach(), grads, transformer


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8-storage"])
def test_streaming_gives_bit_identical_loss_and_lora_gradients(tiny_edit_path, fp8):
    loss, grads, _ = loss_and_grads(tiny_edit_path, None, fp8)
    for resident in (0, 1):
        streamed_loss, streamed_grads, model = loss_and_grads(tiny_edit_path, resident, fp8)
        assert torch.equal(streamed_loss, loss)
        assert streamed_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert torch.equal(streamed_grads[name], grad), name
        streamer = block_streamer(model)
        assert len(streamer.blocks) == len(model.transformer_blocks) - resident
        # Forward and the backward's recompute each copy every streamed block in once.
        assert streamer.streamed_bytes > 0 and streamer.bytes_moved == 2 * streamer.streamed_bytes
        assert "stream" in stages_applied(model)


def test_blocks_are_loaded_for_their_forward_and_dropped_after(tiny_edit_path):
    seen = []

    def spy(model):
        block = model.transformer_blocks[0]
        base = block.img_mlp.net[2].base_layer  # a frozen Linear inside a streamed block, wrapped by PEFT
        original = block.img_mlp.forward

        def record(*args, **kwargs):
            seen.append((base.weight.data_ptr(), torch.is_grad_enabled(), torch._C._current_graph_task_id() != -1))
            return original(*args, **kwargs)

        block.img_mlp.forward = record
        spy.base = base

    _, _, model = loss_and_grads(tiny_edit_path, 0, spy=spy)
    host = spy.base.weight.data_ptr()
    streamer = block_streamer(model)
    host_copies = {h.data_ptr() for *_, h in streamer.blocks[0].entries}
    assert host in host_copies  # after the step: back on its host copy
    # Run twice: the forward (inside the checkpoint) and the recompute during backward, both on a device copy.
    assert [in_backward for *_, in_backward in seen] == [False, True]
    assert all(pointer != host for pointer, *_ in seen)
    assert not any(block.loaded for block in streamer.blocks)
    assert all(not p.requires_grad for *_, p in streamer.blocks[0].entries)
    lora = [p for name, p in model.transformer_blocks[0].named_parameters() if "lora_" in name]
    assert lora and all(p.grad is not None for p in lora)  # LoRA weights never streamed, still trained


def test_streaming_needs_checkpointing_of_every_block_and_no_compile(tiny_edit_path):
    with pytest.raises(ValueError, match="activation_checkpointing=1"):
        ModelConfig(activation_checkpointing=2, resident_blocks=0)
    with pytest.raises(ValueError, match="compile"):
        ModelConfig(activation_checkpointing=1, compile=True, resident_blocks=0)
    with pytest.raises(Exception, match="activation_checkpointing=1"):
        validate_train_config(compose_train(["model.resident_blocks=0"]), check_paths=False)
    with pytest.raises(Exception, match="resident_blocks must be null or an integer"):
        validate_train_config(
            compose_train(["model.resident_blocks=-1", "model.activation_checkpointing=1"]), check_paths=False
        )
    validate_train_config(
        compose_train(["model.resident_blocks=0", "model.activation_checkpointing=1"]), check_paths=False
    )


@pytest.mark.gpu
def test_streaming_on_cuda_matches_and_holds_fewer_blocks(tiny_edit_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    def on_cuda(resident):
        torch.manual_seed(0)
        model = build_transformer(
            tiny_edit_path, ModelConfig(activation_checkpointing=1, resident_blocks=resident), LORA, Precision()
        )
        model.to("cuda")
        streamer = block_streamer(model)
        if streamer is not None:
            assert all(h.device.type == "cpu" and h.is_pinned() for b in streamer.blocks for *_, h in b.entries)
        module = EditLoRAModule(model, torch.nn.Module(), FlowMatchObjective(), functools.partial(torch.optim.AdamW))
        inputs = tiny_inputs(lengths=(6, 6))
        inputs = dataclasses.replace(inputs, **{k: v.cuda() for k, v in vars(inputs).items() if torch.is_tensor(v)})
        torch.cuda.reset_peak_memory_stats()
        loss, _ = module.compute_loss(inputs, seed=3)
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads, torch.cuda.max_memory_allocated()

    loss, grads, _ = on_cuda(None)
    streamed_loss, streamed_grads, _ = on_cuda(0)
    assert streamed_loss == loss
    for name, grad in grads.items():
        assert torch.equal(streamed_grads[name], grad), name


def test_training_run_streams_blocks_through_lightning(tmp_path, tiny_edit_path, monkeypatch):
    """Lightning's `model.to(device)` must leave the streamed tensors in host memory; the run trains and exports."""
    import fusedit.model.streaming as streaming
    from fusedit.data import make_sample_dataset
    from fusedit.training.train import train
    from tests.training_utils import train_cfg

    streamers = []
    original = streaming.stream_blocks
    monkeypatch.setattr(
        streaming, "stream_blocks", lambda *a, **k: streamers.append(original(*a, **k)) or streamers[-1]
    )
    metadata = make_sample_dataset(tmp_path / "data", n=2, size=32)
    overrides = ["trainer.max_steps=2", "model.activation_checkpointing=1", "model.resident_blocks=1"]
    result = train(train_cfg(tmp_path, tiny_edit_path, metadata, overrides))
    assert result["lora_path"] is not None and result["checkpoint"] is not None
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    (streamer,) = streamers
    assert streamer.bytes_moved == 2 * 2 * streamer.streamed_bytes > 0  # 2 steps x (forward + recompute)
