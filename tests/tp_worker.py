"""Tensor parallelism of the merged model on 2 CPU processes (gloo), through diffusers' own sharding code.

Run by tests/test_diffusers_api.py as `python tests/tp_worker.py RESULT_JSON`. diffusers' `enable_parallelism` needs
an accelerator (it builds the mesh from `torch.accelerator`) and lists no CPU device type, so this builds a CPU mesh
itself and calls what `enable_parallelism` calls next: `_check_tp_supported`, `resolve_tp_shard_specs` and
`apply_tensor_parallel`, with "cpu" added to the device types diffusers accepts. Every rank writes what it measured;
rank 0 writes the JSON.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = 2


def _shard(model, plan):
    from diffusers import TensorParallelConfig
    from diffusers.hooks import tensor_parallel
    from torch.distributed.device_mesh import init_device_mesh

    tensor_parallel._SUPPORTED_TP_DEVICES = (*tensor_parallel._SUPPORTED_TP_DEVICES, "cpu")
    config = TensorParallelConfig(tp_degree=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    tensor_parallel._check_tp_supported(
        type(model).__name__, plan, model.config.num_attention_heads, config, model=model
    )
    specs = tensor_parallel.resolve_tp_shard_specs(model, plan, WORLD)
    config.setup(dist.get_rank(), WORLD, torch.device("cpu"), mesh=mesh)
    tensor_parallel.apply_tensor_parallel(model, config, plan)
    return specs


def _run(rank: int, init_file: str, result: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from diffusers import QwenImageTransformer2DModel

        from fusedit.model import fuse_qkv
        from tests.test_merged_qkv import HEAD_DIM, VARIANTS, make_inputs, relative_error

        torch.manual_seed(0)
        # 4 heads: two per rank (the other tests' 3 heads do not split in two)
        reference = QwenImageTransformer2DModel(
            num_layers=2,
            attention_head_dim=HEAD_DIM,
            num_attention_heads=4,
            joint_attention_dim=40,
            axes_dims_rope=(4, 6, 6),
        ).eval()
        with torch.no_grad():
            for parameter in reference.parameters():
                parameter.normal_(0, 0.2)
        _, shapes = VARIANTS["edit"]
        inputs = make_inputs(shapes)
        with torch.no_grad():
            expected = reference(**inputs).sample

        merged = fuse_qkv(copy.deepcopy(reference))
        full_qkv = merged.transformer_blocks[0].attn.to_qkv.weight.detach().clone()
        specs = _shard(merged, merged._tp_plan)
        local_qkv = merged.transformer_blocks[0].attn.to_qkv.weight.to_local()
        # this rank's rows of q, of k and of v, in that order
        third, half = full_qkv.shape[0] // 3, full_qkv.shape[0] // 6
        wanted = torch.cat([full_qkv[i * third + rank * half : i * third + (rank + 1) * half] for i in range(3)])
        with torch.no_grad():
            merged_out = merged(**inputs).sample

        standard = copy.deepcopy(reference)
        _shard(standard, type(standard)._tp_plan)
        with torch.no_grad():
            standard_out = standard(**inputs).sample

        # What a plain column-wise plan would do to to_qkv: rank 0 all of q and half of k.
        naive = fuse_qkv(copy.deepcopy(reference))
        naive_plan = {
            key: "colwise" if key.endswith("qkv") or key.endswith("qkv_proj") else value
            for key, value in naive._tp_plan.items()
        }
        _shard(naive, naive_plan)
        with torch.no_grad():
            naive_out = naive(**inputs).sample

        measured = {
            "rank": rank,
            "merged_vs_diffusers": relative_error(merged_out, expected),
            "diffusers_tp_vs_diffusers": relative_error(standard_out, expected),
            "merged_tp_vs_diffusers_tp": relative_error(merged_out, standard_out),
            "naive_colwise_vs_diffusers": relative_error(naive_out, expected),
            "local_qkv_rows_are_own_heads": bool(torch.equal(local_qkv, wanted)),
            "qkv_block_sizes": specs["transformer_blocks.0.attn.to_qkv.weight"].block_sizes,
        }
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, measured)
        if rank == 0:
            Path(result).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    result_path = sys.argv[1]
    init = f"{result_path}.init"
    Path(init).unlink(missing_ok=True)  # a file store left by an earlier run would hand out stale addresses
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_run, args=(init, result_path), nprocs=WORLD, join=True)
