"""Cached rows -> batches: the collate function of CachedEditDataset and the `EditInputs` validation samples from."""

from __future__ import annotations

import torch

from fusedit.step.conditioning import EditInputs, pad_prompts


def pad_slots(slots: list[torch.Tensor]) -> torch.Tensor:
    """Per-prompt Qwen3-VL image slots [L_i] bool -> [B, max L_i] bool, False after each prompt (as `pad_prompts`
    pads the embeddings)."""
    longest = max(len(s) for s in slots)
    return torch.stack([torch.cat([s.bool(), s.new_zeros(longest - len(s), dtype=torch.bool)]) for s in slots])


def collate_cached(items: list[dict]) -> dict:
    """One bucket's cached rows -> {"target", "condition", "prompt_embeds", "prompt_mask", "img_shapes", "prompt",
    "row", "token_weights", "empty_prompt_embeds", "image_slots", "empty_image_slots"}; prompts padded as the conditioner pads them (fusedit.step.conditioning.pad_prompts)."""
    shapes = {tuple(map(tuple, item["img_shapes"])) for item in items}
    if len(shapes) != 1:
        raise ValueError(
            f"batch of rows {[item['row'] for item in items]} mixes latent shapes {sorted(shapes)}; batches must "
            "come from BucketBatchSampler"
        )
    embeds, mask = pad_prompts([item["prompt_embeds"] for item in items])
    slots = len(items[0]["edits"])
    target = torch.stack([item["target"] for item in items])
    weights = [item.get("token_weights") for item in items]
    empty = [item.get("empty_prompt_embeds") for item in items]
    image_slots = [item.get("image_slots") for item in items]  # Qwen-Image-2.1 rows only
    empty_slots = [item.get("empty_image_slots") for item in items]
    # Text-to-image rows have no edit image: a condition of 0 tokens, as EditConditioner gives.
    condition = [torch.stack([item["edits"][s] for item in items]) for s in range(slots)] or [target[:, :0]]
    return {
        "target": target,
        "condition": torch.cat(condition, dim=1),
        "prompt_embeds": embeds,
        "prompt_mask": mask,
        "img_shapes": [[tuple(shape) for shape in item["img_shapes"]] for item in items],
        "prompt": [item["prompt"] for item in items],
        "row": [item["row"] for item in items],
        # Loss weights of masked rows (all ones for the others), None when no row has a mask.
        "token_weights": None
        if all(w is None for w in weights)
        else torch.stack([torch.ones(target.shape[1]) if w is None else w for w in weights]),
        # Unpadded empty-prompt encodings (caption dropout picks among them), None when not cached.
        "empty_prompt_embeds": None if any(e is None for e in empty) else empty,
        # Qwen-Image-2.1: the prompts' image slots padded like the embeddings, and the empty prompts' (unpadded).
        "image_slots": None if any(s is None for s in image_slots) else pad_slots(image_slots),
        "empty_image_slots": None if any(s is None for s in empty_slots) else empty_slots,
    }


def cached_inputs(samples: list[dict], device: torch.device) -> EditInputs:
    """Items of a CachedEditDataset (one bucket) -> `EditInputs` on `device`, as training gets them."""
    batch = collate_cached(samples)
    mask, slots = batch["prompt_mask"], batch["image_slots"]
    return EditInputs(
        target=batch["target"].to(device),
        condition=batch["condition"].to(device),
        prompt_embeds=batch["prompt_embeds"].to(device),
        prompt_mask=None if mask is None else mask.to(device),
        img_shapes=batch["img_shapes"],
        image_slots=None if slots is None else slots.to(device),
    )
