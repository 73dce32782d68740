"""5-shot MMLU: `velora eval --mmlu`, and the evaluation API the finetune pipeline calls.

Owns the MMLU data loading, the prompt format, the scoring of a model on it, the per-subject / per-category /
overall accuracy, and the `eval` command's output (rich table, JSON, per-question JSONL).

Protocol - that of lm-evaluation-harness's `mmlu` task, itself the original evaluation of Hendrycks et al.:

- Data: `cais/mmlu` (config `all`) from the Hugging Face hub, or a local directory in the original CSV layout
  (`dev/{subject}_dev.csv`, `val/{subject}_val.csv`, `test/{subject}_test.csv`; rows `question,A,B,C,D,answer`,
  no header). `--split validation` reads `val/`.
- Prompt for subject `s` with `k` shots (the first `k` dev questions in file order, lm-eval's `first_n`)::

      The following are multiple choice questions (with answers) about {s with "_" -> " "}.\\n\\n
      {shot question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n      (k times)
      {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:

  The question text is stripped of surrounding whitespace (lm-eval's `question.strip()`); choices are kept as
  written. The original script writes "about  abstract algebra" with two spaces; lm-eval and velora use one.
  When the dev split itself is evaluated a question is never its own shot.
- Context limit: a prompt longer than the model's context (`max_position_embeddings`, or the tokenizer's
  `model_max_length` when smaller) loses shots from the end, one at a time, until it fits (the original
  script's rule); one that does not fit even with no shots keeps its last tokens (lm-eval's rule). The JSON
  counts such prompts (`prompts_with_fewer_shots`).
- Tokens: `tokenizer(prompt)` with the tokenizer's default special tokens (a BOS for LLaMA, as in the
  original script; lm-eval's HF backend adds none unless asked to).
- Score: the log-likelihood of each continuation " A", " B", " C", " D" after the prompt (lm-eval's
  `loglikelihood`, continuation tokens split off `tokenizer(prompt + " A")` the way lm-eval does); the prediction
  is the argmax (first letter on a tie). Accuracy per subject, per category (lm-eval's mapping of the 57
  subjects onto STEM / humanities / social sciences / other; the original categories.py differs only in putting
  anatomy under "other"), and overall as all questions pooled: the size-weighted mean, the paper's
  "mean 5-shot MMLU accuracy".

Speed. Every prompt of a subject starts with the same header and shots, so the fast path runs that shared
prefix through the model once, keeps its KV cache and feeds only each question's own tokens, in right-padded
batches (attention mask over prefix + real tokens, explicit positions), asking the model for logits at the last
real position only. The shared prefix is the longest common *token* prefix of the full prompts' tokenisations,
not the tokenised prefix text: BPE merges across the prefix/question boundary (SmolLM2 encodes a lone "\\n\\n"
as one token but "\\n\\nWhat" as "\\n", "\\n", "What"), so feeding the cached prefix plus the remaining tokens is
exactly the full prompt's token sequence. When all four letters are single next tokens (checked per subject),
one forward pass scores a question; otherwise each letter's continuation is scored in full.
`reference=True` runs the straightforward path (one full prompt per forward, full logits) for comparison;
benchmarks/mmlu_speed.py measures both.

A finetune run is evaluated as trained: the base model from RUN_DIR/recipe.yaml with its quantization, plus the
LoRA adapter. VeLoRA only changes what the backward pass stores, so inference needs the adapter alone.
"""

from __future__ import annotations

import csv
import difflib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from velora_cli.errors import DataError, UsageError

LETTERS = ("A", "B", "C", "D")
SPLITS = {"test": "test", "validation": "val", "dev": "dev"}  # --split name -> directory / file suffix
QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
HUB_DATASET = ("cais/mmlu", "all")
CATEGORIES = ("STEM", "humanities", "social sciences", "other")
UNCATEGORIZED = "uncategorized"  # subjects of a user's own data outside the 57

# lm-evaluation-harness's subject -> category mapping (lm_eval/tasks/mmlu/_generate_configs.py).
SUBJECT_CATEGORIES: dict[str, str] = {
    **dict.fromkeys(
        [
            "abstract_algebra",
            "anatomy",
            "astronomy",
            "college_biology",
            "college_chemistry",
            "college_computer_science",
            "college_mathematics",
            "college_physics",
            "computer_security",
            "conceptual_physics",
            "electrical_engineering",
            "elementary_mathematics",
            "high_school_biology",
            "high_school_chemistry",
            "high_school_computer_science",
            "high_school_mathematics",
            "high_school_physics",
            "high_school_statistics",
            "machine_learning",
        ],
        "STEM",
    ),
    **dict.fromkeys(
        [
            "formal_logic",
            "high_school_european_history",
            "high_school_us_history",
            "high_school_world_history",
            "international_law",
            "jurisprudence",
            "logical_fallacies",
            "moral_disputes",
            "moral_scenarios",
            "philosophy",
            "prehistory",
            "professional_law",
            "world_religions",
        ],
        "humanities",
    ),
    **dict.fromkeys(
        [
            "econometrics",
            "high_school_geography",
            "high_school_government_and_politics",
            "high_school_macroeconomics",
            "high_school_microeconomics",
            "high_school_psychology",
            "human_sexuality",
            "professional_psychology",
            "public_relations",
            "security_studies",
            "sociology",
            "us_foreign_policy",
        ],
        "social sciences",
    ),
    **dict.fromkeys(
        [
            "business_ethics",
            "clinical_knowledge",
            "college_medicine",
            "global_facts",
            "human_aging",
            "management",
            "marketing",
            "medical_genetics",
            "miscellaneous",
            "nutrition",
            "professional_accounting",
            "professional_medicine",
            "virology",
        ],
        "other",
    ),
}


def category_of(subject: str) -> str:
    return SUBJECT_CATEGORIES.get(subject, UNCATEGORIZED)


# ---------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Question:
    subject: str
    index: int  # position in its split file (0-based)
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3


@dataclass
class SubjectData:
    questions: list[Question]  # the split being evaluated (after --limit)
    shots: list[Question]  # the dev pool the shots come from, in file order
    shots_from_same_split: bool = False  # split == dev: skip a question's own row


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_csv(path: Path, subject: str) -> list[Question]:
    """One MMLU CSV file; DataError naming the file and line of the first malformed row."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    questions: list[Question] = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        line = 1  # first physical line of the next record (a quoted field may span lines)
        try:
            for row in reader:
                if row and any(field.strip() for field in row):
                    if len(row) != 6:
                        raise DataError(f"{path}:{line}: expected 6 fields (question,A,B,C,D,answer), got {len(row)}")
                    letter = row[5].strip()
                    if letter not in LETTERS:
                        raise DataError(f"{path}:{line}: answer must be one of A, B, C, D, got {row[5]!r}")
                    questions.append(
                        Question(
                            subject, len(questions), row[0], (row[1], row[2], row[3], row[4]), LETTERS.index(letter)
                        )
                    )
                line = reader.line_num + 1
        except csv.Error as exc:
            raise DataError(f"{path}:{line}: malformed CSV ({exc})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
    return questions


def available_subjects(data_dir: Path, split: str) -> list[str]:
    folder = SPLITS[split]
    return sorted(p.name[: -len(f"_{folder}.csv")] for p in (data_dir / folder).glob(f"*_{folder}.csv"))


def _select_subjects(requested: list[str] | None, available: Sequence[str], where: str) -> list[str]:
    if not requested:
        return list(available)
    for name in requested:
        if name not in available:
            raise UsageError(f"unknown MMLU subject {name!r} in {where}{_did_you_mean(name, available)}")
    return list(dict.fromkeys(requested))


def _limit(questions: list[Question], limit: int | None) -> list[Question]:
    return questions[:limit] if limit else questions


def load_local(
    data_dir: Path, *, split: str, subjects: list[str] | None, limit: int | None, shots: int
) -> dict[str, SubjectData]:
    """MMLU from a directory in the original CSV layout."""
    if not data_dir.is_dir():
        raise UsageError(f"MMLU data directory not found: {data_dir}")
    folder = SPLITS[split]
    available = available_subjects(data_dir, split)
    if not available:
        raise UsageError(
            f"{data_dir}: no {folder}/*_{folder}.csv files (expected the original MMLU layout: dev/, val/, test/)"
        )
    out: dict[str, SubjectData] = {}
    for subject in _select_subjects(subjects, available, str(data_dir / folder)):
        questions = read_csv(data_dir / folder / f"{subject}_{folder}.csv", subject)
        pool: list[Question] = []
        if shots:
            dev = data_dir / "dev" / f"{subject}_dev.csv"
            if not dev.is_file():
                raise DataError(f"{dev}: file not found; the few-shot examples come from it (or use --shots 0)")
            pool = questions if split == "dev" else read_csv(dev, subject)
        out[subject] = SubjectData(_limit(questions, limit), pool, split == "dev")
    return out


def load_hub(*, split: str, subjects: list[str] | None, limit: int | None) -> dict[str, SubjectData]:
    """MMLU from the Hugging Face hub (`cais/mmlu`, config `all`)."""
    chosen = _select_subjects(subjects, sorted(SUBJECT_CATEGORIES), HUB_DATASET[0])
    try:
        import datasets

        dataset = datasets.load_dataset(*HUB_DATASET)
    except Exception as exc:  # offline, missing package, hub error: all mean "use local files"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot load {HUB_DATASET[0]} from the Hugging Face hub ({text}); pass --data-dir (or set "
            "VELORA_MMLU_DIR) to MMLU in the original CSV layout"
        ) from None

    def by_subject(part: str) -> dict[str, list[Question]]:
        grouped: dict[str, list[Question]] = defaultdict(list)
        for row in dataset[part]:
            if row["subject"] in chosen:
                rows = grouped[row["subject"]]
                rows.append(Question(row["subject"], len(rows), row["question"], tuple(row["choices"]), row["answer"]))
        return grouped

    evaluated = by_subject(split)
    pool = evaluated if split == "dev" else by_subject("dev")
    return {s: SubjectData(_limit(evaluated[s], limit), pool[s], split == "dev") for s in chosen if evaluated[s]}


def load_mmlu(
    data_dir: Path | None,
    *,
    split: str = "test",
    subjects: list[str] | None = None,
    limit: int | None = None,
    shots: int = 5,
) -> dict[str, SubjectData]:
    if split not in SPLITS:
        raise UsageError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if data_dir is not None:
        return load_local(Path(data_dir), split=split, subjects=subjects, limit=limit, shots=shots)
    return load_hub(split=split, subjects=subjects, limit=limit)


# -------------------------------------------------------------------------------------------------- prompts


def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question.strip() + "".join(
        f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True)
    )
    text += "\nAnswer:"
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def prompt_prefix(subject: str, shots: Sequence[Question]) -> str:
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    return header + "".join(format_question(s, with_answer=True) for s in shots)


def shots_for(data: SubjectData, q: Question, k: int) -> list[Question]:
    pool = [s for s in data.shots if s.index != q.index] if data.shots_from_same_split else data.shots
    return pool[:k]


def build_prompt(subject: str, shots: Sequence[Question], q: Question) -> str:
    return prompt_prefix(subject, shots) + format_question(q, with_answer=False)


# -------------------------------------------------------------------------------------------------- scoring


@dataclass
class Prediction:
    subject: str
    index: int
    gold: str
    pred: str
    loglik: list[float]  # log p(" A"), ..., log p(" D")
    shots: int  # shots in this question's prompt (fewer than asked when the context was too short)


@dataclass
class _Prompt:
    q: Question
    k: int
    prefix: str  # header + shots
    ids: list[int]  # the full prompt's tokens


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def context_length(model: Any, tokenizer: Any) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    # Tokenizers without a limit report int(1e30); ignore such placeholders.
    real = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**7]
    return min(real) if real else 2048


class MmluScorer:
    """Scores MMLU prompts with one model: the cached-prefix batched path, or the straightforward reference."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or context_length(model, tokenizer)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts).input_ids

    def prompts(self, subject: str, data: SubjectData, shots: int) -> list[_Prompt]:
        """Full prompts with as many of `shots` shots as the context allows."""
        out = []
        firsts = [prompt_prefix(subject, shots_for(data, q, shots)) for q in data.questions]
        full = [p + format_question(q, with_answer=False) for p, q in zip(firsts, data.questions, strict=True)]
        for q, prefix, ids in zip(data.questions, firsts, self.encode(full), strict=True):
            k = len(shots_for(data, q, shots))
            while len(ids) > self.max_length and k > 0:
                k -= 1
                prefix = prompt_prefix(subject, shots_for(data, q, k))
                ids = self.encode([prefix + format_question(q, with_answer=False)])[0]
            if len(ids) > self.max_length:
                ids = ids[-self.max_length :]
            out.append(_Prompt(q, k, prefix, ids))
        return out

    def continuations(self, prompt: _Prompt) -> list[list[int]]:
        """Tokens of " A".." D" after this prompt, split off `tokenizer(prompt + " A")` as lm-eval does.

        Every prompt ends in "\\nAnswer:", so the split found on one prompt holds for all of a subject's.
        """
        text = prompt.prefix + format_question(prompt.q, with_answer=False)
        n = len(self.encode([text])[0])
        return [ids[n:] for ids in self.encode([f"{text} {letter}" for letter in LETTERS])]

    @torch.inference_mode()
    def score(
        self,
        subject: str,
        data: SubjectData,
        shots: int,
        *,
        reference: bool = False,
        progress: Callable[[float], None] | None = None,
    ) -> list[Prediction]:
        prompts = self.prompts(subject, data, shots)
        if not prompts:
            return []
        conts = self.continuations(prompts[0])
        # A continuation must leave room: trim the prompt's oldest tokens if prompt + continuation overflows.
        longest = max(len(c) for c in conts)
        for p in prompts:
            if len(p.ids) + longest - 1 > self.max_length:
                p.ids = p.ids[len(p.ids) + longest - 1 - self.max_length :]
        if reference:
            scores = []
            for p in prompts:
                scores.append(self._score_reference(p.ids, conts))
                if progress:
                    progress(1)
        else:
            scores = [None] * len(prompts)
            groups: dict[int, list[int]] = defaultdict(list)  # shots used -> prompt positions
            for i, p in enumerate(prompts):
                groups[p.k].append(i)
            for members in groups.values():
                for i, s in zip(
                    members, self._score_group([prompts[i] for i in members], conts, progress), strict=True
                ):
                    scores[i] = s
        return [
            Prediction(subject, p.q.index, LETTERS[p.q.answer], LETTERS[int(torch.tensor(s).argmax())], s, p.k)
            for p, s in zip(prompts, scores, strict=True)
        ]

    def _score_reference(self, ids: list[int], conts: list[list[int]]) -> list[float]:
        """One prompt per forward pass with logits at every position: the straightforward evaluation."""
        if all(len(c) == 1 for c in conts):
            logits = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False).logits[0, -1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            return [float(logprobs[c[0]]) for c in conts]
        out = []
        for cont in conts:
            logits = self.model(input_ids=torch.tensor([ids + cont], device=self.device), use_cache=False).logits[0]
            logprobs = torch.log_softmax(logits[len(ids) - 1 : -1].float(), dim=-1)
            out.append(float(logprobs.gather(1, torch.tensor(cont, device=self.device)[:, None]).sum()))
        return out

    def _score_group(
        self, prompts: list[_Prompt], conts: list[list[int]], progress: Callable[[float], None] | None
    ) -> list[list[float]]:
        """Prompts that share their shots: cache the common token prefix once, then batch the rest."""
        single = all(len(c) == 1 for c in conts) and len({c[0] for c in conts}) == len(conts)
        shared = min(_common_prefix_len(prompts[0].ids, p.ids) for p in prompts)
        shared = min(shared, min(len(p.ids) for p in prompts) - 1)  # every row keeps at least one token to feed
        cache = None
        if shared > 0:
            prefix = torch.tensor([prompts[0].ids[:shared]], device=self.device)
            cache = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values

        # Rows: the tokens after the shared prefix; single-token letters need one row per question and only the
        # last position's logits, otherwise one row per (question, letter) with logits over the continuation.
        rows: list[tuple[int, int, list[int], list[int]]] = []  # (prompt position, letter, tokens, targets)
        for i, p in enumerate(prompts):
            tail = p.ids[shared:]
            if single:
                rows.append((i, 0, tail, []))
            else:
                rows.extend((i, j, tail + c, c) for j, c in enumerate(conts))
        results = [[0.0] * len(conts) for _ in prompts]
        letter_ids = torch.tensor([c[0] for c in conts], device=self.device)
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]))  # similar lengths -> little padding
        per_batch = self.batch_size if single else self.batch_size * len(conts)
        for start in range(0, len(order), per_batch):
            batch = [rows[r] for r in order[start : start + per_batch]]
            logprobs = self._forward(cache, shared, [b[2] for b in batch], [len(b[3]) for b in batch])
            for (i, letter, _, target), lp in zip(batch, logprobs, strict=True):
                if single:
                    results[i] = lp[-1, letter_ids].tolist()
                else:
                    results[i][letter] = float(lp.gather(1, torch.tensor(target, device=self.device)[:, None]).sum())
            if progress:
                progress(len({b[0] for b in batch}) if single else len(batch) / len(conts))
        return results

    def _forward(self, cache: Any, shared: int, rows: list[list[int]], n_targets: list[int]) -> list[torch.Tensor]:
        """Log-probabilities for right-padded rows fed after a cached prefix of `shared` tokens.

        A row with n > 0 target tokens (its last n) gets the n distributions that predict them; a row with none
        gets the distribution of the token after it.
        """
        size, width = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((size, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((size, shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        keep = torch.zeros((size, width), dtype=torch.bool)
        for i, (row, n) in enumerate(zip(rows, n_targets, strict=True)):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, shared : shared + len(row)] = 1
            end = len(row) - 1 if n else len(row)  # logits at position t predict token t + 1
            keep[i, end - max(n, 1) : end] = True
        from transformers import DynamicCache

        kwargs: dict[str, Any] = {}
        if cache is not None:
            # The model appends to the cache it is given, so each batch gets its own; building it from expanded
            # views copies the prefix once per batch (deepcopy + batch_repeat_interleave would copy it twice).
            layers = [(k.expand(size, -1, -1, -1), v.expand(size, -1, -1, -1)) for k, v, *_ in cache]
            kwargs["past_key_values"] = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        positions = torch.arange(shared, shared + width).expand(size, width)
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=cache is not None,
            logits_to_keep=keep.to(self.device),  # only the scored positions reach the vocabulary-sized LM head
            **kwargs,
        )
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # (scored positions, vocab), row after row
        return list(logprobs.split([max(n, 1) for n in n_targets]))


# ------------------------------------------------------------------------------------------------ evaluation


def score_mmlu(
    model: Any,
    tokenizer: Any,
    data: dict[str, SubjectData],
    *,
    shots: int = 5,
    batch_size: int = 8,
    reference: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_subject: Callable[[str, list[Prediction]], None] | None = None,
) -> list[Prediction]:
    """Per-question predictions for loaded MMLU data.

    `progress(done, total)` is called after every batch, `on_subject(subject, predictions)` after each subject.
    """
    was_training = model.training  # the pipeline may evaluate a model it goes on training
    model.eval()
    scorer = MmluScorer(model, tokenizer, batch_size=batch_size)
    total = sum(len(d.questions) for d in data.values())
    done = 0.0

    def advance(n: float) -> None:
        nonlocal done
        done += n
        if progress:
            progress(int(round(done)), total)

    predictions: list[Prediction] = []
    try:
        for subject, subject_data in data.items():
            scored = scorer.score(subject, subject_data, shots, reference=reference, progress=advance)
            if on_subject:
                on_subject(subject, scored)
            predictions += scored
    finally:
        model.train(was_training)
    return predictions


def _accuracy(preds: Sequence[Prediction]) -> dict[str, Any]:
    correct = sum(p.pred == p.gold for p in preds)
    return {"acc": correct / len(preds) if preds else 0.0, "n": len(preds)}


def summarize(predictions: Sequence[Prediction], *, shots: int, split: str, model: str = "") -> dict[str, Any]:
    """The results JSON: accuracy per subject, per category and overall (pooled over all questions)."""
    by_subject: dict[str, list[Prediction]] = defaultdict(list)
    for p in predictions:
        by_subject[p.subject].append(p)
    by_category: dict[str, list[Prediction]] = defaultdict(list)
    for subject, preds in by_subject.items():
        by_category[category_of(subject)] += preds
    order = [*CATEGORIES, UNCATEGORIZED]
    return {
        "model": model,
        "split": split,
        "shots": shots,
        "overall": _accuracy(predictions),
        "categories": {c: _accuracy(by_category[c]) for c in order if c in by_category},
        "subjects": {s: {**_accuracy(by_subject[s]), "category": category_of(s)} for s in sorted(by_subject)},
        "prompts_with_fewer_shots": sum(p.shots < shots for p in predictions),
    }


def evaluate_mmlu(
    model: Any,
    tokenizer: Any,
    *,
    data_dir: Path | None,
    subjects: list[str] | None = None,
    limit: int | None = None,
    shots: int = 5,
    batch_size: int = 8,
    split: str = "test",
    progress: Callable[[int, int], None] | None = None,
    model_name: str = "",
) -> dict[str, Any]:
    """Load MMLU, score `model`, return the results dict (see `summarize`; plus timing and data source)."""
    data = load_mmlu(data_dir, split=split, subjects=subjects, limit=limit, shots=shots)
    return _evaluate_loaded(
        model,
        tokenizer,
        data,
        data_dir=data_dir,
        limit=limit,
        shots=shots,
        batch_size=batch_size,
        split=split,
        progress=progress,
        model_name=model_name,
    )[0]


def _evaluate_loaded(
    model: Any,
    tokenizer: Any,
    data: dict[str, SubjectData],
    *,
    data_dir: Path | None,
    limit: int | None,
    shots: int,
    batch_size: int,
    split: str,
    progress: Callable[[int, int], None] | None,
    model_name: str,
    on_subject: Callable[[str, list[Prediction]], None] | None = None,
) -> tuple[dict[str, Any], list[Prediction]]:
    start = time.perf_counter()
    predictions = score_mmlu(
        model, tokenizer, data, shots=shots, batch_size=batch_size, progress=progress, on_subject=on_subject
    )
    seconds = time.perf_counter() - start
    result = summarize(predictions, shots=shots, split=split, model=model_name)
    result.update(
        data=str(data_dir) if data_dir is not None else "/".join(HUB_DATASET),
        limit=limit,
        seconds=round(seconds, 2),
        questions_per_second=round(len(predictions) / seconds, 3) if seconds > 0 else None,
    )
    return result, predictions


# ---------------------------------------------------------------------------------------------------- models


def load_eval_model(reference: str | Path, quantization: str = "none") -> tuple[Any, Any, str]:
    """(model, tokenizer, description) for a hub id, checkpoint / merged dir, GGUF, or finetune run dir.

    A run dir (or one of its checkpoint-N dirs) loads as trained: the recipe's base model and quantization,
    plus the LoRA adapter.
    """
    from velora_cli.device import compute_dtype, default_device
    from velora_cli.models import ModelSource, load_base_model, load_tokenizer, resolve_model
    from velora_cli.rundir import ADAPTER_CONFIG, is_run_dir, read_recipe

    if quantization not in QUANTIZATIONS:
        raise UsageError(f"--quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    device = default_device()
    path = Path(reference).expanduser()
    run_dir = None
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        run_dir = path if is_run_dir(path) else path.parent if is_run_dir(path.parent) else None
        if run_dir is None:
            raise UsageError(f"{path}: a LoRA adapter without recipe.yaml beside it; is this a velora run directory?")
    if run_dir is None:
        source = resolve_model(str(reference))
        model = load_base_model(source, quantization=quantization, compute=compute_dtype("auto", device), device=device)
        description = str(reference) + ("" if quantization == "none" else f" ({quantization})")
        return model.eval(), load_tokenizer(source), description

    recipe = read_recipe(run_dir).model
    if quantization not in ("none", recipe.quantization):
        raise UsageError(
            f"{run_dir} was trained on a {recipe.quantization} base; --quantization applies to hub ids and "
            "checkpoint directories"
        )
    from peft import PeftModel

    source = resolve_model(recipe.name)
    base = load_base_model(
        source,
        quantization=recipe.quantization,
        compute=compute_dtype(recipe.compute_dtype, device),
        double_quant=recipe.double_quant,
        device=device,
        trust_remote_code=recipe.trust_remote_code,
        attn_implementation=recipe.attn_implementation,
    )
    model = PeftModel.from_pretrained(base, str(path))
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(ModelSource(str(path), str(path)) if has_tokenizer else source)
    description = f"{path} (LoRA adapter on {recipe.name}, {recipe.quantization})"
    return model.eval(), tokenizer, description


# ------------------------------------------------------------------------------------------------------ CLI


def print_results(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if len(result["subjects"]) <= 12:
        table = Table(title="MMLU by subject")
        for column in ("subject", "category", "n", "accuracy"):
            table.add_column(column, justify="right" if column in ("n", "accuracy") else "left")
        for name, row in result["subjects"].items():
            table.add_row(name, row["category"], str(row["n"]), f"{100 * row['acc']:.1f}%")
        console.print(table)
    title = f"MMLU {result['shots']}-shot {result['split']} accuracy: {result['model']}"
    table = Table(title=title)
    table.add_column("category")
    table.add_column("questions", justify="right")
    table.add_column("accuracy", justify="right")
    for name, row in result["categories"].items():
        table.add_row(name, str(row["n"]), f"{100 * row['acc']:.1f}%")
    overall = result["overall"]
    table.add_row("overall", str(overall["n"]), f"{100 * overall['acc']:.1f}%", style="bold")
    console.print(table)


def run_eval_command(
    *,
    mmlu: bool,
    model: str | None,
    data_dir: Path | None,
    subjects: str | None,
    limit: int | None,
    shots: int,
    batch_size: int,
    split: str,
    quantization: str,
    json_path: Path | None,
    save_predictions: Path | None,
) -> None:
    """`velora eval --mmlu`: load the data (fail fast), then the model, score, print, write files."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from velora_cli.rundir import MMLU_FILE, is_run_dir, latest_run, write_json_atomic, write_text_atomic

    if not mmlu:
        raise UsageError("velora eval: choose a benchmark; --mmlu (5-shot MMLU) is the one eval supports")
    if quantization not in QUANTIZATIONS:
        raise UsageError(f"--quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    wanted = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    data = load_mmlu(data_dir, split=split, subjects=wanted, limit=limit, shots=shots)
    reference = model if model is not None else str(latest_run())

    console = Console(stderr=True)
    with console.status(f"loading {reference}"):
        loaded, tokenizer, description = load_eval_model(reference, quantization)
    columns = (TextColumn("MMLU"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("mmlu", total=sum(len(d.questions) for d in data.values()))
        result, predictions = _evaluate_loaded(
            loaded,
            tokenizer,
            data,
            data_dir=data_dir,
            limit=limit,
            shots=shots,
            batch_size=batch_size,
            split=split,
            model_name=description,
            progress=lambda done, _total: bar.update(task, completed=done),
            on_subject=lambda subject, preds: bar.console.print(
                f"{subject}: {100 * _accuracy(preds)['acc']:.1f}% of {len(preds)}", highlight=False
            ),
        )
    print_results(result, Console())

    run_dir = Path(reference)
    if json_path is None and is_run_dir(run_dir) and not wanted and not limit and split == "test":
        json_path = run_dir / MMLU_FILE  # a complete evaluation of a run is kept with it
    if json_path is not None:
        write_json_atomic(json_path, result)
        console.print(f"results: {json_path}")
    if save_predictions is not None:
        write_text_atomic(save_predictions, "".join(json.dumps(asdict(p)) + "\n" for p in predictions))
        console.print(f"predictions: {save_predictions}")
