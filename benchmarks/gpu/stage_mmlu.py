"""The MMLU stage: velora's cached-prefix scorer (`velora_cli.eval.scorer.score_mmlu`, as `velora eval --mmlu`
runs it: 5-shot, batch 8) timed on a random bf16 7B-shaped model over the prompt lengths of all 14,042 MMLU test
questions. Time only: the weights are random, so the predictions mean nothing.

Prompt lengths come from mmlu_lengths.json beside this file, measured on the original CSVs (../shared/data/mmlu)
with the embedded SmolLM2 tokenizer (GPT-2-style BPE, 49,152 tokens; LLaMA's 32k SentencePiece makes somewhat
more tokens of the same text) by `python benchmarks/gpu/stage_mmlu.py ../shared/data/mmlu`: per subject the
token count of each dev shot and each test question as the prompt formats them. The GPU machine has no
../shared, hence the file. The timed run rebuilds questions of those lengths from random words under a
word-level tokenizer (a token per word or punctuation mark, BOS first; " A".." D" are single tokens, as in
LLaMA's), so the scorer's own code runs as on the real data: shots dropped where a prompt overflows the 2,048
context, the shared prefix cached once per subject, the questions batched by length. Subjects run in file order
while the stage's budget lasts; the JSON has per-subject times and, when cut short, the questions done and the
full run's time extrapolated from them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import SHAPES, free_memory, random_model

LENGTHS = Path(__file__).with_name("mmlu_lengths.json")
SHOTS = 5
QUESTION_OVERHEAD = 14  # word-level tokens around a question: 4 x ("X", ".", choice), "Answer", ":"
SPECIAL = ["<unk>", "<s>", "</s>", "A", "B", "C", "D", ".", ":", "Answer", "(", ")"]


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of `vocab_size` ids: the prompt's fixed words, then w0, w1, ... (BOS prepended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + [f"w{i}" for i in range(vocab_size - len(SPECIAL))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")  # fmt: skip
    return fast, len(words) - len(SPECIAL)


def synthetic_subjects(lengths: dict[str, Any], n_words: int, limit: int | None) -> dict[str, Any]:
    """SubjectData per subject whose formatted shots and questions have the recorded token counts."""
    from velora_cli.eval.mmlu_data import Question, SubjectData

    rng = random.Random(6)

    def question(subject: str, index: int, tokens: int, overhead: int) -> Question:
        text = " ".join(f"w{rng.randrange(n_words)}" for _ in range(max(1, tokens - overhead)))
        return Question(subject, index, text, ("w0", "w1", "w2", "w3"), index % 4)

    out = {}
    for subject, rec in lengths["subjects"].items():
        shots = [question(subject, i, n, QUESTION_OVERHEAD + 1) for i, n in enumerate(rec["shots"])]
        counts = rec["questions"][:limit] if limit else rec["questions"]
        out[subject] = SubjectData([question(subject, i, n, QUESTION_OVERHEAD) for i, n in enumerate(counts)], shots)
    return out


def mmlu_full_stage(args: argparse.Namespace, shape: str) -> dict[str, Any]:
    from velora_cli.eval.scorer import score_mmlu

    lengths = json.loads(LENGTHS.read_text(encoding="utf-8"))
    tokenizer, n_words = word_tokenizer(min(SHAPES[shape]["vocab_size"], 32000))
    subjects = args.mmlu_subjects or list(lengths["subjects"])
    data = synthetic_subjects({"subjects": {s: lengths["subjects"][s] for s in subjects}}, n_words, args.mmlu_limit)
    total = sum(len(d.questions) for d in data.values())
    model = random_model(shape, args.torch_device).eval()
    with torch.inference_mode():  # first-call overheads (allocator, kernels) are paid before timing
        model(input_ids=torch.tensor([tokenizer("w1 w2 w3").input_ids], device=args.torch_device))
    clock = args.clock.within(args.mmlu_budget_s)
    out: dict[str, Any] = {"shape": shape, "source": f"{LENGTHS.name}: {lengths['source']}",
                           "tokenizer_of_lengths": lengths["tokenizer"], "questions_in_file": lengths["questions"],
                           "questions_selected": total, "batch_size": args.mmlu_batch, "shots": SHOTS,
                           "subjects": {}}  # fmt: skip
    done = fewer = tokens = 0
    seconds = 0.0
    for subject, subject_data in data.items():
        if clock.left <= 0:
            break
        began = time.perf_counter()
        preds = score_mmlu(model, tokenizer, {subject: subject_data}, shots=SHOTS, batch_size=args.mmlu_batch)
        if args.torch_device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - began
        seconds += took
        done += len(preds)
        fewer += sum(p.shots < SHOTS for p in preds)
        tokens += sum(lengths["subjects"][subject]["questions"][: len(preds)])
        out["subjects"][subject] = {"questions": len(preds), "seconds": round(took, 3)}
    out.update(questions_done=done, scoring_s=round(seconds, 2), prompts_with_fewer_shots=fewer,
               question_tokens_done=tokens, complete=done == total)  # fmt: skip
    if done:
        out["questions_per_s"] = round(done / seconds, 2)
        out["extrapolated_all_questions_s"] = round(seconds / done * lengths["questions"], 1)
    model = None
    free_memory()
    return out


def write_lengths(data_dir: Path) -> None:
    """mmlu_lengths.json from the original CSVs, with the embedded SmolLM2 tokenizer."""
    from velora_cli.config.presets import DEFAULT_MODEL
    from velora_cli.eval.mmlu_data import load_mmlu
    from velora_cli.eval.mmlu_prompts import format_question
    from velora_cli.models.load import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(DEFAULT_MODEL))

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]

    subjects = {}
    for subject, data in load_mmlu(data_dir, shots=SHOTS).items():
        subjects[subject] = {"shots": count([format_question(q, with_answer=True) for q in data.shots[:SHOTS]]),
                             "questions": count([format_question(q, with_answer=False) for q in data.questions])}
    record = {"source": f"{data_dir.name} test + dev CSVs (original MMLU layout)", "tokenizer": DEFAULT_MODEL,
              "questions": sum(len(s["questions"]) for s in subjects.values()), "subjects": subjects}  # fmt: skip
    LENGTHS.write_text(json.dumps(record, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"{LENGTHS}: {record['questions']} questions, {len(subjects)} subjects")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    write_lengths(Path(sys.argv[1]))
