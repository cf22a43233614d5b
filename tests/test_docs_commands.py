"""Every command line and README Python snippet in README.md and docs/*.md is exercised here, read from the markdown
itself so that a new line is covered without touching this file.

- `python train.py ...`, `fusedit cache ...` and `python infer.py ...` are composed with Hydra's compose API from the
  real conf/ (each job of a `-m` sweep separately) and resolved; training configs also pass the config checks.
- `fusedit ...` lines are parsed by the real `fusedit` parser; those that run on a CPU in seconds (make-tiny, detect,
  convert) are run on the tiny pipeline, in order, in one scratch directory per page.
- Scripts are parsed by their own argparse parser (Python) or `bash -n` (shell); `python -m fusedit.<module>` lines by
  the module's `build_parser()`.
- README's Python snippets run on the tiny pipeline.
A command of a kind this file does not know fails `test_every_command_is_of_a_known_kind`.
"""

from __future__ import annotations

import argparse
import itertools
import re
import runpy
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from fusedit.cli import build_parser
from fusedit.cli import main as fusedit_main
from fusedit.convert import LoraModule, LoraWeights, write_lora
from tests.training_utils import CONF, REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Placeholders the docs use for "your value": a bare `...` is dropped, `key=...` gets a value, `<time>` a run name.
PLACEHOLDER_VALUE = "/placeholder"
RUN_NAME = "2026-01-01_00-00-00"
# Commands that cannot run in a test, each with the reason; they are still checked as far as a CPU allows.
FUSEDIT_RUN_HERE = ("make-tiny", "detect", "convert")  # the others: download (network), bench (minutes; test_bench)


def fenced(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def command_lines(path: Path) -> list[list[str]]:
    """The argv of every command in `path`'s bash blocks (continuations joined, env prefixes and srun dropped)."""
    argvs = []
    for block in fenced(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                while argv and (ENV_ASSIGNMENT.match(argv[0]) or argv[0] == "srun"):
                    argv = argv[1:]
                if argv:
                    argvs.append(argv)
    return argvs


def kind(argv: list[str]) -> str:
    program = Path(argv[0]).name
    if program.startswith("python") and argv[1:2] == ["-m"]:
        return {"pytest": "pytest"}.get(argv[2], "module" if argv[2].startswith("fusedit.") else "unknown")
    if program.startswith("python"):
        return {"train.py": "train", "infer.py": "infer"}.get(argv[1], "python-script")
    if program == "fusedit":
        return "cache" if argv[1] == "cache" else "fusedit"
    if program == "bash" or argv[0].endswith(".sh"):
        return "shell-script"
    if program == "export":
        return "export"
    return "unknown"


ALL = [(path, argv) for path in DOCS for argv in command_lines(path)]
IDS = [f"{path.name}:{' '.join(argv)[:70]}" for path, argv in ALL]


def test_the_docs_have_commands():
    assert len(ALL) > 60
    assert {kind(argv) for _, argv in ALL} >= {"train", "infer", "cache", "fusedit", "python-script", "shell-script"}


@pytest.mark.parametrize(("path", "argv"), ALL, ids=IDS)
def test_every_command_is_of_a_known_kind(path, argv):
    assert kind(argv) != "unknown", f"{path.name}: teach tests/test_docs_commands.py to run {argv}"


def hydra_overrides(arguments: list[str]) -> list[str]:
    out = []
    for item in arguments:
        if item == "...":
            continue
        key, _, value = item.partition("=")
        if value == "...":
            item = f"{key}={PLACEHOLDER_VALUE}"
        out.append(item.replace("<time>", RUN_NAME))
    return out


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs `-m` would run: Hydra's own override parser expands `a=1,2` sweeps into their product."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)]


def compose_checked(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    body = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    if "paths" in body:  # set by Hydra at run time
        body.paths.root_dir = "/tmp/r"
        body.paths.output_dir = "/tmp/r/run"
    OmegaConf.to_container(body, resolve=True, throw_on_missing=True)
    return body


HYDRA = [(p, a) for p, a in ALL if kind(a) in ("train", "infer", "cache")]


@pytest.mark.parametrize(("path", "argv"), HYDRA, ids=[f"{p.name}:{' '.join(a)[:70]}" for p, a in HYDRA])
def test_hydra_commands_compose(path, argv):
    from fusedit.training.validate_config import validate_train_config

    config_name = "infer" if kind(argv) == "infer" else "train"
    arguments = argv[2:]
    multirun = "-m" in arguments or "--multirun" in arguments
    overrides = hydra_overrides([a for a in arguments if a not in ("-m", "--multirun")])
    if any(o.startswith("hparams_search=") for o in overrides):
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    if any(o.startswith("hydra/launcher=") for o in overrides):
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    jobs = sweep_jobs(overrides) if multirun else [overrides]
    assert multirun or jobs == [overrides]
    for job in jobs:
        cfg = compose_checked(config_name, job)
        if config_name == "train":
            validate_train_config(cfg, check_paths=False)


MODULES = [(p, a) for p, a in ALL if kind(a) == "module"]


@pytest.mark.parametrize(("path", "argv"), MODULES, ids=[f"{p.name}:{' '.join(a)[:70]}" for p, a in MODULES])
def test_module_commands_parse(path, argv):
    import importlib

    importlib.import_module(argv[2]).build_parser().parse_args(argv[3:])


class _Parsed(Exception):
    pass


def parse_script_arguments(script: Path, arguments: list[str], monkeypatch) -> argparse.Namespace:
    """Run `script`'s main only up to its argparse call: the arguments are parsed by its own parser, nothing runs."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr("sys.argv", [str(script), *arguments])
    with pytest.raises(_Parsed) as parsed:
        runpy.run_path(str(script), run_name="__main__")
    return parsed.value.args[0]


SCRIPTS = [(p, a) for p, a in ALL if kind(a) in ("python-script", "shell-script")]


@pytest.mark.parametrize(("path", "argv"), SCRIPTS, ids=[f"{p.name}:{' '.join(a)[:70]}" for p, a in SCRIPTS])
def test_script_commands_parse(path, argv, monkeypatch):
    if kind(argv) == "python-script":
        parse_script_arguments(REPO / argv[1], argv[2:], monkeypatch)
        return
    # setup.sh installs packages (network) and gpu_check.sh needs a GPU: both are checked for syntax here, and
    # their flags against the script's own usage; tests/test_bench.py runs gpu_check.sh's CPU refusal.
    script = REPO / (argv[1] if Path(argv[0]).name == "bash" else argv[0])
    assert script.is_file(), script
    subprocess.run(["bash", "-n", str(script)], check=True)
    for flag in (a for a in argv if a.startswith("--")):
        assert flag in script.read_text(), f"{script.name} does not know {flag}"


def tiny_lora(path: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    modules = {
        f"transformer_blocks.0.attn.{name}": LoraModule(
            torch.randn(4, 32, generator=generator), torch.randn(32, 4, generator=generator), 4.0
        )
        for name in ("to_q", "to_k", "to_v")
    }
    write_lora(LoraWeights(modules), path, "diffusers", layout="standard")
    return path


@pytest.fixture
def scratch(tmp_path, tiny_edit_path, tiny_t2i_path, monkeypatch):
    """A working directory holding what the docs' commands name (a transformer folder, LoRA files), and the
    mapping from the docs' model paths to the tiny pipelines."""
    shutil.copytree(tiny_edit_path / "transformer", tmp_path / "transformer")
    for name in ("lora.safetensors", "my_lora.safetensors", "any_format.safetensors"):
        tiny_lora(tmp_path / name)
    shutil.copytree(tiny_edit_path, tmp_path / "pipe")
    monkeypatch.chdir(tmp_path)
    models = {"/models/Qwen-Image-Edit": str(tiny_edit_path), "/models/Qwen-Image": str(tiny_t2i_path)}
    return tmp_path, models


def localised(argument: str, models: dict[str, str]) -> str:
    if argument == "PATH":
        return models["/models/Qwen-Image-Edit"]
    for doc_path, tiny in models.items():  # longest first: -Edit before the bare Qwen-Image
        if argument == doc_path or argument.startswith(doc_path + "/"):
            return tiny + argument[len(doc_path) :]
    return argument


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_fusedit_commands_parse_and_run_on_the_tiny_pipeline(page, scratch, capsys):
    _, models = scratch
    lines = [argv for argv in command_lines(page) if kind(argv) == "fusedit"]
    if not lines:
        pytest.skip(f"{page.name} has no fusedit command")
    for argv in lines:
        arguments = [localised(a, models) for a in argv[1:]]
        build_parser().parse_args(arguments)  # every line: flags, choices and values the real parser accepts
        if arguments[0] in FUSEDIT_RUN_HERE:
            assert fusedit_main(arguments) == 0, (argv, capsys.readouterr().err)


def test_readme_python_snippets_run_on_the_tiny_pipeline(scratch):
    _, models = scratch
    snippets = fenced(REPO / "README.md", "python")
    assert snippets
    for snippet in snippets:
        for doc_path, tiny in models.items():
            snippet = re.sub(rf'"{re.escape(doc_path)}"', f'"{tiny}"', snippet)
        exec(compile(snippet, "README.md", "exec"), {})
