"""Hostile files and the user's own data: a recipe from a stranger, a half-copied run folder, a folder of the user's
that an option points at. Each case is one line on stderr (`error: ...`, no traceback) or the documented note, the
right exit code, and every file of the workspace (the user's project, its symlinks, velora's own run) hashed before
and after: nothing of the user's changed, deleted or added to, lock files included.

Most cases stop in the pre-flight, before any model loads; the ones that must load a model use the tiny LLaMA and
the tiny LoRA run from conftest, and the one that trains is marked slow.
"""

# ruff: noqa: E501 - one table row per case reads better than rows wrapped to 120 columns

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import stat
import struct
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, write_run_recipe
from test_bad_inputs import ROWS, base_recipe

from velora_cli.common import bounds
from velora_cli.config.load import MAX_RECIPE_BYTES
from velora_cli.rundir import verify
from velora_cli.rundir.ownership import EXPORT_MARKER, RUN_MARKER

MMLU_MINI = Path(__file__).resolve().parents[1] / "recipes" / "data" / "mmlu_mini"


VELORAS = ("run", "trained")  # velora's own run directories in the workspace: their lock file may stay


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` without opening anything but regular files (FIFOs and devices stay unopened); the
    empty .velora.lock a lock leaves in velora's own run directory is left out, as tests/test_bad_inputs.py does."""
    out: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if name == ".velora.lock" and Path(key).parent.name in VELORAS:
                continue
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                out[key] = "link -> " + os.readlink(path)
            elif stat.S_ISDIR(mode):
                out[key] = "dir"
            elif stat.S_ISREG(mode):
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[key] = f"special {stat.S_IFMT(mode)}"
    return out


class Workspace:
    """A user's project folder (and a symlink to it), data, velora's own run, and a finished tiny LoRA run."""

    def __init__(self, root: Path, model: Path, lora_run: Path) -> None:
        self.root, self.model = root, model
        project = root / "project"
        (project / "src").mkdir(parents=True)
        (project / "README.md").write_text("# my project\n")
        (project / "tokenizer.json").write_text('{"mine": true}\n')
        (project / "src" / "main.py").write_text("print('hello')\n")
        (root / "hidden-only" / ".git").mkdir(parents=True)
        (root / "hidden-only" / ".git" / "config").write_text("[core]\n")
        (root / "link").symlink_to(project, target_is_directory=True)
        (root / "empty").mkdir()
        (root / "data.json").write_text(json.dumps(ROWS))
        (root / "run").mkdir()
        (root / "run" / RUN_MARKER).write_text("")
        self.trained = root / "trained"
        shutil.copytree(lora_run, self.trained)
        self.recipe_data = {**base_recipe(root, model), "name": "hostile"}

    def recipe(self, text: str | None = None, **sections) -> str:
        """recipe.yaml (the workspace's, with `a__b=value` changes) or `text` as given; its path."""
        path = self.root / "recipe.yaml"
        if text is None:
            data = json.loads(json.dumps(self.recipe_data))
            for dotted, value in sections.items():
                node = data
                *parents, leaf = dotted.split("__")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
            text = yaml.safe_dump(data)
        path.write_text(text)
        return str(path)

    def fifo(self, name: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        return path

    def link(self, name: str, target: str) -> Path:
        path = self.root / name
        path.symlink_to(target)
        return path

    def sparse(self, name: str, size: int) -> Path:
        """A file of `size` bytes that takes no disk space (a hole)."""
        path = self.root / name
        with open(path, "wb") as handle:
            handle.truncate(size)
        return path

    def damage(self, name: str, how: str) -> Path:
        """Damage a file of the trained run: truncate it, or overwrite its start with garbage."""
        path = self.trained / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\x00garbage" + data[8:])
        return path

    def trained_with(self, **data) -> Path:
        write_run_recipe(self.trained, str(self.model), **data)
        return self.trained


def _finetune(ws: Workspace, *extra: str, **sections) -> list[str]:
    return ["finetune", ws.recipe(**sections), *extra]


def _raw(ws: Workspace, text: str, *extra: str) -> list[str]:
    return ["finetune", ws.recipe(text), *extra]


def _laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\nname: laughs\ndata: {path: data.json}\n"


def _summary(ws: Workspace, name: str, content: str) -> list[str]:
    run = ws.root / "runs" / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(content)
    return ["runs", str(ws.root / "runs")]


def _gguf_with_system(ws: Workspace, system: str) -> list[str]:
    run = ws.trained_with(template="chat", system_prompt=system)
    return ["export", str(run), "--format", "gguf", "--out", str(ws.root / "gguf-out")]


R = "{root}"  # the workspace root, escaped, in the expected lines
NOT_OURS = "a non-empty folder velora did not create"

CASES = [
    # -- 1. ownership: folders velora did not create are never written into (nor given lock files)
    ("output-dir-user-folder", 2, rf"output.dir {R}/project: {NOT_OURS}", lambda ws: _finetune(ws, "--output-dir", str(ws.root / "project"))),
    ("output-dir-symlink-to-user-folder", 2, rf"output.dir {R}/link \(-> {R}/project\): {NOT_OURS}", lambda ws: _finetune(ws, "--output-dir", str(ws.root / "link"))),
    ("output-dir-in-recipe", 2, rf"output.dir {R}/project: {NOT_OURS}", lambda ws: _finetune(ws, output__dir=str(ws.root / "project"))),
    ("output-dir-user-folder-with-a-recipe", 2, rf"output.dir {R}: {NOT_OURS}", lambda ws: _finetune(ws, output__dir=str(ws.root))),
    ("output-dir-hidden-files-only", 2, rf"output.dir {R}/hidden-only: {NOT_OURS}", lambda ws: _finetune(ws, output__dir=str(ws.root / "hidden-only"))),
    ("output-dir-user-folder-stages-train", 2, NOT_OURS, lambda ws: _finetune(ws, "--stages", "train", output__dir=str(ws.root / "project"))),
    ("export-dir-user-folder", 2, rf"export.dir {R}/project: {NOT_OURS}", lambda ws: _finetune(ws, export__enabled=True, export__dir=str(ws.root / "project"))),
    ("export-dir-symlink", 2, rf"export.dir {R}/link \(-> {R}/project\): {NOT_OURS}", lambda ws: _finetune(ws, export__enabled=True, export__dir=str(ws.root / "link"))),
    ("export-out-user-folder", 2, rf"--out {R}/project: directory exists and is not empty; pass --force", lambda ws: ["export", str(ws.trained), "--out", str(ws.root / "project")]),
    ("export-out-symlink", 2, rf"--out {R}/link \(-> {R}/project\): directory exists and is not empty", lambda ws: ["export", str(ws.trained), "--out", str(ws.root / "link")]),
    ("export-adapter-only-user-folder", 2, r"directory exists and is not empty", lambda ws: ["export", str(ws.trained), "--adapter-only", "--out", str(ws.root / "project")]),
    ("export-gguf-user-folder", 2, r"directory exists and is not empty", lambda ws: ["export", str(ws.trained), "--format", "gguf", "--out", str(ws.root / "link")]),
    ("empty-folder-failed-preflight-leaves-no-lock", 2, r"data.path", lambda ws: _finetune(ws, output__dir=str(ws.root / "empty"), data__path=str(ws.root / "missing.json"))),
    ("new-folder-failed-preflight-creates-nothing", 2, r"data.path", lambda ws: _finetune(ws, output__dir=str(ws.root / "new" / "run"), data__path=str(ws.root / "missing.json"))),
    ("output-dir-is-a-file", 1, rf"{R}/data.json: exists and is a file", lambda ws: _finetune(ws, output__dir=str(ws.root / "data.json"))),
    # -- 2. bounds on input: recipe size, YAML aliases, long values, run names, data paths that are not files
    ("recipe-over-1-mib", 2, rf"{R}/recipe.yaml: \d+ bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes", lambda ws: _raw(ws, "name: big\n" + "# padding\n" * 120_000)),
    ("recipe-50-mb-sparse", 2, r"a recipe is at most", lambda ws: ["finetune", str(ws.sparse("big.yaml", 50 << 20))]),
    ("billion-laughs", 2, r"invalid YAML at line 2: YAML aliases \(\*a0\) are not allowed", lambda ws: _raw(ws, _laughs())),
    ("alias-in-a-value", 2, r"YAML aliases \(\*p\) are not allowed", lambda ws: _raw(ws, "x: &p data.json\nname: a\ndata: {path: *p}\n")),
    ("merge-key-alias", 2, r"YAML aliases \(\*base\) are not allowed", lambda ws: _raw(ws, "base: &base {lr: 1}\ntrain:\n  <<: *base\n")),
    ("alias-in-set", 2, r"--set 'data.path=\*x': value is not valid YAML", lambda ws: _finetune(ws, "--set", "data.path=*x")),
    ("long-value-cut-in-message", 2, r"train.learning_rate='xxxx.*\.\.\. \(100002 characters\): ", lambda ws: _finetune(ws, train__learning_rate="x" * 100_000)),
    ("long-unknown-key-cut", 2, r"unknown field 'train\.yyyy.*\.\.\. \(\d+ characters\)", lambda ws: _finetune(ws, **{"train__" + "y" * 50_000: 1})),
    ("long-set-cut", 2, r"--set 'zzzz.*\.\.\. \(\d+ characters\): expected KEY=VALUE", lambda ws: _finetune(ws, "--set", "z" * 100_000)),
    ("name-dotdot", 2, r"name='\.\./\.\./x': a run name is one folder name", lambda ws: _finetune(ws, name="../../x", output__dir=None)),
    ("name-absolute", 2, r"name='/tmp/x': a run name is one folder name", lambda ws: _finetune(ws, name="/tmp/x", output__dir=None)),
    ("name-dot", 2, r"name='\.\.': a run name is one folder name", lambda ws: _finetune(ws, name="..", output__dir=None)),
    ("name-hidden", 2, r"name='\.hidden': a run name", lambda ws: _finetune(ws, name=".hidden", output__dir=None)),
    ("name-nul", 2, r"a run name is one folder name", lambda ws: _finetune(ws, name="a\x00b", output__dir=None)),
    ("name-newline", 2, r"a run name is one folder name", lambda ws: _finetune(ws, name="a\nb", output__dir=None)),
    ("name-backslash", 2, r"a run name is one folder name", lambda ws: _finetune(ws, name="a\\..\\b", output__dir=None)),
    ("name-too-long", 2, r"a run name is one folder name", lambda ws: _finetune(ws, name="n" * 300, output__dir=None)),
    ("name-empty", 2, r"a run name is one folder name", lambda ws: _finetune(ws, name=" ", output__dir=None)),
    ("data-path-fifo", 2, rf"data.path: {R}/pipe.json: is a FIFO \(named pipe\); give a regular file", lambda ws: _finetune(ws, data__path=str(ws.fifo("pipe.json")))),
    ("data-path-link-to-dev-zero", 2, rf"data.path: {R}/zero.json: is a character device", lambda ws: _finetune(ws, data__path=str(ws.link("zero.json", "/dev/zero")))),
    ("data-path-dev-urandom", 2, r"data.path: /dev/urandom: is a character device", lambda ws: _finetune(ws, data__path="/dev/urandom")),
    ("data-path-dev-stdin", 2, r"data.path: /dev/stdin: is", lambda ws: _finetune(ws, data__path="/dev/stdin") if not os.path.isfile("/dev/stdin") else pytest.skip("stdin is a file here")),
    ("data-folder-with-fifo", 2, rf"data.path: {R}/docs: {R}/docs/b.txt is a FIFO", lambda ws: (ws.file_in("docs/a.txt"), ws.fifo("docs/b.txt"), _finetune(ws, data__path=str(ws.root / "docs"), data__format="text"))[-1]),
    ("data-folder-with-link-to-device", 2, rf"{R}/docs/z.txt is a character device", lambda ws: (ws.file_in("docs/a.txt"), ws.link("docs/z.txt", "/dev/zero"), _finetune(ws, data__path=str(ws.root / "docs"), data__format="text"))[-1]),
    ("val-path-fifo", 2, r"data.val_path: .*is a FIFO", lambda ws: _finetune(ws, data__val_path=str(ws.fifo("val.json")))),
    ("heldout-path-fifo", 2, r"eval.heldout.path: .*is a FIFO", lambda ws: _finetune(ws, eval__heldout={"path": str(ws.fifo("held.json"))})),
    ("perplexity-path-device", 2, r"eval.perplexity.path: .*is a character device", lambda ws: _finetune(ws, eval__perplexity={"enabled": True, "path": str(ws.link("ppl.txt", "/dev/zero"))})),
    ("mmlu-dir-with-fifo", 2, r"eval.mmlu.data_dir: .*is a FIFO", lambda ws: (ws.fifo("mmlu/dev/x_dev.csv"), _finetune(ws, eval__mmlu={"enabled": True, "data_dir": str(ws.root / "mmlu")}))[-1]),
    ("data-file-over-2-gib", 2, rf"{R}/huge.json: \d+ bytes, more than the \d+-byte limit for a file read whole", lambda ws: _finetune(ws, data__path=str(ws.sparse("huge.json", (2 << 30) + 1)))),
    ("recipe-is-a-fifo", 2, r"recipe.fifo.yaml: not a file", lambda ws: ["finetune", str(ws.fifo("recipe.fifo.yaml"))]),
    ("recipe-link-to-dev-zero", 2, r"zero.yaml: not a file", lambda ws: ["finetune", str(ws.link("zero.yaml", "/dev/zero"))]),
    ("recipe-binary", 2, r"recipe.yaml: not UTF-8 text", lambda ws: ["finetune", str(ws.bytes_file("recipe.yaml", b"name: \xff\xfe\x00"))]),
    ("data-preview-fifo", 2, r"data.path: .*is a FIFO", lambda ws: ["data", "preview", ws.recipe(data__path=str(ws.fifo("p.json")))]),
    ("eval-perplexity-data-fifo", 2, rf"--data {R}/ppl.txt: is a FIFO", lambda ws: ["eval", "--perplexity", "--data", str(ws.fifo("ppl.txt")), "--model", str(ws.trained)]),
    ("eval-perplexity-data-dev-zero", 2, r"--data /dev/zero: is a character device", lambda ws: ["eval", "--perplexity", "--data", "/dev/zero", "--model", str(ws.trained)]),
    ("memory-estimate-recipe-laughs", 2, r"YAML aliases", lambda ws: ["memory-estimate", ws.recipe(_laughs(4))]),
    # -- 4. damaged or hostile files of a run: one line naming the file
    ("generate-truncated-adapter", 1, rf"{R}/trained/adapter_model.safetensors: is truncated", lambda ws: (ws.damage("adapter_model.safetensors", "truncate"), ["generate", str(ws.trained), "--prompt", "hi"])[-1]),
    ("generate-garbage-adapter", 1, rf"{R}/trained/adapter_model.safetensors: is truncated or not safetensors", lambda ws: (ws.damage("adapter_model.safetensors", "garbage"), ["generate", str(ws.trained), "--prompt", "hi"])[-1]),
    ("chat-truncated-adapter", 1, rf"{R}/trained/adapter_model.safetensors: is truncated", lambda ws: (ws.damage("adapter_model.safetensors", "truncate"), ["chat", str(ws.trained)])[-1]),
    ("generate-adapter-config-not-json", 1, rf"{R}/trained/adapter_config.json: not valid JSON", lambda ws: (ws.damage("adapter_config.json", "truncate"), ["generate", str(ws.trained), "--prompt", "hi"])[-1]),
    ("eval-truncated-adapter", 1, rf"{R}/trained/adapter_model.safetensors: is truncated", lambda ws: (ws.damage("adapter_model.safetensors", "truncate"), ["eval", "--mmlu", "--model", str(ws.trained), "--data-dir", str(MMLU_MINI), "--shots", "0"])[-1]),
    ("export-truncated-adapter", 1, rf"{R}/trained/adapter_model.safetensors: is truncated", lambda ws: (ws.damage("adapter_model.safetensors", "truncate"), ["export", str(ws.trained), "--out", str(ws.root / "out")])[-1]),
    ("export-adapter-only-garbage", 1, r"adapter_model.safetensors: is truncated or not safetensors", lambda ws: (ws.damage("adapter_model.safetensors", "garbage"), ["export", str(ws.trained), "--adapter-only", "--out", str(ws.root / "out")])[-1]),
    ("generate-pickled-adapter", 1, r"checkpoint-1/adapter_model.bin: holds objects other than tensors", lambda ws: ["generate", str(ws.hostile_checkpoint()), "--prompt", "hi"]),
    ("export-pickled-adapter", 2, r"checkpoint-1: adapter_model.safetensors missing beside adapter_config.json", lambda ws: (ws.hostile_checkpoint(), ["export", str(ws.trained), "--checkpoint", "1", "--adapter-only", "--out", str(ws.root / "out")])[-1]),
    ("half-copied-run-no-weights", 1, rf"{R}/trained: adapter_config.json without adapter weights", lambda ws: ((ws.trained / "adapter_model.safetensors").unlink(), ["generate", str(ws.trained), "--prompt", "hi"])[-1]),
    ("half-copied-tokenizer", 1, rf"{R}/trained/tokenizer.json: not valid JSON", lambda ws: (ws.damage("tokenizer.json", "truncate"), ["generate", str(ws.trained), "--prompt", "hi"])[-1]),
    ("chat-half-copied-tokenizer", 1, rf"{R}/trained/tokenizer.json: not valid JSON", lambda ws: (ws.damage("tokenizer.json", "truncate"), ["chat", str(ws.trained)])[-1]),
    ("adapter-config-not-peft", 1, rf"{R}/trained/adapter_config.json: no peft_type", lambda ws: (ws.bytes_file("trained/adapter_config.json", b'{"r": "x"}'), ["generate", str(ws.trained), "--prompt", "hi"])[-1]),
    ("adapter-config-a-list", 1, rf"{R}/trained/adapter_config.json: a JSON object was expected, not list", lambda ws: (ws.bytes_file("trained/adapter_config.json", b"[1]"), ["eval", "--mmlu", "--model", str(ws.trained), "--data-dir", str(MMLU_MINI), "--shots", "0"])[-1]),
    ("export-half-copied-tokenizer", 1, rf"{R}/trained/tokenizer.json: not valid JSON", lambda ws: (ws.damage("tokenizer.json", "truncate"), ["export", str(ws.trained), "--out", str(ws.root / "out")])[-1]),
    ("run-recipe-missing", 2, rf"{R}/trained: recipe.yaml missing", lambda ws: ((ws.trained / "recipe.yaml").unlink(), ["export", str(ws.trained), "--out", str(ws.root / "out")])[-1]),
    ("run-recipe-is-a-fifo", 2, rf"{R}/trained: a LoRA adapter without recipe.yaml beside it", lambda ws: ((ws.trained / "recipe.yaml").unlink(), os.mkfifo(ws.trained / "recipe.yaml"), ["generate", str(ws.trained), "--prompt", "hi"])[-1]),
    ("run-recipe-laughs", 2, r"YAML aliases", lambda ws: (ws.bytes_file("trained/recipe.yaml", _laughs(5).encode()), ["generate", str(ws.trained), "--prompt", "hi"])[-1]),
    # -- 4. Modelfile values Ollama cannot read back: refused before the merge
    ("modelfile-triple-quote-system", 2, r"Modelfile SYSTEM .*has three double quotes at the end of line 1", lambda ws: _gguf_with_system(ws, 'Say """\nhi')),
    ("modelfile-triple-quote-then-spaces", 2, r"three double quotes at the end of line 2", lambda ws: _gguf_with_system(ws, 'a\nb"""   \nFROM /etc/passwd')),
    ("modelfile-unprintable-system", 2, r"has the unprintable character '\\x07'", lambda ws: _gguf_with_system(ws, "ding\x07")),
]  # fmt: skip


def _file_in(self: Workspace, name: str, text: str = "a document\n") -> Path:
    path = self.root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _bytes_file(self: Workspace, name: str, data: bytes) -> Path:
    path = self.root / name
    path.write_bytes(data)
    return path


def _hostile_checkpoint(self: Workspace) -> Path:
    """checkpoint-1 of the trained run, its adapter weights a pickle (the pre-safetensors format) that runs code."""
    checkpoint = self.trained / "checkpoint-1"
    checkpoint.mkdir()
    shutil.copy(self.trained / "adapter_config.json", checkpoint / "adapter_config.json")
    torch.save(Evil(), checkpoint / "adapter_model.bin")
    return checkpoint


Workspace.file_in = _file_in
Workspace.bytes_file = _bytes_file
Workspace.hostile_checkpoint = _hostile_checkpoint


class Evil:
    """A pickle that runs code when loaded without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/velora-pwned",))


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 45
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "code", "line", "make"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_changes_nothing(name, code, line, make, tmp_path, tiny_llama_dir, tiny_lora_run,
                                                        capsys) -> None:  # fmt: skip
    ws = Workspace(tmp_path / "ws", tiny_llama_dir, tiny_lora_run)
    argv = make(ws)  # may plant a hostile file in the workspace: the snapshot is taken after
    before = snapshot(ws.root)
    code_got, _, err = run_cli(argv, capsys)
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert code_got == code, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(line.format(root=re.escape(str(ws.root))), errors[0]), errors[0]
    assert len(errors[0]) < 1200, "an error line quotes at most a few hundred characters of a value"
    assert snapshot(ws.root) == before
    assert not Path("/tmp/velora-pwned").exists()


# --------------------------------------------------------------------------------------------- force and markers


def test_force_writes_into_a_foreign_folder_and_marks_it(tmp_path: Path, tiny_llama_dir, tiny_lora_run, capsys) -> None:
    from velora_cli.rundir import ownership

    ws = Workspace(tmp_path / "ws", tiny_llama_dir, tiny_lora_run)
    target = ws.root / "project"
    assert ownership.foreign(target, RUN_MARKER) == target.resolve()
    ownership.refuse_foreign(target, RUN_MARKER, "output.dir", force=True)  # --force: no refusal
    ownership.claim(ws.root / "link", RUN_MARKER)  # a symlink is claimed where it points
    assert (target / RUN_MARKER).is_file() and ownership.owned(ws.root / "link", RUN_MARKER)
    assert ownership.foreign(ws.root / "empty", RUN_MARKER) is None  # an empty folder is free to take


def test_older_velora_run_dirs_count_as_owned(tmp_path: Path) -> None:
    from velora_cli.rundir import ownership

    user = tmp_path / "project"
    user.mkdir()
    (user / "recipe.yaml").write_text("name: mine\n")  # a user's own recipe beside their files
    (user / "notes.md").write_text("mine\n")
    assert ownership.foreign(user, RUN_MARKER) == user.resolve()
    for names in ((".velora.lock",), ("recipe.yaml", "summary.json"), ("recipe.yaml", "metrics.jsonl")):
        run = tmp_path / "-".join(n.strip(".") for n in names)
        run.mkdir()
        for name in names:
            (run / name).write_text("")
        (run / "checkpoint-2").mkdir()
        assert ownership.owned(run, RUN_MARKER) and ownership.foreign(run, RUN_MARKER) is None
        assert ownership.foreign(run, EXPORT_MARKER) == run.resolve()  # a run directory is no export
        (run / "merged").mkdir()
        (run / "merged" / "config.json").write_text("{}")
        assert ownership.owned(run / "merged", EXPORT_MARKER)  # an older velora's export inside its run


@pytest.mark.slow
def test_export_replaces_its_own_export_but_not_a_user_folder(tiny_lora_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_lora_run, run)
    code, _, err = run_cli(["export", str(run), "--adapter-only", "--out", str(tmp_path / "exp")], capsys)
    assert code == 0, err
    assert (tmp_path / "exp" / EXPORT_MARKER).is_file()
    code, _, err = run_cli(["export", str(run), "--adapter-only", "--out", str(tmp_path / "exp")], capsys)
    assert code == 0, err  # velora's own export: replaced without --force
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep.txt").write_text("mine")
    before = snapshot(tmp_path / "user")
    code, _, err = run_cli(["export", str(run), "--adapter-only", "--out", str(tmp_path / "user")], capsys)
    assert code == 2 and snapshot(tmp_path / "user") == before


# ------------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(run: Path, step: int, velora: bool = True) -> Path:
    from safetensors.torch import save_file

    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    save_file({"a": torch.ones(4, 4) * step, "b": torch.zeros(3)}, str(path / "adapter_model.safetensors"))
    if velora:
        save_file({"v": torch.ones(8)}, str(path / "velora_projections.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": []}, path / "optimizer.pt")
    torch.save({"python": (3, (1, 2), None), "cpu": torch.zeros(4, dtype=torch.uint8)}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _header_length(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])


def _header_not_json(path: Path) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"{" * n + data[8 + n :])


def _offsets_past_end(path: Path) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4096
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _evil_pickle(path: Path) -> None:
    torch.save(Evil(), path)


def _not_zip(path: Path) -> None:
    path.write_bytes(b"not a torch file at all")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _plain_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps(Evil()))


DAMAGE = [
    ("adapter-truncated", "adapter_model.safetensors", _truncate, "adapter_model.safetensors is truncated or damaged"),
    ("adapter-empty", "adapter_model.safetensors", _empty, "adapter_model.safetensors is truncated (0 bytes)"),
    ("adapter-header-length", "adapter_model.safetensors", _header_length, "is truncated or not safetensors"),
    ("adapter-header-not-json", "adapter_model.safetensors", _header_not_json, "adapter_model.safetensors cannot be read"),
    ("adapter-offsets-past-end", "adapter_model.safetensors", _offsets_past_end, "adapter_model.safetensors is truncated or damaged"),
    ("vectors-truncated", "velora_projections.safetensors", _truncate, "velora_projections.safetensors is truncated"),
    ("vectors-garbage", "velora_projections.safetensors", _not_zip, "velora_projections.safetensors is truncated or not safetensors"),
    ("optimizer-evil-pickle", "optimizer.pt", _evil_pickle, "optimizer.pt holds objects other than tensors"),
    ("optimizer-not-zip", "optimizer.pt", _not_zip, "optimizer.pt "),
    ("optimizer-truncated", "optimizer.pt", _truncate, "optimizer.pt cannot be read"),
    ("rng-evil-plain-pickle", "rng_state.pth", _plain_pickle, "rng_state.pth "),
    ("rng-empty", "rng_state.pth", _empty, "rng_state.pth cannot be read"),
    ("adapter-config-garbage", "adapter_config.json", _truncate, "adapter_config.json is not valid JSON"),
]


@pytest.mark.parametrize(("name", "file", "damage", "why"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_newest_checkpoint_is_skipped_with_its_reason(name, file, damage, why, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save_checkpoint(run, 2)
    _save_checkpoint(run, 4)
    damage(run / "checkpoint-4" / file)
    before = snapshot(run)
    sound, damaged = verify.sound_checkpoints(run, velora=True)
    assert [p.name for p in sound] == ["checkpoint-2"]
    assert [(p.name, why in reason) for p, reason in damaged] == [("checkpoint-4", True)], damaged
    assert snapshot(run) == before  # verifying reads only
    assert not Path("/tmp/velora-pwned").exists()
    moved = {path: verify.set_aside(path) for path, _ in damaged}
    line = verify.resume_line(sound[-1], damaged, moved)
    assert line == f"skipped {run}/checkpoint-4: {damaged[0][1]} (moved to damaged-checkpoint-4); resuming from checkpoint-2"
    assert "\n" not in line
    # Nothing deleted: the damaged checkpoint's files are all there, under the new name.
    assert {k.replace("damaged-checkpoint-4", "checkpoint-4"): v for k, v in snapshot(run).items()} == before


def test_sound_checkpoints_resume_quietly_and_all_damaged_start_afresh(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save_checkpoint(run, 2)
    sound, damaged = verify.sound_checkpoints(run, velora=True)
    assert damaged == [] and verify.resume_line(sound[-1], [], {}) == "resuming from checkpoint-2"
    _truncate(run / "checkpoint-2" / "adapter_model.safetensors")
    sound, damaged = verify.sound_checkpoints(run, velora=True)
    assert sound == [] and verify.resume_line(None, damaged, {}).endswith("; no sound checkpoint left; starting afresh")


def test_a_second_damaged_copy_is_set_aside_beside_the_first(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for _ in range(2):
        verify.set_aside(_save_checkpoint(run, 4))
    assert sorted(p.name for p in run.iterdir()) == ["damaged-checkpoint-4", "damaged-checkpoint-4-2"]


@pytest.mark.slow
def test_rerun_after_a_damaged_checkpoint_resumes_from_the_previous_one(tmp_path: Path, tiny_llama_dir, capsys) -> None:
    ws = tmp_path
    (ws / "data.json").write_text(json.dumps(ROWS))
    recipe = {
        "name": "resume", "model": {"name": str(tiny_llama_dir), "quantization": "nf4"}, "lora": {"r": 4, "alpha": 8},
        "velora": {"layers": ["v", "d"], "num_groups": 8},
        "data": {"path": str(ws / "data.json"), "template": "alpaca", "cutoff_len": 64},
        "train": {"micro_batch_size": 2, "batch_size": 2, "max_steps": 4, "save_steps": 2, "save_total_limit": 3},
        "output": {"dir": str(ws / "run")},
    }  # fmt: skip
    (ws / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(["finetune", str(ws / "recipe.yaml"), "--max-steps", "4"], capsys)
    assert code == 0, err
    run = ws / "run"
    assert (run / RUN_MARKER).is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (run / "summary.json").unlink()  # the train stage is not done: a rerun resumes from the newest checkpoint
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()
    _truncate(run / "checkpoint-4" / "adapter_model.safetensors")
    damaged_files = snapshot(run / "checkpoint-4")
    code, _, err = run_cli(["finetune", str(ws / "recipe.yaml"), "--max-steps", "4"], capsys)
    assert code == 0, err
    assert f"skipped {run}/checkpoint-4: adapter_model.safetensors is truncated" in err
    assert "(moved to damaged-checkpoint-4); resuming from checkpoint-2" in err
    assert snapshot(run / "damaged-checkpoint-4") == damaged_files  # kept as it was
    assert (run / "adapter_model.safetensors").is_file() and (run / "checkpoint-4" / "trainer_state.json").is_file()


# ------------------------------------------------------------------------------ summaries, chat input, Modelfile


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        ('{"train": {"steps": "many", "eval_loss": "low"}}', "note: skipped"),
        ('{"train": 5}', None),
        ('{"train": {"steps": 3, "eval_loss": [1, 2]}}', "note: skipped"),
        ('{"eval": {"mmlu": {"overall": {"acc": "high"}}}}', None),
        ("[1, 2, 3]", None),
        ("{not json", None),
        ('{"description": {"method": "[bold red]x[/]", "base_text": "[/]"}}', None),
    ],
)
def test_runs_lists_around_a_damaged_summary(content, shown, tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    (root / "good").mkdir(parents=True)
    (root / "good" / "summary.json").write_text(json.dumps({"train": {"steps": 7}}))
    (root / "[bold]bad").mkdir()
    (root / "[bold]bad" / "summary.json").write_text(content)
    before = snapshot(root)
    code, out, err = run_cli(["runs", str(root)], capsys)
    assert code == 0 and "Traceback" not in err and "error:" not in err, err
    assert "good" in out and "7" in out
    if shown:
        assert shown in err and "[bold]bad/summary.json" in err
    else:
        assert "[bold]bad" in out  # shown as its name, not read as markup
    assert snapshot(root) == before


@pytest.mark.parametrize("data", [b"hello \xff\xfe world\n", b"\x80" * 64, b"ok\n\xc3\x28\n"])
def test_chat_binary_stdin_is_one_line(data: bytes, tiny_lora_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_lora_run, run)
    before = snapshot(tmp_path)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    code, _, err = run_cli(["chat", str(run), "--max-new-tokens", "2"], capsys)
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert code == 2 and errors and errors[0].startswith("error: <stdin>: not UTF-8 text"), err
    assert len(errors) == 1 and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_chat_line_without_end_is_bounded(tiny_lora_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from velora_cli.infer import chat

    monkeypatch.setattr(chat, "MAX_LINE", 64)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"x" * 1000), encoding="utf-8"))
    code, _, err = run_cli(["chat", str(tiny_lora_run), "--max-new-tokens", "2"], capsys)
    assert code == 2 and "error: <stdin>: a line longer than 64 characters" in err, err


def parse_modelfile(text: str) -> dict[str, object]:
    """Ollama's Modelfile parser (parser/parser.go ParseFile), rune for rune: what `ollama create` reads.
    Commands by name (the first of each), PARAMETERs as name -> list of values."""

    def unquote(s: str) -> tuple[str, bool]:
        if s[:3] == '"""':
            return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
        if s[:1] == '"':
            return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
        return s, True

    def step(r: str, state: str) -> tuple[str, str]:  # parseRuneForState
        if state == "nil":
            return ("comment", "") if r == "#" else ("nil", "") if r in " \t\r\n" else ("name", r)
        if state == "name":
            if r.isascii() and r.isalpha():
                return "name", r
            if r not in " \t":
                raise ValueError("invalid command")  # Ollama: command must be one of "from", ...
            return "value", ""
        if state == "parameter":
            if (r.isascii() and r.isalnum()) or r == "_":
                return "parameter", r
            assert r in " \t"
            return "value", ""
        if state == "value":
            return ("nil", r) if r in " \t\r\n" else ("value", r)
        return ("nil", "") if r in "\r\n" else ("comment", "")

    out: dict[str, object] = {}

    def emit(name: str, value: str, parameter: bool) -> None:
        if parameter:
            out.setdefault(name, []).append(value)  # type: ignore[union-attr]
        else:
            out.setdefault(name, value)

    state, buf, name, parameter = "nil", "", "", False
    for ch in text:
        nxt, r = step(ch, state)
        if nxt != state:
            if state == "name":
                word = buf.lower()
                parameter = word == "parameter"
                if parameter:
                    nxt = "parameter"
                name = "model" if word == "from" else word
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, ok = unquote(buf.strip())
                if not ok or r in " \t":
                    buf += r
                    continue
                emit(name, value, parameter)
            buf, state = "", nxt
        if r and r.isprintable():
            buf += r
    if state == "value":
        value, ok = unquote(buf.strip())
        assert ok, "unexpected EOF"
        emit(name, value, parameter)
    return out


SYSTEMS = [
    "Be terse.",
    'He said "hi"',
    'ends with a quote"',
    '"starts with a quote',
    'two ""',
    'inner """triple""" quotes',
    'ends with three """',
    "multi\nline\n\nprompt",
    "tabs\tand  spaces ",
    " leading space",
    "{{ .System }} {% raw %} Go and Jinja markers",
    "back\\slash \\n not a newline",
    "unicode: é, 中文, emoji 🎉",
    "FROM /etc/passwd",
    'a """ b',
    'x"""\ny',
    'x"""  \ny',
    '"""\n',
    'carriage """\r return',
    "bell\x07",
    "zero\u200bwidth",
]


@pytest.mark.parametrize("system", SYSTEMS, ids=[f"system-{i}" for i in range(len(SYSTEMS))])
def test_modelfile_system_reads_back_unchanged_or_is_refused(system: str, tiny_lora_run: Path) -> None:
    from transformers import AutoTokenizer

    from velora_cli.common.errors import UsageError
    from velora_cli.data.templates import PromptStyle
    from velora_cli.export.modelfile import modelfile

    tokenizer = AutoTokenizer.from_pretrained(tiny_lora_run)
    try:
        text = modelfile("model.gguf", PromptStyle("chat", system), tokenizer, 512)
    except UsageError as exc:
        assert str(exc).startswith("Modelfile SYSTEM") and "\n" not in str(exc)
        return
    parsed = parse_modelfile(text)
    assert parsed["system"] == system
    assert parsed["model"] == "./model.gguf"
    assert "<|im_end|>" in parsed["stop"]


@pytest.mark.parametrize("stop", ["### Instruction:", "<|im_end|>", 'say "stop"', '""x', "tab\there", "two\nlines", "a\"", '"'])
def test_modelfile_stop_strings_read_back(stop: str) -> None:
    from velora_cli.export.modelfile import _stop

    assert parse_modelfile(f"FROM x\nPARAMETER stop {_stop(stop)}\nPARAMETER num_ctx 8\n")["stop"] == [stop]


def test_the_ported_parser_reads_what_ollama_documents() -> None:
    text = 'FROM ./m.gguf\n# comment\nSYSTEM """multi\nline"""\nTEMPLATE "{{ .Prompt }}"\nPARAMETER stop "<|im_end|>"\n'
    assert parse_modelfile(text) == {"model": "./m.gguf", "system": "multi\nline", "template": "{{ .Prompt }}",
                                     "stop": ["<|im_end|>"]}  # fmt: skip
    # Where velora's old quoting went wrong: three quotes at a line's end end the value, and the rest is no command.
    with pytest.raises(ValueError, match="invalid command"):
        parse_modelfile('FROM x\nSYSTEM """a"""\nb"""\n')


@pytest.mark.parametrize("system", SYSTEMS, ids=[f"system-{i}" for i in range(len(SYSTEMS))])
def test_chat_prompt_carries_the_system_text_verbatim(system: str, tiny_lora_run: Path) -> None:
    """The system prompt is a message, never part of a template: Jinja and Go markers in it stay text."""
    from transformers import AutoTokenizer

    from velora_cli.data.templates import ALPACA_CHAT_TEMPLATE, PromptStyle, render

    tokenizer = AutoTokenizer.from_pretrained(tiny_lora_run)
    prompt = render(PromptStyle("chat", system), tokenizer, [{"role": "user", "content": "q"}])
    assert system in prompt
    alpaca = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": "q"}],
                                           chat_template=ALPACA_CHAT_TEMPLATE, tokenize=False)  # fmt: skip
    assert alpaca.startswith(system)


def test_bounds_helpers(tmp_path: Path) -> None:
    assert bounds.clip("x" * 10) == repr("x" * 10)
    cut = bounds.clip("y" * 10_000)
    assert len(cut) < 260 and cut.endswith("(10002 characters)")
    os.mkfifo(tmp_path / "p")
    with pytest.raises(Exception, match="is a FIFO"):
        bounds.check_regular(tmp_path / "p")
    bounds.check_regular(tmp_path / "missing")  # the reader names a missing file itself


def test_export_force_through_a_symlink_replaces_the_link_not_the_folder(tiny_lora_run: Path, tmp_path: Path,
                                                                         capsys) -> None:  # fmt: skip
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# mine\n")
    (tmp_path / "link").symlink_to(project, target_is_directory=True)
    before = snapshot(project)
    code, _, err = run_cli(["export", str(tiny_lora_run), "--adapter-only", "--force", "--out", str(tmp_path / "link")],
                           capsys)  # fmt: skip
    assert code == 0, err
    assert snapshot(project) == before  # the folder the link pointed at is untouched
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link" / EXPORT_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "project"]  # no `.link.old-*` left behind


@pytest.mark.parametrize(
    ("raised", "line"),
    [
        (pickle.UnpicklingError("Weights only load failed: Unsupported global: posix.system"),
         "error: damaged or unsafe file (UnpicklingError): Weights only load failed"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "error: input is not UTF-8 text (byte 0"),
    ],
)
def test_the_net_below_the_checks_is_one_line(raised, line, monkeypatch, capsys) -> None:
    """A damaged file that no check caught first (the checks name the file) still ends in one line, not a traceback."""
    import velora_cli.infer.generate as generate

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(generate, "run_generate", fail)
    code, _, err = run_cli(["generate", "x", "--prompt", "hi"], capsys)
    assert code == 1 and err.startswith(line) and len(err.strip().splitlines()) == 1, err
