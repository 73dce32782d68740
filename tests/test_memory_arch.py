"""memory.arch: the hand layout of a LLaMA/Mistral config.json equals the model transformers builds, and
memory-estimate of such a model imports neither torch nor transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from velora_cli.cli import main
from velora_cli.config.presets import KNOWN_MODELS, PRESETS
from velora_cli.memory.arch import arch_for, arch_of_config, arch_of_layout, preset_layout

REPO = Path(__file__).resolve().parents[1]

SMALL_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)  # fmt: skip


def built(layout: dict, name: str = "x") -> object:
    """The Arch read off the model transformers builds from the same config.json (meta device)."""
    fields = {k: v for k, v in layout.items() if k != "model_type"}
    return arch_of_config(AutoConfig.for_model(layout["model_type"], **fields), name)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_laid_out_by_hand_equals_the_built_model(preset: str) -> None:
    layout = preset_layout(preset)
    assert arch_of_layout(layout, "x") == built(layout)


@pytest.mark.parametrize(
    "layout",
    [
        {"model_type": "llama", **SMALL_LLAMA, "attention_bias": True},
        {"model_type": "llama", **SMALL_LLAMA, "mlp_bias": True, "tie_word_embeddings": True},
        {"model_type": "llama", **SMALL_LLAMA, "head_dim": 64},  # q/o wider than hidden (Gemma-like heads)
        {"model_type": "mistral", **SMALL_LLAMA},
    ],
    ids=["attention-bias", "mlp-bias-tied", "head-dim", "mistral"],
)
def test_layout_variants_equal_the_built_model(layout: dict) -> None:
    assert arch_of_layout(layout, "x") == built(layout)


def test_other_architectures_and_incomplete_configs_are_left_to_transformers(tmp_path: Path) -> None:
    assert arch_of_layout({"model_type": "qwen2", **SMALL_LLAMA}, "x") is None  # q/k/v carry biases of their own
    no_tie = {k: v for k, v in SMALL_LLAMA.items() if k != "tie_word_embeddings"}
    assert arch_of_layout({"model_type": "llama", **no_tie}, "x") is None  # transformers' default decides
    qwen = {"model_type": "qwen2", **SMALL_LLAMA}
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    arch = arch_for(model=str(tmp_path))  # built on meta: the q/k/v biases are in the count
    assert arch == built(qwen, str(tmp_path))
    assert [b for _, _, _, b in arch.linears[:4]] == [True, True, True, False]


def test_local_checkpoint_config_is_read_by_hand(tmp_path: Path) -> None:
    layout = {"model_type": "llama", **SMALL_LLAMA, "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(layout))
    assert arch_for(model=str(tmp_path)) == built(layout, str(tmp_path))
    # the shipped recipes' hub models resolve offline to their presets
    assert arch_for(model="huggyllama/llama-7b") == arch_of_layout(preset_layout(KNOWN_MODELS["huggyllama/llama-7b"]),
                                                                   "huggyllama/llama-7b")  # fmt: skip


BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('memory-estimate imported ' + name)
sys.meta_path.insert(0, Block())
from velora_cli.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    "args",
    [
        ["recipes/llama7b_alpaca.yaml", "--gpus", "2", "--set", "distributed.strategy=fsdp"],
        ["--preset", "llama-3.1-70b", "--gpus", "2", "--gpu-mem", "24GiB", "--seq", "512"],
        ["recipes/tiny_pretrain_demo.yaml", "--gpu-mem", "8GiB"],
    ],
)
def test_memory_estimate_of_a_llama_layout_imports_neither_torch_nor_transformers(
    args: list[str], tmp_path: Path
) -> None:
    """torch and transformers take ~4 s to import; planning a run needs neither. The figures are the ones the
    command gives in a process that has both loaded."""
    blocked = tmp_path / "blocked.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", BLOCK, "memory-estimate", *args, "--json", str(blocked)],
                          capture_output=True, text=True, cwd=REPO, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "memory-estimate imported" not in done.stderr
    assert ("per GPU:" in done.stdout) == ("--gpus" in args)
    loaded = tmp_path / "loaded.json"
    main(["memory-estimate", *args, "--json", str(loaded)])
    assert json.loads(blocked.read_text()) == json.loads(loaded.read_text())


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", "256"), ("hidden_size", 0), ("num_attention_heads", -8), ("vocab_size", 1000.5),
     ("num_hidden_layers", True), ("num_key_value_heads", 0)],
)  # fmt: skip
def test_a_bad_config_json_field_is_one_line_naming_it(tmp_path: Path, field: str, value: object, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **SMALL_LLAMA, field: value}))
    with pytest.raises(SystemExit) as exit_info:
        main(["memory-estimate", "--model", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"config.json's {field} must be a positive integer" in err, err


def test_a_config_json_that_is_a_fifo_is_refused_not_read(tmp_path: Path, capsys) -> None:
    os.mkfifo(tmp_path / "config.json")  # reading it would block forever
    with pytest.raises(SystemExit) as exit_info:
        main(["memory-estimate", "--model", str(tmp_path)])
    assert exit_info.value.code != 0
    assert "is a FIFO" in capsys.readouterr().err
