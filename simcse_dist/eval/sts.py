"""STS evaluation tasks: which files hold each task, in which layout, and how to read them.

The paper's table (Gao et al. 2021, Table 2) scores STS12-16, STS-B and SICK-R. STS12-16 use
SentEval's "all" aggregation as SimCSE's evaluation.py does: one Spearman over the pairs of
all subsets of a year pooled (not the mean of the per-subset correlations).

Layouts read (detected from the first non-blank line; UTF-8, no quoting anywhere):
- header TSV `sentence1  sentence2  score [subset]` (shared/data, any column order)
- the original STS-B CSV, TAB-separated `genre file year id score sentence1 sentence2 [...]`
- SentEval's `STS.input.<subset>.txt` + `STS.gs.<subset>.txt` line pairs (a directory)
- SICK: header `pair_ID sentence_A sentence_B relatedness_score ...`; the full `SICK.txt`
  has a `SemEval_set` column (TRAIN / TRIAL / TEST) that selects the split
- Chinese `id||sentence1||sentence2||score`

Lines are split on "\\n" only (never `str.splitlines()`, which also breaks on U+2028, U+0085,
...) and fields on TAB or "||" only, so CJK text and full-width punctuation stay whole.
A row whose gold score is blank is skipped, as SentEval does; every other malformed row
raises `DataError` naming file:line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from simcse_dist.data.readers import DataError, read_lines

# SentEval's subsets and order (senteval/sts.py); STS13's SMT is not redistributable.
SENTEVAL_SUBSETS = {
    "sts12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "sts13": ("FNWN", "headlines", "OnWN"),
    "sts14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "sts15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "sts16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
SICK_FILES = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}
SICK_SETS = {"train": "TRAIN", "dev": "TRIAL", "test": "TEST"}
SPLITS = ("train", "dev", "test")


class TaskNotFound(DataError):
    """None of the places a task may live exists; the message lists every path tried."""


@dataclass(frozen=True, slots=True)
class Task:
    name: str  # what --tasks takes
    title: str  # the column of the paper's table
    splits: tuple[str, ...]


TASKS = {
    t.name: t
    for t in (
        *(Task(f"sts{y}", f"STS{y}", ("test",)) for y in range(12, 17)),
        Task("stsb", "STSBenchmark", SPLITS),
        Task("sickr", "SICKRelatedness", SPLITS),
        Task("cnsd-stsb", "CNSD-STSB", SPLITS),
    )
}
PAPER_TASKS = {
    "test": ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr"),
    "dev": ("stsb", "sickr"),
    "train": ("stsb", "sickr"),
}


@dataclass(frozen=True, slots=True)
class StsData:
    """Pairs with gold scores; `subsets[i]` names the subset of pair i where the layout has one."""

    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]
    subsets: list[str] | None
    source: str  # the file(s) read, for messages
    skipped: int = 0  # rows with a blank gold score


# -- single files -------------------------------------------------------------------------------


def _score(raw: str, where: str) -> float | None:
    """Gold score of a row, or None when blank (the row is skipped, as SentEval does)."""
    if not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{where}: score {raw!r} is not a number")
    return value


def _sentence(raw: str, name: str, where: str) -> str:
    text = raw.strip()
    if not text:
        raise DataError(f"{where}: empty {name}")
    return text


@dataclass(frozen=True, slots=True)
class _Layout:
    """How to cut a row: separator, field count (None: at least `min_fields`), column indices."""

    sep: str
    fields: int | None
    s1: int
    s2: int
    score: int
    subset: int | None = None
    semeval_set: int | None = None  # SICK.txt's split column
    min_fields: int = 0
    header: bool = False
    describe: str = ""


def _detect(first: str, path: str) -> _Layout:
    """The layout, from the first non-blank line."""
    if first.lstrip().startswith("{"):
        return _Layout("json", None, 0, 1, 2, describe='{"sentence1", "sentence2", "score"} per line (MTEB)')
    if "||" in first:
        return _Layout("||", 4, 1, 2, 3, describe="id||sentence1||sentence2||score")
    cols = [c.strip().lower() for c in first.split("\t")]
    # headed TSVs: (sentence, sentence, score) column names, and the optional column of subsets
    # (STS-B's "subset") or of splits (SICK's "semeval_set")
    for names, extra in (
        (("sentence1", "sentence2", "score"), "subset"),
        (("sentence_a", "sentence_b", "relatedness_score"), "semeval_set"),
    ):
        if set(names) <= set(cols):
            a, b, score = (cols.index(n) for n in names)
            optional = {extra: cols.index(extra) if extra in cols else None}
            return _Layout("\t", len(cols), a, b, score, **optional, header=True, describe=", ".join(cols))
    if len(cols) >= 7:
        return _Layout("\t", None, 5, 6, 4, min_fields=7, describe="genre, file, year, id, score, sentence1, sentence2")
    raise DataError(
        f"{path}:1: unrecognised STS layout; expected a header with sentence1, sentence2, score[, subset], "
        "a SICK header (pair_ID, sentence_A, sentence_B, relatedness_score, ...), the STS-B CSV "
        "(genre, file, year, id, score, sentence1, sentence2) or id||sentence1||sentence2||score"
    )


def _json_fields(line: str, where: str) -> list[str]:
    """sentence1, sentence2, score of a JSON-lines row (MTEB's STS files, e.g. STS-B's
    validation.jsonl.gz), as the text fields the other layouts give."""
    try:
        row = json.loads(line)
        return [str(row["sentence1"]), str(row["sentence2"]), str(row["score"])]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{where}: expected a JSON object with sentence1, sentence2, score ({e})") from None


def read_pair_file(path: str | Path, split: str | None = None) -> StsData:
    """Read one STS file in any of the single-file layouts above. `split` (train/dev/test)
    selects the rows of a SICK file with a SemEval_set column and is ignored otherwise."""
    path = str(path)
    s1: list[str] = []
    s2: list[str] = []
    gold: list[float] = []
    subsets: list[str] = []
    layout, skipped = None, 0
    for n, line in read_lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if layout is None:
            layout = _detect(line, path)
            if layout.header:
                continue
        fields = _json_fields(line, where) if layout.sep == "json" else line.split(layout.sep)
        if layout.fields is not None and len(fields) != layout.fields:
            raise DataError(
                f"{where}: expected {layout.fields} {layout.sep!r}-separated fields "
                f"({layout.describe}), got {len(fields)}"
            )
        if len(fields) < layout.min_fields:
            raise DataError(
                f"{where}: expected at least {layout.min_fields} {layout.sep!r}-separated fields "
                f"({layout.describe}), got {len(fields)}"
            )
        if split and layout.semeval_set is not None and fields[layout.semeval_set].strip().upper() != SICK_SETS[split]:
            continue
        score = _score(fields[layout.score], where)
        if score is None:
            skipped += 1
            continue
        s1.append(_sentence(fields[layout.s1], "sentence1", where))
        s2.append(_sentence(fields[layout.s2], "sentence2", where))
        gold.append(score)
        if layout.subset is not None:
            subsets.append(fields[layout.subset].strip())
    if not gold:
        selected = (
            f" with SemEval_set {SICK_SETS[split]}" if split and layout and layout.semeval_set is not None else ""
        )
        raise DataError(f"{path}: no sentence pairs{selected}")
    return StsData(s1, s2, gold, subsets or None, path, skipped)


def read_senteval_pair(input_path: str | Path, gs_path: str | Path, subset: str) -> StsData:
    """SentEval's `STS.input.X.txt` (sentence1 TAB sentence2 [TAB source...]) paired line by
    line with `STS.gs.X.txt` (one score per line); lines with a blank score are skipped."""
    inputs = list(read_lines(str(input_path)))
    golds = list(read_lines(str(gs_path)))
    if len(inputs) != len(golds):
        raise DataError(
            f"{gs_path}: {len(golds)} lines, but {input_path} has {len(inputs)}; the two files must pair line by line"
        )
    s1, s2, gold, skipped = [], [], [], 0
    for (n, text), (_, raw) in zip(inputs, golds, strict=True):
        score = _score(raw.rstrip("\r\n"), f"{gs_path}:{n}")
        if score is None:
            skipped += 1
            continue
        fields = text.rstrip("\r\n").split("\t")
        where = f"{input_path}:{n}"
        if len(fields) < 2:
            raise DataError(f"{where}: expected sentence1 TAB sentence2, got {len(fields)} field(s)")
        s1.append(_sentence(fields[0], "sentence1", where))
        s2.append(_sentence(fields[1], "sentence2", where))
        gold.append(score)
    return StsData(s1, s2, gold, [subset] * len(gold), str(input_path), skipped)


def read_senteval_dir(directory: str | Path, task: str) -> StsData:
    """All of a year's SentEval subsets (SENTEVAL_SUBSETS order), concatenated."""
    d = Path(directory)
    parts = []
    for subset in SENTEVAL_SUBSETS[task]:
        # STS16 names its files STS2016.input.X.txt; the other years STS.input.X.txt.
        found = [(d / f"{p}.input.{subset}.txt", d / f"{p}.gs.{subset}.txt") for p in ("STS", "STS2016")]
        pair = next(((i, g) for i, g in found if i.is_file()), None)
        if pair is None:
            raise DataError(f"{found[0][0]}: file not found (SentEval subset {subset} of {task})")
        parts.append(read_senteval_pair(*pair, subset))
    return StsData(
        [s for p in parts for s in p.sentences1],
        [s for p in parts for s in p.sentences2],
        [g for p in parts for g in p.scores],
        [s for p in parts for s in p.subsets],
        str(d),
        sum(p.skipped for p in parts),
    )


# -- where tasks live --------------------------------------------------------------------------


def candidates(task: str, split: str, root: Path) -> list[Path]:
    """Places `task`/`split` may live under `root`, most specific first. A directory means the
    SentEval STS.input/STS.gs layout; a file is read by read_pair_file."""
    if task in SENTEVAL_SUBSETS:
        yy = task[-2:]
        return [root / task / f"{split}.tsv", root / f"STS{yy}-en-test", root / "STS" / f"STS{yy}-en-test"]
    if task == "stsb":
        names = [
            f"STSBenchmark/sts-{split}.csv",
            f"stsbenchmark/sts-{split}.csv",
            f"STS/STSBenchmark/sts-{split}.csv",
            f"sts-{split}.csv",
        ]
        return [root / "stsb" / f"{split}.tsv", *(root / n for n in names)]
    if task == "sickr":
        sick = SICK_FILES[split]
        paths = [
            root / "sickr" / f"{split}.tsv",
            root / "SICK" / sick,
            root / sick,
            root / "SICK" / "SICK.txt",
            root / "SICK.txt",
        ]
        if root.name == "STS":  # SentEval's data/downstream/STS: SICK is a sibling folder
            paths.append(root.parent / "SICK" / sick)
        return paths
    if task == "cnsd-stsb":
        return [
            root / "cnsd-stsb" / f"{split}.tsv",
            root / "cnsd-stsb" / f"cnsd-sts-{split}.txt",
            root / "STS-B" / f"cnsd-sts-{split}.txt",
        ]
    raise KeyError(task)


def check_task(task: str, split: str) -> Task:
    """The Task, or a DataError saying which names/splits exist."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; known: {', '.join(TASKS)} (or 'all')")
    spec = TASKS[task]
    if split not in spec.splits:
        raise DataError(f"task {task} has no {split} split (it has {', '.join(spec.splits)})")
    return spec


def locate(task: str, split: str, data_dir: str | Path) -> Path:
    """The first existing candidate under data_dir. SentEval's tokenized copy (a folder named
    `senteval`) lacks STS-B train, SICK and CNSD, so there the raw parent folder is tried next."""
    check_task(task, split)
    root = Path(data_dir).expanduser()
    roots = [root, root.parent] if root.name == "senteval" else [root]
    tried = [p for r in roots for p in candidates(task, split, r)]
    for p in tried:
        if p.is_file() or (p.is_dir() and task in SENTEVAL_SUBSETS):
            return p
    raise TaskNotFound(f"{task} ({split}): no data found; tried " + ", ".join(str(p) for p in tried))


def load_task(task: str, split: str, data_dir: str | Path) -> StsData:
    """Read `task`'s `split` from data_dir (see `candidates` for the layouts looked for)."""
    path = locate(task, split, data_dir)
    if path.is_dir():
        return read_senteval_dir(path, task)
    return read_pair_file(path, split)
