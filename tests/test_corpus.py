"""Plain-text corpora (velora_cli/data/corpus.py): what a directory or glob is read as (text documents or a dataset,
never an ambiguous mix of both), and a streamed run resumed mid-stream ending where an uninterrupted one ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import c4_like, run_cli
from safetensors.torch import load_file

from velora_cli.common.errors import DataError
from velora_cli.config.load import validate_recipe
from velora_cli.data.corpus import iter_documents
from velora_cli.finetune.session import FinetuneSession

BLOCK = 192
MIXED = "is a data file among 2 text files; a source is read either as text documents (.txt, .md, .text) or as a "


def text_folder(root: Path) -> Path:
    """Two text files (one in a subfolder), a hidden data file and a script: only the text is documents."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Alpha one.\n\nAlpha two.")
    (root / "sub" / "b.md").write_text("Beta one.")
    (root / ".cache").mkdir()
    (root / ".cache" / "state.json").write_text("{}")  # hidden, as datasets' and editors' leftovers are
    (root / "make.py").write_text("print('not a document')")
    return root


def test_a_text_folder_reads_its_text_and_a_stray_data_file_is_refused_before_a_model_loads(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch, capsys
) -> None:
    folder = text_folder(tmp_path / "texts")
    assert list(iter_documents(str(folder))) == ["Alpha one.", "Alpha two.", "Beta one."]

    (folder / "stray.json").write_text(json.dumps([{"text": "a row"}]))  # was: the whole folder read as JSON rows
    with pytest.raises(DataError) as err:
        list(iter_documents(str(folder)))
    assert str(err.value).startswith(f"data.path {folder}: {folder / 'stray.json'} {MIXED}")
    with pytest.raises(DataError, match=r"stray\.json is a data file among 1 text files"):
        list(iter_documents(f"{folder}/*"))  # a glob matching both kinds: the same refusal
    assert list(iter_documents(f"{folder}/**/*.[tm][xd]*")) == ["Alpha one.", "Alpha two.", "Beta one."]

    import velora_cli.models.full

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(velora_cli.models.full, "build_full_model", no_model)
    recipe = {"method": "pretrain", "model": {"config": str(tiny_llama_dir)},
              "data": {"path": str(folder), "cutoff_len": 16}, "train": {"max_steps": 1},
              "output": {"dir": str(tmp_path / "run")}}  # fmt: skip
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(["finetune", str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{folder / 'stray.json'} {MIXED}" in err


def test_a_dataset_dir_with_a_stray_text_file_is_refused_unless_its_card_names_the_data(tmp_path: Path) -> None:
    rows = tmp_path / "rows"
    rows.mkdir()
    for name in ("part-0.jsonl", "part-1.jsonl"):
        (rows / name).write_text("".join(json.dumps({"text": f"{name} row {i}"}) + "\n" for i in range(3)))
    assert len(list(iter_documents(str(rows)))) == 6
    (rows / "notes.txt").write_text("what these rows are")
    with pytest.raises(DataError, match=r"notes\.txt is a text file among 2 data files"):
        list(iter_documents(str(rows)))

    hub = c4_like(tmp_path / "c4")  # the card's configs say which files are data: a LICENSE.md beside them is fine
    (hub / "LICENSE.md").write_text("ODC-BY")
    docs = list(iter_documents(str(hub), subset="en"))
    assert len(docs) == 30 and docs[0].startswith("train page 0:")


def steps_seen(crash_at: int | None = None, seen: list[int] | None = None):
    """A callback recording the steps this process trains (into `seen`), raising during step `crash_at`."""
    from transformers import TrainerCallback

    class _Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if seen is not None:
                seen.append(state.global_step)
            if state.global_step == crash_at:
                raise RuntimeError("simulated crash")

    return _Steps()


def streamed_run(source: Path, model_dir: Path, run_dir: Path, callbacks=()) -> None:
    recipe = validate_recipe({
        "name": "s", "method": "pretrain", "model": {"config": str(model_dir)},
        "velora": {"layers": ["v", "d"], "num_groups": 8},
        "data": {"path": str(source), "subset": "en", "streaming": True, "val_split": "validation",
                 "val_set_size": 8, "cutoff_len": BLOCK},
        "train": {"micro_batch_size": 2, "batch_size": 2, "max_steps": 6, "learning_rate": 1e-2, "logging_steps": 1,
                  "save_steps": 4, "save_total_limit": 3, "seed": 0},
        "output": {"dir": str(run_dir)},
    })  # fmt: skip
    session = FinetuneSession(recipe, run_dir)
    session.setup()
    for cb in callbacks:
        session.trainer.add_callback(cb)
    session.train(display=False)
    session.save()


@pytest.mark.slow
def test_a_streamed_run_resumed_mid_stream_ends_bit_identical(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Killed during step 5, resumed from checkpoint-4: the Trainer re-reads the stream from its start and skips
    the 8 blocks already trained on, RNG and optimizer states restored. The stream is shorter than that, so the
    checkpoint lies in its second pass: the blocks run on across the seam (no epoch ends), or the skip would land
    elsewhere."""
    from transformers import AutoTokenizer

    from velora_cli.data.corpus import iter_blocks

    source = c4_like(tmp_path / "c4")
    one_pass = iter_documents(str(source), subset="en", streaming=True)
    assert sum(1 for _ in iter_blocks(one_pass, AutoTokenizer.from_pretrained(tiny_llama_dir), BLOCK)) < 4 * 2
    streamed_run(source, tiny_llama_dir, tmp_path / "straight")
    with pytest.raises(RuntimeError, match="simulated crash"):
        streamed_run(source, tiny_llama_dir, tmp_path / "crashed", [steps_seen(crash_at=5)])
    seen: list[int] = []
    streamed_run(source, tiny_llama_dir, tmp_path / "crashed", [steps_seen(seen=seen)])
    assert seen == [5, 6]  # resumed from checkpoint-4, not trained again from the start
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "crashed" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]  # fmt: skip
    assert steps == [1, 2, 3, 4, 5, 6]
