"""The MMLU prompt: header, few-shot examples and question, exactly as lm-evaluation-harness writes them.

Prompt for subject `s` with `k` shots (the first `k` dev questions in file order, lm-eval's `first_n`)::

    The following are multiple choice questions (with answers) about {s with "_" -> " "}.\\n\\n
    {shot question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n      (k times)
    {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:

The question text is stripped of surrounding whitespace (lm-eval's `question.strip()`); choices are kept as
written. The original script writes "about  abstract algebra" with two spaces; lm-eval and velora use one.
When the dev split itself is evaluated a question is never its own shot.
"""

from __future__ import annotations

from collections.abc import Sequence

from velora_cli.eval.mmlu_data import LETTERS, Question, SubjectData


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
