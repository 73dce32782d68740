"""Scoring a model on MMLU prompts: the cached-prefix batched scorer and the straightforward reference scorer.

- Context limit: a prompt longer than the model's context (`max_position_embeddings`, or the tokenizer's
  `model_max_length` when smaller) loses shots from the end, one at a time, until it fits (the original
  script's rule); one that does not fit even with no shots keeps its last tokens (lm-eval's rule). The JSON
  counts such prompts (`prompts_with_fewer_shots`).
- Tokens: `tokenizer(prompt)` with the tokenizer's default special tokens (a BOS for LLaMA, as in the
  original script; lm-eval's HF backend adds none unless asked to).
- Score: the log-likelihood of each continuation " A", " B", " C", " D" after the prompt (lm-eval's
  `loglikelihood`, continuation tokens split off `tokenizer(prompt + " A")` the way lm-eval does); the prediction
  is the argmax (first letter on a tie).

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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from velora_cli.eval.mmlu_data import LETTERS, Question, SubjectData
from velora_cli.eval.mmlu_prompts import format_question, prompt_prefix, shots_for


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
