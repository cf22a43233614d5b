"""Files on disk: single files, sharded transformer folders (q/k/v across shards), pipelines, LoRAs, the CLI,
and the memory bound of streaming conversion."""

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fusedit.convert import LoraModule, LoraWeights, add_cli, convert_checkpoint, read_lora, write_lora
from tests.convert_utils import assert_bit_equal, tiny_state_dict, tiny_transformer

SRC = Path(__file__).resolve().parents[1] / "src"


def read_all(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118


def write_sharded(directory: Path, sd: dict, cut_after: list[str], prefix="diffusion_pytorch_model") -> list[str]:
    """Shard `sd` in key order, starting a new shard after each key in cut_after."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, current = [], {}
    for key, value in sd.items():
        current[key] = value
        if key in cut_after:
            shards.append(current)
            current = {}
    shards.append(current)
    names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, directory / name, {"format": "pt", "shard": name})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index))
    return names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_single_file_round_trip_bit_exact(tmp_path, dtype):
    sd = tiny_state_dict(dtype, prefix="model.diffusion_model.")
    save_file(sd, tmp_path / "in.safetensors", {"format": "pt", "source": "test"})
    report = convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "merged.safetensors", "to_merged")
    assert report["kind"] == "model_file" and report["output_layout"] == "merged_qkv" and not report["noop"]
    merged, meta = read_all(tmp_path / "merged.safetensors")
    assert meta == {"format": "pt", "source": "test"}
    assert "model.diffusion_model.transformer_blocks.0.attn.to_qkv.weight" in merged
    convert_checkpoint(tmp_path / "merged.safetensors", tmp_path / "back.safetensors", "to_standard")
    back, meta = read_all(tmp_path / "back.safetensors")
    assert meta == {"format": "pt", "source": "test"}
    assert_bit_equal(back, sd)
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_sharded_folder_with_qkv_across_shards(tmp_path):
    sd = tiny_state_dict(torch.bfloat16)
    src = tmp_path / "transformer"
    # q in shard 1, k in shard 2, v in shard 3 for block 0; add_q/add_k split from add_v for block 1
    cuts = [
        "transformer_blocks.0.attn.to_q.bias",
        "transformer_blocks.0.attn.to_k.weight",
        "transformer_blocks.1.attn.add_v_proj.weight",
    ]
    names = write_sharded(src, sd, cuts)
    (src / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel", "num_layers": 2}))
    report = convert_checkpoint(src, tmp_path / "merged", "to_merged")
    assert report["kind"] == "transformer" and report["files"] == names
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "config.json").read_text() == (src / "config.json").read_text()
    index = json.loads((merged_dir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    merged = {}
    for name in names:
        tensors, meta = read_all(merged_dir / name)
        assert meta == {"format": "pt", "shard": name}
        assert all(index["weight_map"][k] == name for k in tensors)
        merged.update(tensors)
    assert sorted(index["weight_map"]) == sorted(merged)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in merged.values())
    # the merged tensor lives in its q's shard
    assert index["weight_map"]["transformer_blocks.0.attn.to_qkv.weight"] == names[0]
    expected = torch.cat([sd[f"transformer_blocks.0.attn.to_{x}.weight"] for x in "qkv"])
    assert torch.equal(merged["transformer_blocks.0.attn.to_qkv.weight"], expected)

    convert_checkpoint(merged_dir, tmp_path / "back", "to_standard")
    back = {}
    for name in names:
        back.update(load_file(tmp_path / "back" / name))
    assert_bit_equal(back, sd)


def test_pipeline_folder_converts_transformer_and_copies_the_rest(tmp_path):
    src = tmp_path / "pipe"
    model = tiny_transformer()
    model.save_pretrained(src / "transformer", max_shard_size="40KB")
    (src / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    (src / "scheduler").mkdir()
    (src / "scheduler" / "scheduler_config.json").write_text("{}")
    (src / "tokenizer" / "nested").mkdir(parents=True)
    (src / "tokenizer" / "nested" / "vocab.txt").write_text("a b")
    report = convert_checkpoint(src, tmp_path / "out", "to_merged")
    assert report["kind"] == "pipeline" and len(report["files"]) > 1
    out = tmp_path / "out"
    assert (out / "tokenizer" / "nested" / "vocab.txt").read_text() == "a b"
    assert (out / "model_index.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    from fusedit.detect import detect

    assert detect(out)["layout"] == "merged_qkv" and detect(src)["layout"] == "standard"
    # already merged: written unchanged, and said so
    again = convert_checkpoint(out, tmp_path / "again", "to_merged")
    assert again["noop"] is True


def test_lora_file_layout_and_format_change(tmp_path):
    D = 32
    modules = {
        f"transformer_blocks.0.attn.to_{x}": LoraModule(torch.randn(4, D), torch.randn(D, 4), 2.0) for x in "qkv"
    }
    write_lora(LoraWeights(modules), tmp_path / "in.safetensors", "diffusers")
    report = convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "m.safetensors", "to_merged", "peft")
    assert report["input_format"] == "diffusers" and report["output_format"] == "peft"
    assert report["output_layout"] == "merged_qkv"
    # ComfyUI / kohya readers know only q/k/v: asking for a merged file is refused, nothing written ...
    with pytest.raises(ValueError, match=r"kohya LoRA cannot be written in the merged_qkv layout"):
        convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "k.safetensors", "to_merged", "kohya")
    assert not (tmp_path / "k.safetensors").exists()
    # ... and a merged input comes out split (exactly, alpha kept) without being asked
    report = convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "k.safetensors", format="kohya")
    assert report["output_layout"] == "standard"
    sd = load_file(tmp_path / "k.safetensors")
    assert sd["lora_unet_transformer_blocks_0_attn_to_q.alpha"].item() == 2.0
    convert_checkpoint(tmp_path / "k.safetensors", tmp_path / "c.safetensors", format="comfyui")
    back = read_lora(tmp_path / "c.safetensors")
    assert back.format == "comfyui" and back.layout == "standard"
    restored = convert_checkpoint(tmp_path / "c.safetensors", tmp_path / "d.safetensors", "to_standard", "diffusers")
    assert restored["output_layout"] == "standard"
    for final in (back, read_lora(tmp_path / "d.safetensors")):
        for name, mod in modules.items():
            assert torch.equal(final.modules[name].A, mod.A) and torch.equal(final.modules[name].B, mod.B)
            assert final.modules[name].alpha == 2.0


def test_errors(tmp_path):
    sd = tiny_state_dict()
    save_file(sd, tmp_path / "in.safetensors")
    with pytest.raises(ValueError, match="is the input"):
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "in.safetensors", "to_merged")
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="exists"):
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "exists.safetensors", "to_merged")
    with pytest.raises(ValueError, match="needs a direction"):
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="--format applies to LoRAs only"):
        convert_checkpoint(tmp_path / "in.safetensors", tmp_path / "o.safetensors", "to_merged", "kohya")
    del sd["transformer_blocks.0.attn.to_v.bias"]
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"(?s)broken\.safetensors.*transformer_blocks\.0\.attn\.to_v\.bias"):
        convert_checkpoint(tmp_path / "broken.safetensors", tmp_path / "o.safetensors", "to_merged")
    assert not (tmp_path / "o.safetensors").exists()
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a checkpoint fusedit can convert"):
        convert_checkpoint(tmp_path / "random", tmp_path / "o", "to_merged")


def test_cli(tmp_path, capsys):
    save_file(tiny_state_dict(), tmp_path / "in.safetensors")
    parser = argparse.ArgumentParser(prog="fusedit")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "convert",
            "--input",
            str(tmp_path / "in.safetensors"),
            "--output",
            str(tmp_path / "o.safetensors"),
            "--direction",
            "to_merged",
        ]
    )
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output_layout"] == "merged_qkv"
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "--input", "a", "--output", "b", "--direction", "up"])


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from fusedit.convert import convert_checkpoint

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    if sys.argv[3] == "naive":  # what streaming avoids: the whole checkpoint in memory at once
        from safetensors.torch import load_file
        from fusedit.convert import convert_state_dict
        tensors = {}
        for shard in sorted(Path(sys.argv[1]).glob("*.safetensors")):
            tensors.update(load_file(shard))
        merged, _ = convert_state_dict(tensors, "to_merged")
    else:
        convert_checkpoint(sys.argv[1], sys.argv[2], "to_merged")
    print(json.dumps({"before_kib": before, "peak_kib": status("VmHWM")}))
    """
)


def peak_growth(src: Path, out: Path, mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(src), str(out), mode],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    return (rss["peak_kib"] - rss["before_kib"]) * 1024


def test_sharded_streaming_memory_is_bounded_by_shards(tmp_path):
    """8 shards of ~40 MB (q/k/v of some blocks straddle shards): peak RSS grows by far less than the checkpoint."""
    hidden, blocks, shard_bytes = 1024, 10, 40 * 2**20
    src = tmp_path / "transformer"
    src.mkdir()
    generator = torch.Generator().manual_seed(0)
    keys = []
    for b in range(blocks):
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            keys.append(f"transformer_blocks.{b}.attn.{proj}.weight")
    per_tensor = hidden * hidden * 4
    shards, current = [], []
    for key in keys:
        if current and (len(current) + 1) * per_tensor > shard_bytes:
            shards.append(current)
            current = []
        current.append(key)
    shards.append(current)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard_keys in zip(names, shards, strict=True):
        save_file({k: torch.randn(hidden, hidden, generator=generator) for k in shard_keys}, src / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    index = {"metadata": {"total_size": per_tensor * len(keys)}, "weight_map": weight_map}
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text("{}")
    total = per_tensor * len(keys)
    assert len(shards) == 8 and total > 300 * 2**20
    assert any(
        weight_map[f"transformer_blocks.{b}.attn.to_q.weight"] != weight_map[f"transformer_blocks.{b}.attn.to_v.weight"]
        for b in range(blocks)
    )

    growth = peak_growth(src, tmp_path / "out", "convert")
    naive = peak_growth(src, tmp_path / "unused", "naive")
    print(
        f"checkpoint {total / 2**20:.0f} MiB in {len(shards)} shards; peak RSS growth {growth / 2**20:.1f} MiB "
        f"streaming, {naive / 2**20:.1f} MiB loading everything"
    )
    assert naive > total  # the measurement does see tensors held in memory
    assert growth < 2.5 * shard_bytes, f"peak RSS grew {growth / 2**20:.0f} MiB for {total / 2**20:.0f} MiB of weights"
    # and the result is right where q/k/v straddle shards
    b = next(
        b
        for b in range(blocks)
        if weight_map[f"transformer_blocks.{b}.attn.to_q.weight"]
        != weight_map[f"transformer_blocks.{b}.attn.to_v.weight"]
    )
    out_index = json.loads((tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    merged_key = f"transformer_blocks.{b}.attn.to_qkv.weight"
    with safe_open(str(tmp_path / "out" / out_index["weight_map"][merged_key]), framework="pt") as handle:
        merged = handle.get_tensor(merged_key)
    for i, x in enumerate("qkv"):
        key = f"transformer_blocks.{b}.attn.to_{x}.weight"
        with safe_open(str(src / weight_map[key]), framework="pt") as handle:
            assert torch.equal(merged[i * hidden : (i + 1) * hidden], handle.get_tensor(key))


def test_overwrite_replaces_a_sharded_output_whole(tmp_path):
    """A sharded output overwritten by a single-file conversion keeps no old shard or index (a loader would follow
    the stale index to the old model); the replacement is complete before the old folder goes."""
    config = json.dumps({"_class_name": "QwenImageTransformer2DModel", "num_layers": 2})
    old_sd = tiny_state_dict(torch.bfloat16)
    sharded = tmp_path / "sharded"
    write_sharded(sharded, old_sd, ["transformer_blocks.0.attn.to_k.weight"])
    (sharded / "config.json").write_text(config)
    out = tmp_path / "out"
    convert_checkpoint(sharded, out, "to_merged")
    assert len(list(out.glob("*.safetensors"))) == 2 and list(out.glob("*.index.json"))

    new_sd = {key: value + 1 for key, value in old_sd.items()}
    single = tmp_path / "single"
    single.mkdir()
    save_file(new_sd, single / "diffusion_pytorch_model.safetensors")
    (single / "config.json").write_text(config)
    convert_checkpoint(single, out, "to_merged", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    convert_checkpoint(out, tmp_path / "back", "to_standard")
    assert_bit_equal(load_file(tmp_path / "back" / "diffusion_pytorch_model.safetensors"), new_sd)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or retired folder left


def test_output_inside_its_input_or_holding_it_is_refused(tmp_path):
    sd = tiny_state_dict(torch.bfloat16)
    src = tmp_path / "model"
    src.mkdir()
    save_file(sd, src / "diffusion_pytorch_model.safetensors")
    (src / "config.json").write_text(json.dumps({"num_layers": 2}))
    with pytest.raises(ValueError, match="is inside the input"):
        convert_checkpoint(src, src / "merged", "to_merged")
    assert not (src / "merged").exists()
    with pytest.raises(ValueError, match="holds the input"):
        convert_checkpoint(src, tmp_path, "to_merged", overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="will not delete"):
        convert_checkpoint(src, tmp_path / "notes", "to_merged", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
