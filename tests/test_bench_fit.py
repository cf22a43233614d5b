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
