"""Encoding with the text encoder offloaded layer by layer (cache.offload, EditConditioner.offload_text_encoder):
the encode-then-train pass of 16 and 12 GB cards. Same embeddings as the encoder in one piece; on a GPU, a fraction
of its memory."""

from __future__ import annotations

import pytest
import torch

from fusedit.step.conditioning import EditConditioner


def _prompt_embeds(conditioner: EditConditioner) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    edit = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    embeds, _ = conditioner.encode_prompts(["make the sky green"], [edit])
    return embeds.cpu()


def test_an_offloaded_text_encoder_gives_the_same_embeddings(tiny_edit_path):
    whole = _prompt_embeds(EditConditioner.from_pretrained(tiny_edit_path, dtype=torch.float32))
    offloaded = EditConditioner.from_pretrained(tiny_edit_path, dtype=torch.float32).offload_text_encoder("cpu")
    assert offloaded.execution_device == torch.device("cpu")
    assert torch.equal(_prompt_embeds(offloaded), whole)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_offloaded_text_encoder_encodes_on_the_gpu_holding_a_fraction_of_it(tiny_edit_path):
    device = torch.device("cuda")
    whole = _prompt_embeds(EditConditioner.from_pretrained(tiny_edit_path, dtype=torch.float32).to(device))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    conditioner = EditConditioner.from_pretrained(tiny_edit_path, dtype=torch.float32).offload_text_encoder(device)
    embeds = _prompt_embeds(conditioner)
    text_bytes = sum(p.numel() * p.element_size() for p in conditioner.text_encoder.parameters())
    assert torch.allclose(embeds, whole, atol=1e-5)
    vae_bytes = sum(p.numel() * p.element_size() for p in conditioner.vae.parameters())
    assert torch.cuda.max_memory_allocated(device) - before - vae_bytes < text_bytes
    assert all(p.device.type == "cpu" for p in conditioner.text_encoder.parameters())
