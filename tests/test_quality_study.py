"""The pure parts of ``benchmarks/quality/run_study.py`` (issue 9): scale presets, equal budgets
across variants, task splits, teacher choice and the report (table, plot, results.json) built from
synthetic metrics files. Nothing here trains a model."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("run_study", REPO / "benchmarks" / "quality" / "run_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_study"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["run_study"]


def _argvs(study, scale, tmp_path):
    data, runs = tmp_path / "data", tmp_path / "pretrain"
    argvs = {v: study.pretrain_command(v, scale, data, runs / v) for v in ("char_mlm", "wwm", "ngram_sop", "electra")}
    cache_cmd, student_cmd = study.distill_commands("wwm", scale, data, tmp_path / "cache", runs / "distilled")
    return argvs, cache_cmd, student_cmd


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu"])
def test_quality_study_budget_equal_across_variants(study, name, tmp_path):
    scale = study.scale_config(name)
    argvs, cache_cmd, student_cmd = _argvs(study, scale, tmp_path)
    argvs["distilled"] = student_cmd
    budgets = {v: study.budget_of(a) for v, a in argvs.items()}
    reference = budgets["wwm"]
    for variant, budget in budgets.items():
        assert budget == reference, f"{name}: {variant} budget {budget} != wwm {reference}"
    m, p = scale.model, scale.pretrain
    expected = {"num_hidden_layers": m.layers, "hidden_size": m.hidden, "num_attention_heads": m.heads,
                "intermediate_size": m.intermediate, "embedding_size": m.hidden, "initializer_range": m.init_std,
                "total_steps": p.steps,
                "batch_size": p.batch_size, "max_seq_len": p.max_seq_len}
    if m.dropout is not None:
        expected.update(hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout)
    for key, value in expected.items():
        assert reference[key] == str(value), f"{name}: {key} = {reference[key]}, scale says {value}"
    # step 1 of the distillation caches exactly the micro-batches the student trains on
    cache_budget = study.budget_of(cache_cmd)
    for key in ("total_steps", "batch_size", "max_seq_len", "max_predictions"):
        assert cache_budget[key] == reference[key], f"{name}: cache {key} {cache_budget[key]} != {reference[key]}"


def test_quality_study_budget_of_reads_any_section(study):
    argv = ["--model.hidden_size=64", "--student.hidden_size=64", "--train.lr=0.001", "--output", "x", "--recipe=bert"]
    assert study.budget_of(argv) == {"hidden_size": "64", "lr": "0.001"}


def test_quality_study_scale_config(study):
    cpu = study.scale_config("cpu")
    assert cpu.finetune.seeds == 3, cpu.finetune.seeds
    assert study.scale_config("cpu", seeds=5).finetune.seeds == 5
    with pytest.raises(ValueError, match="--seeds"):
        study.scale_config("cpu", seeds=0)
    gpu = study.scale_config("gpu")
    assert gpu.model.hidden > cpu.model.hidden and gpu.device == "cuda", (gpu.model, gpu.device)
    assert all(t.train is None for t in gpu.finetune.tasks.values()), gpu.finetune.tasks
    assert any(t.train is not None for t in cpu.finetune.tasks.values()), "cpu scale subsamples training sets"
    for scale in study.SCALES.values():
        assert set(scale.finetune.tasks) == {t.name for t in study.TASKS}, scale.name
        assert scale.pretrain.max_seq_len <= scale.model.max_positions, scale.name
        for task, budget in scale.finetune.tasks.items():
            assert budget.max_seq_len <= scale.model.max_positions, (scale.name, task, budget.max_seq_len)


def test_quality_study_finetune_command_same_hyperparameters(study, tmp_path):
    scale = study.scale_config("cpu")
    commands = [study.finetune_command("lcqmc", scale, tmp_path / v, tmp_path / "t", tmp_path / "o", 0)
                for v in ("random", "wwm", "electra")]
    stripped = [[a for a in c if not a.startswith(str(tmp_path))] for c in commands]
    assert stripped[0] == stripped[1] == stripped[2], stripped
    cmrc = study.finetune_command("cmrc2018", scale, tmp_path, tmp_path, tmp_path, 2)
    assert "--finetune.doc_stride=64" in cmrc and "--finetune.max_query_len=32" in cmrc and "--train.seed=2" in cmrc, cmrc


@pytest.mark.skipif(not (SHARED / "lcqmc").is_dir(), reason="needs <repo>/../shared/data")
@pytest.mark.parametrize("task", ["chnsenticorp", "lcqmc", "ner"])
def test_quality_study_task_splits_deterministic_and_disjoint(study, task, tmp_path):
    budget = study.TaskBudget(train=120, select=30, test=50, max_seq_len=64, epochs=1)
    counts = study.build_task_splits(task, budget, tmp_path / "a")
    study.build_task_splits(task, budget, tmp_path / "b")
    assert counts == {"train": 120, "select": 30, "test": 50}, counts
    parts = {}
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f"{f.name} differs between two runs"
        text = f.read_text(encoding="utf-8")
        parts[f.stem] = set(text.split("\n\n")) if task == "ner" else set(text.splitlines()[task == "chnsenticorp":])
    if task != "chnsenticorp":  # its test split is the official dev file, the others come from one pool
        assert not parts["train"] & parts["test"], f"{len(parts['train'] & parts['test'])} shared train/test items"
    assert not parts["train"] & parts["select"], f"{len(parts['train'] & parts['select'])} shared train/select items"


@pytest.mark.skipif(not (SHARED / "lcqmc").is_dir(), reason="needs <repo>/../shared/data")
@pytest.mark.parametrize("task", ["chnsenticorp", "lcqmc", "ner", "cmrc2018"])
def test_quality_study_low_resource_split_is_a_prefix_of_train(study, task, tmp_path):
    budget = study.TaskBudget(train=120, select=30, test=50, max_seq_len=64, epochs=1, low_train=40)
    counts = study.build_task_splits(task, budget, tmp_path)
    suffix = study._SUFFIX[task]
    train, low = ((tmp_path / f"{s}.{suffix}").read_text(encoding="utf-8") for s in ("train", "train-low"))
    if task == "cmrc2018":  # whole documents, at least 40 questions
        train_docs, low_docs = (json.loads(t)["data"] for t in (train, low))
        assert low_docs == train_docs[:len(low_docs)] and len(low_docs) < len(train_docs), (len(low_docs), len(train_docs))
        assert counts["train-low"] >= 40 and counts["train-low"] < counts["train"], counts
    else:
        assert counts["train-low"] == 40 and counts["train"] == 120, counts
        assert train.startswith(low) and len(low) < len(train)
    scale = study.scale_config("cpu")
    low_cmd = study.finetune_command(task, scale, tmp_path, tmp_path, tmp_path / "o", 0, "low")
    std_cmd = study.finetune_command(task, scale, tmp_path, tmp_path, tmp_path / "o", 0)
    differing = [(a, b) for a, b in zip(low_cmd, std_cmd) if a != b]
    expected = [(f"--data.train={tmp_path / f'train-low.{suffix}'}", f"--data.train={tmp_path / f'train.{suffix}'}")]
    t = scale.finetune.tasks[task]
    if t.low_epochs:
        expected.append((f"--finetune.epochs={t.low_epochs}", f"--finetune.epochs={t.epochs}"))
    assert differing == expected, differing


def test_quality_study_cpu_scale_has_a_low_resource_setting(study):
    cpu = study.scale_config("cpu")
    low = {t: b.low_train for t, b in cpu.finetune.tasks.items() if b.low_train is not None}
    assert len(low) >= 3 and all(500 <= n <= 2000 for n in low.values()), low
    for task, n in low.items():
        train = cpu.finetune.tasks[task].train
        assert train is None or n < train, (task, n, train)
        assert study.settings(cpu, task) == ("standard", "low")


@pytest.mark.skipif(not (SHARED / "cmrc2018").is_dir(), reason="needs <repo>/../shared/data")
def test_quality_study_cmrc_splits_whole_documents(study, tmp_path):
    budget = study.TaskBudget(train=50, select=20, test=None, max_seq_len=128, epochs=1)
    counts = study.build_task_splits("cmrc2018", budget, tmp_path)
    docs = {s: {d["id"] for d in json.loads((tmp_path / f"{s}.json").read_text(encoding="utf-8"))["data"]}
            for s in ("train", "select")}
    assert not docs["train"] & docs["select"], docs
    assert counts["select"] >= 20 and counts["train"] >= 50 and counts["test"] == 122, counts


# ----------------------------------------------------------------------------- synthetic study

# variant -> task -> per-seed test metric as lub_fast.finetune reports it (fractions; CMRC F1 in %)
_SCORES = {
    "random": {"chnsenticorp": [0.50, 0.52, 0.54], "lcqmc": [0.60, 0.60, 0.60],
               "cmrc2018": [5.0, 6.0, 7.0], "ner": [0.10, 0.10, 0.10]},
    "char_mlm": {"chnsenticorp": [0.70, 0.72, 0.74], "lcqmc": [0.65, 0.66, 0.67],
                 "cmrc2018": [10.0, 11.0, 12.0], "ner": [0.40, 0.40, 0.40]},
    "wwm": {"chnsenticorp": [0.80, 0.81, 0.82], "lcqmc": [0.65, 0.67, 0.66],
            "cmrc2018": [12.0, 14.0, 16.0], "ner": [0.50, 0.52, 0.54]},
    "ngram_sop": {"chnsenticorp": [0.75, 0.75, 0.75], "lcqmc": [0.66, 0.66, 0.66],
                  "cmrc2018": [11.0, 11.0, 11.0], "ner": [0.45, 0.45, 0.45]},
    "electra": {"chnsenticorp": [0.78, 0.78, 0.78], "lcqmc": [0.70, 0.70, 0.70],
                "cmrc2018": [13.0, 13.0, 13.0], "ner": [0.55, 0.55, 0.55]},
}
_METRIC = {"chnsenticorp": "accuracy", "lcqmc": "accuracy", "cmrc2018": "f1", "ner": "entity_f1"}


def _fake_study(study, root: Path, variants=_SCORES, low=None):
    s = study.Study(study.scale_config("cpu"), root)
    for variant, tasks in variants.items():
        steps = 0 if variant == "random" else 1200
        command = "python -m lub_fast.pretrain --train.total_steps=1200 --model.hidden_size=128"
        s.marker(f"pretrain-{variant}").write_text(json.dumps({"command": command, "wall_s": 100.0 if steps else 0.0}))
        run = root / "pretrain" / variant
        run.mkdir(parents=True, exist_ok=True)
        if steps:
            (run / "summary.json").write_text(json.dumps({"step": steps, "eval": {"mlm_acc": 0.3}}))
            (run / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": steps, "tokens": 4_400_000}) + "\n")
        for task, values in tasks.items():
            for seed, value in enumerate(values):
                out = root / "finetune" / variant / task / f"seed{seed}"
                out.mkdir(parents=True)
                metric = {_METRIC[task]: value}
                record = {"task": task, "best_step": 10, "dev": metric, "test": metric}
                (out / "metrics.json").write_text(json.dumps(record))
                s.marker(f"finetune-{variant}-{task}-seed{seed}").write_text(json.dumps({"command": "x", "wall_s": 20.0}))
    for variant, tasks in (low or {}).items():
        for task, values in tasks.items():
            for seed, value in enumerate(values):
                out, name = s.finetune_run(variant, task, "low", seed)
                out.mkdir(parents=True)
                metric = {_METRIC[task]: value}
                (out / "metrics.json").write_text(json.dumps({"task": task, "best_step": 5, "dev": metric, "test": metric}))
                s.marker(name).write_text(json.dumps({"command": "x", "wall_s": 10.0}))
    return s


def test_quality_study_report_from_synthetic_metrics(study, tmp_path):
    s = _fake_study(study, tmp_path)
    path = study.report(s, "python benchmarks/quality/run_study.py --scale cpu --output X")
    text = path.read_text(encoding="utf-8")
    wwm_row = next(line for line in text.splitlines() if line.startswith("| (c) whole-word MLM"))
    # ChnSentiCorp 81.0 ± 1.0, CMRC 14.0 ± 2.0, NER 52.0 ± 2.0, mean of the four task means
    assert "| 81.0 ± 1.0 | 66.0 ± 1.0 | 14.0 ± 2.0 | 52.0 ± 2.0 | 53.2 | 1200 | 4,400,000 | 100 |" in wwm_row, wwm_row
    assert "| (f) distilled | n/a | n/a | n/a | n/a | n/a | not run | not run | not run |" in text, text
    assert "ChnSentiCorp acc: +9.0" in text and "better" in text, text
    assert "(c) whole-word MLM." in text, "wwm has the best mean of the teacher candidates"
    assert "Budget check: 4 pretrained variants ran with identical budget flags." in text, text
    revision = study.describe_revision(study.git_revision(study.REPO))  # clean or naming what is uncommitted
    assert f"transformers {study.environment('cpu')['transformers']}; {revision};" in text, text
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert len(results["finetune"]) == 5 * 4 * 3, len(results["finetune"])
    assert results["teacher"] == "wwm" and results["pretrain"]["wwm"]["tokens"] == 4_400_000, results["pretrain"]["wwm"]
    png = (tmp_path / "quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, len(png)


def test_quality_study_teacher_waits_for_every_candidate(study, tmp_path):
    partial = {v: t for v, t in _SCORES.items() if v != "ngram_sop"}
    s = _fake_study(study, tmp_path, partial)
    assert study.choose_teacher(s.finetune_results()) is None
    incomplete = dict(partial, ngram_sop={"chnsenticorp": [0.99]})  # one task only: no mean yet
    s = _fake_study(study, tmp_path / "b", incomplete)
    assert study.choose_teacher(s.finetune_results()) is None


def test_quality_study_budget_line_names_differences(study):
    same = {"hidden_size": "128", "total_steps": "1200"}
    pretrain = {"random": {"budget": {}}, "wwm": {"budget": same}, "electra": {"budget": dict(same, total_steps="900")},
                "distilled": None}
    assert study.budget_line(pretrain) == "Budget check: the variants DIFFER in total_steps."


def test_quality_study_compare_says_no_clear_difference(study):
    runs = [{"variant": v, "task": "ner", "seed": i, "test": {"entity_f1": x}}
            for v, xs in (("wwm", [0.50, 0.60, 0.40]), ("char_mlm", [0.52, 0.42, 0.47])) for i, x in enumerate(xs)]
    (line,) = study.compare(runs, "wwm", "char_mlm")
    assert line.startswith("PD NER F1: +3.0") and line.endswith("no clear difference"), line


def test_quality_study_report_has_the_low_resource_table(study, tmp_path):
    low = {"random": {"chnsenticorp": [0.50, 0.51, 0.52], "ner": [0.0, 0.01, 0.02]},
           "wwm": {"chnsenticorp": [0.70, 0.71, 0.72], "ner": [0.20, 0.21, 0.22]}}
    s = _fake_study(study, tmp_path, low=low)
    text = study.report(s, "python benchmarks/quality/run_study.py --scale cpu --output X").read_text(encoding="utf-8")
    standard, _, low_part = text.partition("## Low-resource fine-tuning")
    assert low_part, text
    # the standard table is unchanged by the low runs; the low table has only the tasks that ran low
    assert "| 81.0 ± 1.0 | 66.0 ± 1.0 | 14.0 ± 2.0 | 52.0 ± 2.0 | 53.2 |" in standard, standard
    assert "| variant | ChnSentiCorp acc | PD NER F1 | mean |" in low_part, low_part
    assert "| (c) whole-word MLM | 71.0 ± 1.0 | 21.0 ± 1.0 | 46.0 |" in low_part, low_part
    assert "ChnSentiCorp acc: +20.0" in low_part and "better" in low_part, low_part
    assert "first 500 examples of chnsenticorp" in low_part and "epochs chnsenticorp 3, lcqmc 3, ner 10." in low_part, low_part
    assert "| 0.300 |" in standard, "held-out masked-token accuracy of pretraining"
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert sum(r["setting"] == "low" for r in results["finetune"]) == 12, results["finetune"]
