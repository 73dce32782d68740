"""Bad inputs, careless and hostile: each is one line on stderr that names the file, field or row, the right exit
code (2: the input is wrong; 1: an output location cannot be written), and nothing written or changed anywhere.

Every case runs the CLI in-process (`velora_cli.cli.main`) in a fresh workspace: a valid tiny recipe, an existing
run directory, a trained run for export/eval, MMLU files; the case breaks one thing and the whole workspace is
compared, file by file, before and after (the empty `.velora.lock` a run directory's lock leaves is the exception).
"""

# ruff: noqa: E501 - one table row per case reads better than rows wrapped to 120 columns

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from velora_cli.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "recipes" / "data" / "demo_tasks_train.json"
MMLU_MINI = REPO / "recipes" / "data" / "mmlu_mini"
ROWS = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(12)]


def base_recipe(ws: Path, model: Path) -> dict:
    return {
        "name": "bad",
        "model": {"name": str(model), "quantization": "nf4"},
        "lora": {"r": 4, "alpha": 8},
        "velora": {"layers": ["v", "d"], "num_groups": 8},
        "data": {"path": str(ws / "data.json"), "template": "alpaca", "cutoff_len": 64},
        "train": {"micro_batch_size": 2, "batch_size": 2, "max_steps": 1},
        "output": {"dir": str(ws / "run")},
    }


@pytest.fixture(scope="module")
def trained_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-step run of the tiny LLaMA, to export and evaluate."""
    from velora_cli.finetune.pipeline import run_pipeline

    base = tmp_path_factory.mktemp("trained")
    (base / "data.json").write_text(json.dumps(ROWS))
    recipe = base / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(base, tiny_llama_dir)))
    run_pipeline(recipe, overrides=[])
    return base / "run"


@pytest.fixture(scope="module")
def remote_code_model(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA whose config.json maps to code of its own (auto_map), as hub repos with custom code do."""
    target = tmp_path_factory.mktemp("remote-code") / "model"
    shutil.copytree(tiny_llama_dir, target)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="velora_custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                        "AutoModelForCausalLM": "modeling_custom.CustomModel"})  # fmt: skip
    (target / "config.json").write_text(json.dumps(config))
    (target / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    (target / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    return target


class Workspace:
    def __init__(self, root: Path, model: Path, trained: Path, remote: Path, disk) -> None:
        self.root, self.model, self.remote, self.disk = root, model, remote, disk
        root.mkdir(parents=True)
        (root / "data.json").write_text(json.dumps(ROWS))
        (root / "run").mkdir()
        (root / "run" / ".velora-run").write_text("")  # velora's (rundir.ownership): a folder it may write into
        (root / "run" / "notes.txt").write_text("an existing run directory\n")
        shutil.copytree(MMLU_MINI, root / "mmlu")
        self.trained = root / "trained"
        shutil.copytree(trained, self.trained)
        self.recipe_data = base_recipe(root, model)
        self.write_recipe()

    def write_recipe(self, **sections) -> Path:
        data = json.loads(json.dumps(self.recipe_data))
        for dotted, value in sections.items():
            node = data
            *parents, leaf = dotted.split("__")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        (self.root / "recipe.yaml").write_text(yaml.safe_dump(data))
        return self.root / "recipe.yaml"

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def readonly(self) -> Path:
        return self.disk(4, readonly=True)

    def full(self) -> Path:
        disk = self.disk(1)
        with contextlib.suppress(OSError):  # fill it to the last byte
            (disk / "filler").write_bytes(b"x" * (2 << 20))
        return disk

    def snapshot(self) -> dict[str, str]:
        out = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and path.name != ".velora.lock":
                out[str(path.relative_to(self.root))] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                out[str(path.relative_to(self.root))] = "dir"
        return out


def _run_recipe(ws: Workspace, extra: list[str] | None = None, **sections) -> list[str]:
    return ["finetune", str(ws.write_recipe(**sections)), *(extra or [])]


def _mmlu(ws: Workspace, **changes) -> list[str]:
    for name, content in changes.items():
        ws.file(f"mmlu/{name}", content)
    return _run_recipe(ws, eval__mmlu={"enabled": True, "data_dir": str(ws.root / "mmlu"), "shots": 2})


def _trained_with(ws: Workspace, **model) -> Path:
    recipe = yaml.safe_load((ws.trained / "recipe.yaml").read_text())
    recipe["model"].update(model)
    (ws.trained / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return ws.trained


def _unwritable_mmlu_json(ws: Workspace) -> list[str]:
    ro = ws.readonly()
    return ["eval", "--mmlu", "--model", str(ws.trained), "--data-dir", str(ws.root / "mmlu"), "--json",
            str(ro / "out.json"), "--shots", "0"]  # fmt: skip


# (id, exit code, the one line (regex, after "error: "), how to make the command)
CASES = [
    # ---- the recipe file
    ("recipe-missing", 2, r"recipe not found: {root}/nope.yaml", lambda ws: ["finetune", str(ws.root / "nope.yaml")]),
    ("recipe-is-dir", 2, r"{root}/run: not a file", lambda ws: ["finetune", str(ws.root / "run")]),
    ("recipe-not-utf8", 2, r"{root}/r.yaml: not UTF-8 text",
     lambda ws: ["finetune", str(ws.file("r.yaml", b"data:\n  path: \xff\xfe.json\n"))]),
    ("recipe-invalid-yaml", 2, r"{root}/r.yaml: invalid YAML at line 3",
     lambda ws: ["finetune", str(ws.file("r.yaml", "data:\n  path: [unclosed\n"))]),
    ("recipe-duplicate-key", 2, r"{root}/r.yaml: invalid YAML at line 3: duplicate key 'data'",
     lambda ws: ["finetune", str(ws.file("r.yaml", "data:\n  path: a.json\ndata:\n  path: b.json\n"))]),
    ("recipe-duplicate-nested-key", 2, r"{root}/r.yaml: invalid YAML at line 3: duplicate key 'path'",
     lambda ws: ["finetune", str(ws.file("r.yaml", "data:\n  path: a.json\n  path: b.json\n"))]),
    ("recipe-is-a-list", 2, r"{root}/r.yaml: a recipe is a mapping of sections, got list",
     lambda ws: ["finetune", str(ws.file("r.yaml", "- data\n"))]),
    ("recipe-unknown-field", 2, r"{root}/recipe.yaml: unknown field 'train.learning_rat' \(did you mean 'learning_rate'",
     lambda ws: _run_recipe(ws, train__learning_rat=1e-4)),
    ("recipe-missing-data", 2, r"{root}/r.yaml: missing required field 'data'",
     lambda ws: ["finetune", str(ws.file("r.yaml", "name: x\n"))]),
    # ---- values
    ("lr-inf", 2, r"{root}/recipe.yaml: train.learning_rate=inf: Input should be a finite number",
     lambda ws: _run_recipe(ws, train__learning_rate=float("inf"))),
    ("lr-nan", 2, r"{root}/recipe.yaml: train.learning_rate=nan: Input should be a finite number",
     lambda ws: _run_recipe(ws, train__learning_rate=float("nan"))),
    ("lr-negative", 2, r"train.learning_rate=-0.1: Input should be greater than 0",
     lambda ws: _run_recipe(ws, train__learning_rate=-0.1)),
    ("velora-scale-inf-by-set", 2,
     r"{root}/recipe.yaml \(--set velora.scale=.inf\): velora.scale=inf: Input should be a finite number",
     lambda ws: _run_recipe(ws, ["--set", "velora.scale=.inf"])),
    ("set-typo-names-the-option", 2, r"{root}/recipe.yaml \(--set train.lerning_rate=1\): unknown field",
     lambda ws: _run_recipe(ws, ["--set", "train.lerning_rate=1"])),
    ("set-without-equals", 2, r"--set 'train.learning_rate': expected KEY=VALUE",
     lambda ws: _run_recipe(ws, ["--set", "train.learning_rate"])),
    ("set-bad-yaml-value", 2, r"--set 'train.seed=\[1': value is not valid YAML",
     lambda ws: _run_recipe(ws, ["--set", "train.seed=[1"])),
    ("batch-not-multiple", 2, r"train: batch_size 3 is not a multiple of micro_batch_size 2",
     lambda ws: _run_recipe(ws, train__batch_size=3)),
    ("cutoff-absurd", 2, r"data.cutoff_len=100000000000000000000: Input should be less than or equal to 1048576",
     lambda ws: _run_recipe(ws, ["--set", "data.cutoff_len=100000000000000000000"])),
    ("max-steps-zero", 2, r"Invalid value for '--max-steps'", lambda ws: _run_recipe(ws, ["--max-steps", "0"])),
    ("stages-unknown", 2, r"--stages 'train,deploy': choose from train, export, eval",
     lambda ws: _run_recipe(ws, ["--stages", "train,deploy"])),
    ("paged-optimizer-on-cpu", 2, r"train.optimizer='paged_adamw_8bit' needs CUDA",
     lambda ws: _run_recipe(ws, train__optimizer="paged_adamw_8bit")),
    ("flash-attention-on-cpu", 2, r"model.attn_implementation=flash_attention_2 needs a CUDA device and the flash-attn package",
     lambda ws: _run_recipe(ws, model__attn_implementation="flash_attention_2")),
    # ---- training data
    ("data-missing", 2, r"data.path: data file not found: {root}/missing.json",
     lambda ws: _run_recipe(ws, data__path=str(ws.root / "missing.json"))),
    ("data-not-utf8", 2, r"{root}/latin1.json: not UTF-8 text \(invalid byte at line 3\)",
     lambda ws: _run_recipe(ws, data__path=str(ws.file(
         "latin1.json", '[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9", "output": "b"}\n]'
         .encode("latin-1"))))),
    ("data-invalid-json", 2, r"{root}/broken.json: invalid JSON at line 2",
     lambda ws: _run_recipe(ws, data__path=str(ws.file("broken.json", '[\n{"instruction": }\n]')))),
    ("data-jsonl-bad-line", 2, r"{root}/rows.jsonl: invalid JSON at line 2",
     lambda ws: _run_recipe(ws, data__path=str(ws.file("rows.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n')))),
    ("data-row-missing-output", 2, r"{root}/rows.json: row 1: field 'output' is missing",
     lambda ws: _run_recipe(ws, data__path=str(ws.file("rows.json", json.dumps([ROWS[0], {"instruction": "x"}]))))),
    ("data-row-not-object", 2, r"{root}/rows.json: row 0: expected an object",
     lambda ws: _run_recipe(ws, data__path=str(ws.file("rows.json", "[1, 2]")))),
    ("data-empty", 2, r"data.path {root}/empty.json: no usable records",
     lambda ws: _run_recipe(ws, data__path=str(ws.file("empty.json", "[]")))),
    ("data-not-a-list", 2, r"{root}/obj.json: expected a JSON list",
     lambda ws: _run_recipe(ws, data__path=str(ws.file("obj.json", '{"a": 1}')))),
    ("data-every-row-too-long", 2,
     r"data.path {root}/data.json: all 12 training rows are longer than data.cutoff_len=9 tokens",
     lambda ws: _run_recipe(ws, data__cutoff_len=9)),
    ("data-val-leaves-nothing", 2, r"data.val_set_size=12 leaves no training rows \(dataset has 12\)",
     lambda ws: _run_recipe(ws, data__val_set_size=12)),
    ("data-val-path-missing", 2, r"data.val_path: data file not found: {root}/val.json",
     lambda ws: _run_recipe(ws, data__val_path=str(ws.root / "val.json"))),
    ("data-hub-offline", 2, r"data.path: cannot load dataset|data.path 'velora-test/no-such-data'",
     lambda ws: _run_recipe(ws, data__path="velora-test/no-such-data")),
    # ---- held-out and MMLU inputs, checked before training
    ("heldout-missing", 2, r"eval.heldout.path: data file not found: {root}/heldout.json",
     lambda ws: _run_recipe(ws, eval__heldout={"enabled": True, "path": str(ws.root / "heldout.json")})),
    ("heldout-bad-row", 2, r"{root}/heldout.json: row 0: field 'instruction' is missing",
     lambda ws: _run_recipe(ws, eval__heldout={"enabled": True, "path": str(ws.file("heldout.json", '[{"a": 1}]'))})),
    ("mmlu-dir-missing", 2, r"eval.mmlu.data_dir: MMLU data directory not found: {root}/no-mmlu",
     lambda ws: _run_recipe(ws, eval__mmlu={"enabled": True, "data_dir": str(ws.root / "no-mmlu")})),
    ("mmlu-unclosed-quote", 2, r"eval.mmlu.data_dir: {root}/mmlu/test/astronomy_test.csv:2: malformed CSV",
     lambda ws: _mmlu(ws, **{"test/astronomy_test.csv": 'Q1,a,b,c,d,A\n"Q2,a,b,c,d,B\nQ3,a,b,c,d,C\n'})),
    ("mmlu-quote-swallows-rows", 2, r"astronomy_test.csv:2: a quoted field runs over whole rows",
     lambda ws: _mmlu(ws, **{"test/astronomy_test.csv": 'Q1,a,b,c,d,A\n"Q2,a,b,c,d,B\nQ3,a,b,c,d,C\nQ4",a,b,c,d,D\n'})),
    ("mmlu-field-count", 2, r"astronomy_test.csv:1: expected 6 fields \(question,A,B,C,D,answer\), got 5",
     lambda ws: _mmlu(ws, **{"test/astronomy_test.csv": "Q1,a,b,c,A\n"})),
    ("mmlu-answer-letter", 2, r"astronomy_test.csv:1: answer must be one of A, B, C, D, got 'E'",
     lambda ws: _mmlu(ws, **{"test/astronomy_test.csv": "Q1,a,b,c,d,E\n"})),
    ("mmlu-dev-too-short", 2, r"{root}/mmlu/dev/astronomy_dev.csv: 1 questions, fewer than --shots 2",
     lambda ws: _mmlu(ws, **{"dev/astronomy_dev.csv": "Q1,a,b,c,d,A\n"})),
    ("mmlu-unknown-subject", 2, r"unknown MMLU subject 'astronmy'.*\(did you mean 'astronomy'\?\)",
     lambda ws: _run_recipe(ws, eval__mmlu={"enabled": True, "data_dir": str(ws.root / "mmlu"),
                                            "subjects": ["astronmy"]})),  # fmt: skip
    # ---- the model and the shapes, from config.json alone
    ("num-groups-does-not-divide", 2, r"velora.num_groups=6: layer .*v_proj has input depth 64",
     lambda ws: _run_recipe(ws, velora__num_groups=6)),
    ("lora-target-missing", 2, r"lora.target_modules=\['c_attn'\]: Target modules \{{'c_attn'\}} not found",
     lambda ws: _run_recipe(ws, lora__target_modules=["c_attn"], velora__enabled=False)),
    ("velora-not-on-lora", 2, r"velora.layers \['down_proj'\] are not LoRA targets",
     lambda ws: _run_recipe(ws, lora__target_modules=["q", "v"])),
    ("model-dir-missing", 2, r"model directory not found: {root}/no-model",
     lambda ws: _run_recipe(ws, model__name=str(ws.root / "no-model"))),
    ("model-is-a-file", 2, r"model '{root}/data.json' is a file", lambda ws: _run_recipe(ws, model__name=str(ws.root / "data.json"))),
    ("model-hub-offline", 2, r"model 'velora-test/no-such-model': not in the local Hugging Face cache, and HF_HUB_OFFLINE",
     lambda ws: _run_recipe(ws, model__name="velora-test/no-such-model")),
    ("model-remote-code-untrusted", 2, r"model '.*remote-code.*' ships its own Python code \(auto_map",
     lambda ws: _run_recipe(ws, model__name=str(ws.remote))),
    # ---- output locations
    ("output-dir-is-a-file", 1, r"output.dir {root}/data.json: exists and is a file",
     lambda ws: _run_recipe(ws, output__dir=str(ws.root / "data.json"))),
    ("output-dir-under-a-file", 1, r"output.dir {root}/data.json/run: {root}/data.json is a file",
     lambda ws: _run_recipe(ws, output__dir=str(ws.root / "data.json" / "run"))),
    ("output-dir-read-only", 1, r"output.dir .*/run: cannot write in .* \(Read-only file system\)",
     lambda ws: _run_recipe(ws, output__dir=str(ws.readonly() / "run"))),
    ("output-dir-disk-full", 1, r"output.dir .*/run: no space left on the device",
     lambda ws: _run_recipe(ws, output__dir=str(ws.full() / "run"))),
    ("export-dir-is-a-file", 1, r"export.dir {root}/data.json: exists and is a file",
     lambda ws: _run_recipe(ws, export={"enabled": True, "dir": str(ws.root / "data.json")})),
    ("stage-needs-adapter", 2, r"{root}/run: no trained adapter yet; run the train stage first",
     lambda ws: _run_recipe(ws, ["--stages", "export"])),
    # ---- memory-estimate
    ("estimate-seq-absurd", 2, r"Invalid value for '--seq'",
     lambda ws: ["memory-estimate", "--preset", "llama-7b", "--seq", "100000000000000000000"]),
    ("estimate-gpu-mem", 2, r"--gpu-mem 'lots'", lambda ws: ["memory-estimate", "--preset", "llama-7b", "--gpu-mem", "lots"]),
    ("estimate-model-and-preset", 2, r"give either --model or --preset, not both",
     lambda ws: ["memory-estimate", "--preset", "llama-7b", "--model", "x/y"]),
    ("estimate-unknown-preset", 2, r"unknown preset 'llama-8b'", lambda ws: ["memory-estimate", "--preset", "llama-8b"]),
    ("estimate-json-read-only", 1, r"--json .*/est.json: cannot write in .* \(Read-only file system\)",
     lambda ws: ["memory-estimate", "--preset", "llama-7b", "--json", str(ws.readonly() / "est.json")]),
    ("estimate-json-is-a-dir", 1, r"--json {root}/run: exists and is a directory",
     lambda ws: ["memory-estimate", "--preset", "llama-7b", "--json", str(ws.root / "run")]),
    # ---- export
    ("export-run-missing", 2, r"{root}/nope: run directory not found", lambda ws: ["export", str(ws.root / "nope")]),
    ("export-out-is-a-file", 1, r"--out {root}/data.json: exists and is a file",
     lambda ws: ["export", str(ws.trained), "--out", str(ws.root / "data.json")]),
    ("export-adapter-only-read-only", 1, r"--out .*/adapter: cannot write in .* \(Read-only file system\)",
     lambda ws: ["export", str(ws.trained), "--adapter-only", "--out", str(ws.readonly() / "adapter")]),
    ("export-trust-not-from-the-run-dir", 2, r"ships its own Python code \(auto_map",
     lambda ws: ["export", str(_trained_with(ws, name=str(ws.remote), trust_remote_code=True)), "--out",
                 str(ws.root / "out")]),  # fmt: skip
    # ---- eval
    ("eval-no-benchmark", 2, r"velora eval: choose a benchmark", lambda ws: ["eval", "--model", str(ws.trained)]),
    ("eval-data-dir-missing", 2, r"MMLU data directory not found: {root}/no-mmlu",
     lambda ws: ["eval", "--mmlu", "--model", str(ws.trained), "--data-dir", str(ws.root / "no-mmlu")]),
    ("eval-unclosed-quote-keeps-results", 2, r"{root}/mmlu/test/astronomy_test.csv:2: malformed CSV",
     lambda ws: [ws.file("mmlu/test/astronomy_test.csv", 'Q1,a,b,c,d,A\n"Q2,a,b,c,d,B\n') and "eval", "--mmlu",
                 "--model", str(ws.trained), "--data-dir", str(ws.root / "mmlu")]),  # fmt: skip
    ("eval-json-read-only", 1, r"--json .*/out.json: cannot write in .* \(Read-only file system\)", _unwritable_mmlu_json),
    ("eval-trust-not-from-the-run-dir", 2, r"ships its own Python code \(auto_map",
     lambda ws: ["eval", "--mmlu", "--model", str(_trained_with(ws, name=str(ws.remote), trust_remote_code=True)),
                 "--data-dir", str(ws.root / "mmlu"), "--shots", "0"]),  # fmt: skip
]  # fmt: skip


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 45
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "code", "line", "make"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(name, code, line, make, tmp_path, tiny_llama_dir, trained_run,
                                                    remote_code_model, tiny_disk, capsys) -> None:  # fmt: skip
    ws = Workspace(tmp_path / "ws", tiny_llama_dir, trained_run, remote_code_model, tiny_disk)
    (ws.trained / "eval").mkdir(exist_ok=True)
    (ws.trained / "eval" / "mmlu.json").write_text('{"overall": {"acc": 0.5, "n": 2}}\n')
    argv = make(ws)  # may break a file of the workspace: the snapshot is taken after
    before = ws.snapshot()
    try:
        main(argv)
        got = 0
    except SystemExit as exc:
        got = int(exc.code or 0)
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert got == code, err
    assert len(errors) == 1 and "Traceback" not in err, err
    import re

    assert re.search(line.format(root=re.escape(str(ws.root))), errors[0]), errors[0]
    assert ws.snapshot() == before  # the run dir, the trained run, every output: as they were
    assert not (ws.root / "run" / "adapter_config.json").exists()


def test_hub_unreachable_fails_within_seconds(tmp_path: Path, monkeypatch, capsys) -> None:
    """Not offline, but no route to the hub: one probe, one line, no retries."""
    import time

    from velora_cli.common import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(hub, "_reachable", {})
    started = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(["memory-estimate", "--model", "velora-test/no-such-model"])
    assert time.monotonic() - started < 5
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model 'velora-test/no-such-model': not in the local Hugging Face cache, and "
                          "https://127.0.0.1:9 cannot be reached") and "\n" not in err  # fmt: skip


@pytest.mark.slow
def test_memory_estimate_of_the_shipped_recipe_needs_no_hub(tmp_path: Path) -> None:
    """The README's own planning example, offline, with an empty hub cache: the table of known architectures."""
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf")}
    for recipe in ("llama7b_alpaca.yaml", "llama13b_alpaca.yaml"):
        result = subprocess.run(
            [__import__("sys").executable, "-m", "velora_cli", "memory-estimate", str(REPO / "recipes" / recipe),
             "--gpu-mem", "24GiB"], capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "24.00 GiB: this recipe" in result.stdout, result.stdout
        assert "Loading" not in result.stderr and "Warning" not in result.stderr, result.stderr  # quiet by default
