"""MMLU data: the 57 subjects and their categories, read from the hub or from the original CSV layout.

Protocol - that of lm-evaluation-harness's `mmlu` task, itself the original evaluation of Hendrycks et al.
(the eval package's modules follow it: data here, prompts in mmlu_prompts, scoring in scorer, accuracy in
summary). Data: `cais/mmlu` (config `all`) from the Hugging Face hub, or a local directory in the original CSV
layout (`dev/{subject}_dev.csv`, `val/{subject}_val.csv`, `test/{subject}_test.csv`; rows
`question,A,B,C,D,answer`, no header); `--split validation` reads `val/`. Categories: lm-eval's mapping of the
57 subjects onto STEM / humanities / social sciences / other (the original categories.py differs only in putting
anatomy under "other"); subjects of a user's own data outside the 57 are "uncategorized".
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from velora_cli.common.bounds import check_readable_whole
from velora_cli.common.errors import DataError, UsageError, did_you_mean

LETTERS = ("A", "B", "C", "D")
SPLITS = {"test": "test", "validation": "val", "dev": "dev"}  # --split name -> directory / file suffix
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


_RECORD_LINE = re.compile(r"\n[^\n]*(,[^,\n]*){4},[ABCD][ \t\r]*(\n|$)")  # a whole `q,a,b,c,d,X` line


def read_csv(path: Path, subject: str) -> list[Question]:
    """One MMLU CSV file; DataError naming the file and line of the first malformed row.

    strict=True makes a quote left open at the end of the file an error instead of one huge field, and a field
    that swallowed whole `...,A,B,C,D,X` lines (an unclosed quote closed by a later one) is refused as well, so
    rows are never silently merged into a wrong question count."""
    check_readable_whole(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    questions: list[Question] = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        line = 1  # first physical line of the next record (a quoted field may span lines)
        try:
            for row in reader:
                if row and any(field.strip() for field in row):
                    if len(row) != 6:
                        raise DataError(f"{path}:{line}: expected 6 fields (question,A,B,C,D,answer), got {len(row)}")
                    if any(_RECORD_LINE.search(field) for field in row):
                        raise DataError(
                            f"{path}:{line}: a quoted field runs over whole rows (unclosed quote?); "
                            f"lines {line}-{reader.line_num} were read as one question"
                        )
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
            raise UsageError(f"unknown MMLU subject {name!r} in {where}{did_you_mean(name, available)}")
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
            if len(pool) < shots:  # the layout's dev split has 5 per subject: fewer means a broken file
                raise DataError(f"{dev}: {len(pool)} questions, fewer than --shots {shots} (the dev split has 5)")
        out[subject] = SubjectData(_limit(questions, limit), pool, split == "dev")
    return out


def load_hub(*, split: str, subjects: list[str] | None, limit: int | None) -> dict[str, SubjectData]:
    """MMLU from the Hugging Face hub (`cais/mmlu`, config `all`)."""
    chosen = _select_subjects(subjects, sorted(SUBJECT_CATEGORIES), HUB_DATASET[0])
    try:
        import datasets

        dataset = datasets.load_dataset(*HUB_DATASET)
    except Exception as exc:  # offline, missing package, hub error: all mean "use local files"
        from velora_cli.common.hub import offline

        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if offline():  # the library's own wording of it is noise: say it in ours
            text = "not in the local cache, and HF_HUB_OFFLINE is set"
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
