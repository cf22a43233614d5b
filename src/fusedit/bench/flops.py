"""Model FLOPs of one LoRA training step, and the peak device throughput MFU is measured against.

The formula (multiply-add = 2 FLOPs; d = inner width; S = image + text tokens per sample; B = batch):

  forward, frozen base   every Linear costs 2 * in * out per row it processes: image-stream Linears see the image
                         tokens, text-stream Linears the text tokens, the modulation and timestep Linears one
                         row per sample. Per block that is 2 * 12 d^2 * (image + text tokens) + 2 * 12 d^2 * B
                         (q, k, v, out = 4 d^2 and the MLP = 8 d^2 per stream; img_mod and txt_mod 6 d^2 each),
                         plus img_in, txt_in, proj_out, the timestep MLP and norm_out outside the blocks.
  forward, attention     4 * S^2 * d per block per sample (Q K^T and P V, 2 * S^2 * d each).
  forward, LoRA          2 * r * (in + out) per row for every adapted Linear (A then B); fusedit.lora puts no
                         adapter on the last block's text stream after attention (its output is discarded).
  backward               frozen base: input gradient only, 1x its forward (no weight-gradient GEMMs), and none
                         where nothing upstream trains: img_in, txt_in, the timestep MLP, norm_out, every block's
                         modulation (fed by the timestep embedding), block 0's q/k/v (fed by img_in/txt_in, unless
                         the modulation carries LoRA), and the last block's text stream after attention (its
                         output is discarded, so autograd never reaches it);
                         attention: 2x its forward (dQ, dK, dV, dP); LoRA: 2x its forward (weight grads of A and B,
                         input grads of B and A), less A's input grad where the input needs none (same places).
                         For 60 blocks this is ~1x base + 2x attention + 2x LoRA; the exact count is unit-tested
                         against torch's FlopCounterMode on a real model.
  step                   forward + backward. Recomputation by activation checkpointing is not model FLOPs and is
                         not counted (the MFU convention), so checkpointing shows up as a lower MFU.

The LoRA term depends on the layout: three rank-r adapters on q, k, v cost 2 r (d + d) each, one on the merged
projection 2 r (d + 3d).

Qwen-Image-2.1 (`qwen21_step_flops`, single stream, h = mlp_ratio * d): every block Linear sees every token of the
joint sequence (text, references, target; S = text + image tokens): q, k, v, out = 4 d^2 and the SwiGLU's gate, up,
out = 3 d h, so 2 * (4 d^2 + 3 d h) * S per block (13 d^2 at mlp_ratio 3). The GEMMs are the same work in both
layouts, in 5 projections standard (to_q, to_k, to_v, img_mlp.gate_layer, img_mlp.proj) and 2 merged (to_qkv,
img_mlp.gate_up_proj). Attention as diffusers' exact `QwenImage21AttnProcessor` computes it: each prefix segment
(a run of text tokens, or one reference image) attends to the keys up to its end, the target to all S keys, 4 * q *
k * d each (the text runs' causal triangles are masked, not skipped). Outside the blocks: img_in (64 -> d) on the
image tokens, txt_in (context -> d -> d) on the prompt's tokens including the image slots, proj_out (d -> 64) on all S
tokens (2.1 returns every token; the loss reads the target's), and on B + 1 rows (the extra one is t = 0) the
timestep MLP, the one shared modulation (d -> 4d) and norm_out (d -> d). Backward as above; the frozen input side is
img_in, txt_in, the timestep MLP, the modulation, norm_out and block 0's q/k/v (its input is the frozen embedding;
nothing in 2.1's output is discarded, so no block is skipped).
"""

from __future__ import annotations

from fusedit.bench.shapes import LATENT_CHANNELS, PATCH, QWEN21, QWEN21_CHANNELS, BenchShape, qwen21_image_slots
from fusedit.lora.targets import resolve_targets
from fusedit.model.module_map import LAST_BLOCK_UNUSED, QKV_GROUPS, STANDARD_QKV

IMAGE_MERGED, TEXT_MERGED = QKV_GROUPS  # to_qkv, add_qkv_proj
IMAGE_QKV, TEXT_QKV = QKV_GROUPS[IMAGE_MERGED], QKV_GROUPS[TEXT_MERGED]

TIMESTEP_CHANNELS = 256  # QwenTimestepProjEmbeddings: Timesteps(256) -> Linear(256, d) -> Linear(d, d)

# Dense bf16 tensor-core peak in TFLOP/s, matched against torch.cuda.get_device_name() (first match wins, so the
# more specific names come first). fp8 variants are also measured against the bf16 peak.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H20", 148.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX 4090", 165.0),
    ("A10G", 70.0),
)


def peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak for a CUDA device name; None for CPUs and devices not in the table (MFU is then null)."""
    if not device_name:
        return None
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment.lower() in device_name.lower():
            return tflops
    return None


def _block_linears(d: int) -> dict[str, tuple[int, int, str]]:
    """name -> (in, out, stream) for every Linear in a block, both QKV layouts; stream is image/text/sample."""
    linears = {
        "to_out.0": (d, d, "image"),
        "to_add_out": (d, d, "text"),
        "img_mlp.net.0.proj": (d, 4 * d, "image"),
        "img_mlp.net.2": (4 * d, d, "image"),
        "txt_mlp.net.0.proj": (d, 4 * d, "text"),
        "txt_mlp.net.2": (4 * d, d, "text"),
        "img_mod.1": (d, 6 * d, "sample"),
        "txt_mod.1": (d, 6 * d, "sample"),
        IMAGE_MERGED: (d, 3 * d, "image"),
        TEXT_MERGED: (d, 3 * d, "text"),
    }
    linears.update({name: (d, d, "image") for name in IMAGE_QKV})
    linears.update({name: (d, d, "text") for name in TEXT_QKV})
    return linears


_MERGED_ONLY = set(QKV_GROUPS)
_STANDARD_ONLY = set(STANDARD_QKV)
_QKV = _MERGED_ONLY | _STANDARD_ONLY


def step_flops(shape: BenchShape, layout: str = "merged_qkv", lora: bool = True) -> dict[str, float]:
    """FLOPs of one training step at `shape` (whole batch), by part; see the module docstring for the formula."""
    if shape.family == QWEN21:
        return qwen21_step_flops(shape, layout, lora)
    d, batch = shape.inner_dim, shape.batch
    rows = {"image": batch * shape.image_tokens, "text": batch * shape.text_tokens, "sample": batch}
    linears = _block_linears(d)
    skip = _MERGED_ONLY if layout == "standard" else _STANDARD_ONLY
    targets = resolve_targets(shape.lora_targets, layout) if lora else []
    # Input gradients are only computed where something upstream trains: never for the modulation Linears (fed by
    # the timestep embedding), and not for block 0's q/k/v unless the modulation itself carries LoRA.
    first_qkv_frozen_input = not any(linears[name][2] == "sample" for name in targets)
    # The last block's text stream after attention feeds nothing the loss reads: autograd skips it entirely.
    dead = {leaf.removeprefix("attn.") for leaf in LAST_BLOCK_UNUSED}
    block_forward = sum(2 * i * o * rows[stream] for name, (i, o, stream) in linears.items() if name not in skip)
    block_backward = sum(
        2 * i * o * rows[stream] for name, (i, o, stream) in linears.items() if name not in skip and stream != "sample"
    )
    last_block_dead = sum(2 * linears[name][0] * linears[name][1] * rows["text"] for name in dead)
    first_qkv = 2 * d * 3 * d * (rows["image"] + rows["text"]) if first_qkv_frozen_input else 0
    out_channels = LATENT_CHANNELS * PATCH * PATCH
    proj_out = 2 * d * out_channels * rows["image"]
    inputs_side = 2 * (
        out_channels * d * rows["image"]  # img_in
        + shape.joint_attention_dim * d * rows["text"]  # txt_in
        + (TIMESTEP_CHANNELS * d + d * d + d * 2 * d) * batch  # timestep MLP, norm_out's modulation
    )
    base_forward = shape.num_layers * block_forward + proj_out + inputs_side
    base_backward = shape.num_layers * block_backward - first_qkv - last_block_dead + proj_out
    attention = shape.num_layers * batch * 4 * shape.tokens**2 * d
    lora_forward = lora_backward = 0
    r = shape.lora_rank
    for name in targets:
        i, o, stream = linears[name]
        forward_one = 2 * r * (i + o) * rows[stream]
        a_input_grad = 2 * r * i * rows[stream]
        lora_forward += shape.num_layers * forward_one
        # Backward: weight grads of A and B, input grad of B, input grad of A where the input needs one.
        lora_backward += shape.num_layers * 2 * forward_one
        if stream == "sample":
            lora_backward -= shape.num_layers * a_input_grad
        elif name in _QKV and first_qkv_frozen_input:
            lora_backward -= a_input_grad
        if name in dead:
            # fusedit.lora.adapter leaves the last block's dead text-stream Linears without an adapter.
            lora_forward -= forward_one
            lora_backward -= 2 * forward_one
    return _step_totals(base_forward, base_backward, attention, lora_forward, lora_backward)


def _step_totals(base_forward: int, base_backward: int, attention: int, lora_forward: int, lora_backward: int):
    """The per-step FLOP dict `step_flops` and `qwen21_step_flops` report, attention's backward counted as twice
    its forward in both."""
    forward = base_forward + attention + lora_forward
    backward = base_backward + 2 * attention + lora_backward
    return {
        "base_forward": float(base_forward),
        "base_backward": float(base_backward),
        "attention_forward": float(attention),
        "lora_forward": float(lora_forward),
        "forward": float(forward),
        "backward": float(backward),
        "step": float(forward + backward),
    }


def _qwen21_block_linears(d: int, hidden: int) -> dict[str, tuple[int, int]]:
    """name -> (in, out) for every Linear in a 2.1 block, both layouts (LoRA target names, fusedit.lora.targets)."""
    return {
        "to_q": (d, d),
        "to_k": (d, d),
        "to_v": (d, d),
        "to_qkv": (d, 3 * d),
        "to_out.0": (d, d),
        "img_mlp.gate_layer": (d, hidden),
        "img_mlp.proj": (d, hidden),
        "img_mlp.gate_up_proj": (d, 2 * hidden),
        "img_mlp.out": (hidden, d),
    }


_QWEN21_STANDARD_ONLY = {"to_q", "to_k", "to_v", "img_mlp.gate_layer", "img_mlp.proj"}
_QWEN21_MERGED_ONLY = {"to_qkv", "img_mlp.gate_up_proj"}
_QWEN21_QKV = {"to_q", "to_k", "to_v", "to_qkv"}


def qwen21_attention_flops(shape: BenchShape) -> int:
    """Forward attention FLOPs of one 2.1 block, one sample: diffusers' exact per-segment prefill (module docstring)."""
    slots = qwen21_image_slots(shape).tolist()
    references = iter(shape.img_shapes[1:])  # img_shapes lists the target first; the prompt holds the references
    lengths, index = [], 0
    while index < len(slots):
        if slots[index]:
            frames, height, width = next(references)
            lengths.append(frames * height * width)
            index += frames * height * width // 4
        else:
            run = 1
            while index + run < len(slots) and not slots[index + run]:
                run += 1
            lengths.append(run)
            index += run
    flops, end = 0, 0
    for length in lengths:
        end += length
        flops += 4 * length * end * shape.inner_dim
    return flops + 4 * shape.target_tokens * shape.tokens * shape.inner_dim


def qwen21_step_flops(shape: BenchShape, layout: str = "merged_qkv", lora: bool = True) -> dict[str, float]:
    """FLOPs of one Qwen-Image-2.1 training step at `shape` (whole batch), by part (module docstring)."""
    from fusedit.lora.targets import resolve_targets

    d, batch, hidden = shape.inner_dim, shape.batch, shape.mlp_ratio * shape.inner_dim
    rows = batch * shape.tokens
    linears = _qwen21_block_linears(d, hidden)
    skip = _QWEN21_MERGED_ONLY if layout == "standard" else _QWEN21_STANDARD_ONLY
    block = sum(2 * i * o * rows for name, (i, o) in linears.items() if name not in skip)
    first_qkv = 2 * d * 3 * d * rows  # block 0's q/k/v need no input gradient
    prompt_rows = batch * (shape.text_tokens + shape.reference_slots)
    inputs_side = 2 * (
        QWEN21_CHANNELS * d * batch * shape.image_tokens  # img_in
        + (shape.joint_attention_dim * d + d * d) * prompt_rows  # txt_in: in_layer, out_layer
        + (256 * d + d * d + d * 4 * d + d * d) * (batch + 1)  # timestep MLP, modulation, norm_out (t = 0 row too)
    )
    proj_out = 2 * d * QWEN21_CHANNELS * rows
    base_forward = shape.num_layers * block + inputs_side + proj_out
    base_backward = shape.num_layers * block - first_qkv + proj_out
    attention = shape.num_layers * batch * qwen21_attention_flops(shape)
    lora_forward = lora_backward = 0
    r = shape.lora_rank
    for name in resolve_targets(shape.lora_targets, layout, family=QWEN21) if lora else []:
        i, o = linears[name]
        forward_one = 2 * r * (i + o) * rows
        lora_forward += shape.num_layers * forward_one
        lora_backward += shape.num_layers * 2 * forward_one
        if name in _QWEN21_QKV:
            lora_backward -= 2 * r * i * rows  # A's input gradient in block 0
    return _step_totals(base_forward, base_backward, attention, lora_forward, lora_backward)
