"""The GPU fit check (fusedit.bench.fit): its arguments and time budget, in-process. The check itself runs at the
tiny shape in tests/test_bench.py's gpu_check.sh test (two profiles, each in its subprocess)."""

from __future__ import annotations

import json

from fusedit.bench import fit


def test_an_unknown_profile_is_refused(capsys):
    assert fit.main(["--profiles", "12gb,a40"]) == 2
    assert "fusedit: error: --profiles: unknown ['a40']" in capsys.readouterr().err


def test_profiles_past_the_time_budget_are_skipped_and_reported(tmp_path):
    out = tmp_path / "fit.json"
    assert fit.main(["--time-budget", "0", "--json", str(out), "--markdown", str(tmp_path / "fit.md")]) == 1
    report = json.loads(out.read_text())
    assert [r["profile"] for r in report["profiles"]] == list(fit.DEFAULT_PROFILES)
    assert {r["status"] for r in report["profiles"]} == {"skipped: time budget"}
    assert "| 12gb | 12 |" in (tmp_path / "fit.md").read_text()


def test_every_trainer_profile_names_its_card():
    from fusedit.plan.config import CONF_DIR

    gpu_profiles = {p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")} - {"auto", "cpu", "ddp", "fsdp"}
    assert gpu_profiles == set(fit.CARDS)


def test_the_encoders_a_live_encoder_profile_allocates_are_the_ones_it_predicts():
    import torch

    from fusedit.plan.predict import encoder_counts

    text_encoder, vae = fit.encoder_modules("tiny", torch.bfloat16)
    total, vae_count, leaf = encoder_counts(text_encoder, vae)
    assert total == sum(p.numel() for module in (text_encoder, vae) for p in module.parameters())
    # At this size the vision patch embedding (3 x 2 x 14 x 14 -> 32) outgrows the token embedding (1024 x 32);
    # at the full size the token embedding is the largest (tests/test_plan.py).
    assert leaf == 3 * 2 * 14 * 14 * 32 > 1024 * 32
    allocated = [module.to_empty(device="cpu") for module in (text_encoder, vae)]
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for m in allocated for p in m.parameters())
