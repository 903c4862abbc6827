"""Classification: hand-computed losses and metrics, label handling, bad input, runs of each problem type, the CLI.

Values use ``softmax([0, ln 3]) = [1/4, 3/4]``, ``sigmoid(ln 3) = 0.75``, ``-ln 0.75 = 0.287682``, ``ln 4 =
1.386294``, ``ln 2 = 0.693147``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import set_seed

import alignment.models.seqcls as reward_models
from alignment.data import demo_classification
from alignment.data.validate import DataError
from alignment.methods.seqcls.classification import (
    LOSSES,
    ClassificationConfig,
    ClassificationObjective,
    Problem,
    classification_metrics,
    multilabel_bce,
    weighted_cross_entropy,
)
from alignment.models.seqcls import load_sequence_classifier, pad_batch, sequence_scores
from alignment.registry import METHODS, classification
from tests.conftest import launch
from tests.methods.helpers import read_logs, run_method, trainable, write_jsonl

LN3 = math.log(3.0)
LN2 = math.log(2.0)


# --- losses ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "weights", "expected"),
    [(1, None, 0.287682), (0, None, 1.386294), (0, [2.0, 1.0], 2.772589), (1, [2.0, 1.0], 0.287682)],
)
def test_weighted_cross_entropy_hand_computed(label: int, weights: list[float] | None, expected: float) -> None:
    logits = torch.tensor([[0.0, LN3]], dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64) if weights else None
    loss = weighted_cross_entropy(logits, torch.tensor([label]), class_weights=w)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_weighted_cross_entropy_is_a_plain_mean_of_weighted_terms() -> None:
    """Two examples, weights [2, 1]: (2 · ln 4 + 1 · 0.287682) / 2 (torch would divide by 2 + 1 instead)."""
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]], dtype=torch.float64)
    per_example = weighted_cross_entropy(logits, torch.tensor([0, 1]), class_weights=torch.tensor([2.0, 1.0]))
    assert float(per_example.mean()) == pytest.approx((2 * 1.386294 + 0.287682) / 2, abs=1e-6)


@pytest.mark.parametrize(
    ("logits", "targets", "weights", "expected"),
    [
        ([LN3, LN3], [1.0, 0.0], None, (0.287682 + 1.386294) / 2),
        ([LN3, LN3], [1.0, 0.0], [1.0, 3.0], (0.287682 + 3 * 1.386294) / 2),
        ([0.0, 0.0, 0.0], [1.0, 0.0, 1.0], None, LN2),
    ],
)
def test_multilabel_bce_hand_computed(
    logits: list[float], targets: list[float], weights: list[float] | None, expected: float
) -> None:
    w = torch.tensor(weights, dtype=torch.float64) if weights else None
    loss = multilabel_bce(
        torch.tensor([logits], dtype=torch.float64), torch.tensor([targets]).double(), class_weights=w
    )
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_limiting_cases_and_finite_gradients() -> None:
    """Equal logits over C classes give ln C; a confident right answer gives ~0; gradients are finite."""
    assert float(weighted_cross_entropy(torch.zeros(1, 5), torch.tensor([3]))) == pytest.approx(math.log(5))
    assert float(weighted_cross_entropy(torch.tensor([[50.0, 0.0]]), torch.tensor([0]))) == pytest.approx(0, abs=1e-9)
    assert float(multilabel_bce(torch.tensor([[50.0, -50.0]]), torch.tensor([[1.0, 0.0]]))) == pytest.approx(
        0, abs=1e-9
    )
    for problem, loss_fn in LOSSES.items():
        logits = torch.tensor([[100.0, -100.0], [0.3, 0.1]], requires_grad=True)
        labels = torch.tensor([[0.0, 1.0], [1.0, 1.0]]) if problem is Problem.multilabel else torch.tensor([1, 0])
        loss_fn(logits, labels, torch.tensor([1.0, 2.0])).mean().backward()
        assert logits.grad is not None, problem
        assert torch.isfinite(logits.grad).all(), problem


# --- metrics ------------------------------------------------------------------------------------------------------


def test_multiclass_metrics_by_hand(tmp_path: Path) -> None:
    """Truth [0, 0, 1, 2], predictions [0, 1, 1, 2]: accuracy 3/4; per class precision (1, 1/2, 1), recall (1/2, 1, 1).

    F1 per class (2/3, 2/3, 1): macro 7/9; micro = accuracy for single-label = 3/4.
    """
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    metrics, matrix = classification_metrics(
        logits, torch.tensor([0, 0, 1, 2]), ["a", "b", "c"], problem=Problem.multiclass, threshold=0.5
    )
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["f1_macro"] == pytest.approx(7 / 9)
    assert metrics["f1_micro"] == pytest.approx(0.75)
    assert [metrics[f"precision/{c}"] for c in "abc"] == pytest.approx([1.0, 0.5, 1.0])
    assert [metrics[f"recall/{c}"] for c in "abc"] == pytest.approx([0.5, 1.0, 1.0])
    assert "roc_auc" not in metrics
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    classification.plot_confusion_matrix(matrix, ["a", "b", "c"], tmp_path / "cm.png", title="t")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_binary_roc_auc_ranks_the_second_label() -> None:
    """P(label 1) = (0.2, 0.6, 0.4, 0.9) for truth (0, 0, 1, 1): 3 of 4 (pos, neg) pairs ranked right, AUC 0.75."""
    p = torch.tensor([0.2, 0.6, 0.4, 0.9])
    logits = torch.stack([torch.zeros(4), torch.log(p / (1 - p))], dim=-1)
    metrics, matrix = classification_metrics(
        logits, torch.tensor([0, 0, 1, 1]), ["no", "yes"], problem=Problem.binary, threshold=0.5
    )
    assert metrics["roc_auc"] == pytest.approx(0.75)
    assert metrics["accuracy"] == pytest.approx(0.5)  # predictions (0, 1, 0, 1)
    assert matrix.tolist() == [[1, 1], [1, 1]]


def test_multilabel_metrics_threshold_and_skip_auc_of_constant_labels() -> None:
    """Targets [[1,0],[1,1]], probabilities [[.9,.2],[.6,.7]] -> predictions equal targets: exact-match accuracy 1.

    Label 0 is present in every row, so its AUC is undefined and left out; label 1's AUC is 1.
    """
    probabilities = torch.tensor([[0.9, 0.2], [0.6, 0.7]])
    logits = torch.log(probabilities / (1 - probabilities))
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    metrics, matrix = classification_metrics(logits, targets, ["x", "y"], problem=Problem.multilabel, threshold=0.5)
    assert matrix is None
    assert metrics["accuracy"] == 1.0
    assert metrics["f1_micro"] == 1.0
    assert metrics["roc_auc"] == pytest.approx(1.0)
    strict, _ = classification_metrics(logits, targets, ["x", "y"], problem=Problem.multilabel, threshold=0.8)
    assert strict["accuracy"] == 0.5  # at 0.8 row 0 still predicts [1, 0], row 1 predicts [0, 0]
    assert strict["recall/x"] == pytest.approx(0.5)


def test_objective_records_and_summarises_training_with_accuracy_only() -> None:
    objective = ClassificationObjective(["a", "b"], Problem.multiclass, 0.5, torch.tensor([1.0, 3.0]), None)
    scores = torch.tensor([[0.0, LN3], [0.0, LN3]])
    per_example, record = objective.loss(scores, {"labels": torch.tensor([0, 1])})
    assert per_example.tolist() == pytest.approx([1.386294, 3 * 0.287682], abs=1e-6)
    assert objective.summarize(record, mode="train", step=1, main_process=True) == {"accuracy": 0.5}


# --- labels and bad input -------------------------------------------------------------------------------------------

ROWS = [
    {"text": "What is 2 + 3?", "label": "addition"},
    {"text": "What is 7 * 8?", "label": "multiplication"},
    {"text": "Compute 9 - 4.", "label": "subtraction"},
    {"text": "Compute 12 + 30.", "label": "addition"},
    {"text": "9 * 9 = ?", "label": "multiplication"},
    {"text": "Calculate 50 - 8.", "label": "subtraction"},
]


def _overrides(train: Path, evaluation: Path | None = None, *extra: str) -> list[str]:
    source = f"{{path:'{train}', eval_path:'{evaluation}'}}" if evaluation else f"{{path:'{train}'}}"
    return [
        "model=tiny_random",
        "method=classification",
        "logger=none",
        f"data.sources=[{source}]",
        "data.eval_fraction=0",
        "method.max_steps=2",
        "method.per_device_train_batch_size=3",
        "method.per_device_eval_batch_size=4",
        "method.logging_steps=1",
        "method.save_strategy=no",
        "method.learning_rate=1e-2",
        *extra,
    ]


@pytest.mark.parametrize(
    ("bad_row", "extra", "expected"),
    [
        ({"text": "hi"}, [], "missing column 'label'"),
        ({"text": "", "label": "addition"}, [], "column 'text': empty text"),
        ({"text": "hi", "label": ["addition"]}, [], "problem_type=multiclass expects one name"),
        ({"text": "hi", "label": 2}, [], "2 is a id, but the first row uses names"),
        (
            {"text": [{"role": "user", "content": "hi"}], "label": "addition"},
            [],
            "messages, but the first row holds text",
        ),
        ({"text": "hi", "label": True}, [], "expected a name (string) or an id (integer), got True"),
        ({"text": "hi", "label": "division"}, ["method.labels=[addition,subtraction,multiplication]"], "unknown label"),
        ({"text": "hi", "label": "addition"}, ["method.problem_type=multilabel"], "expects a list of names or ids"),
    ],
)
def test_bad_rows_fail_with_file_line_before_loading(
    compose: Any, tmp_path: Path, models: list[Any], bad_row: dict[str, Any], extra: list[str], expected: str
) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", [*ROWS[:3], bad_row])
    with pytest.raises(DataError) as failure:
        run_method(classification.run, compose, tmp_path / "run", _overrides(data, None, *extra))
    assert f"{data}:4" in str(failure.value)
    assert expected in str(failure.value)
    assert models == []


def test_unseen_eval_label_names_its_file_and_line(compose: Any, tmp_path: Path, models: list[Any]) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [ROWS[0], {"text": "8 / 2", "label": "division"}])
    with pytest.raises(DataError) as failure:
        run_method(classification.run, compose, tmp_path / "run", _overrides(train, evaluation))
    assert f"{evaluation}:2: column 'label': 'division' never occurs in the train split" in str(failure.value)
    assert models == []


@pytest.mark.parametrize(
    ("rows", "extra", "error", "expected"),
    [
        (ROWS, ["method.problem_type=binary"], DataError, "binary needs exactly 2 labels"),
        (ROWS, ["+method.class_weights={division: 2.0}"], ValueError, "unknown label(s) ['division']"),
        ([{"text": "x", "label": "a"}], [], DataError, "multiclass needs at least 2 labels"),
    ],
)
def test_label_set_problems_fail_before_loading(
    compose: Any, tmp_path: Path, models: list[Any], rows: Any, extra: list[str], error: type, expected: str
) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(error, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run_method(classification.run, compose, tmp_path / "run", _overrides(data, None, *extra))
    assert models == []


def test_label_vocabulary_from_names_ids_or_config() -> None:
    from datasets import Dataset

    names = Dataset.from_list([{"label": "b"}, {"label": "a"}, {"label": "b"}])
    ids = Dataset.from_list([{"label": 0}, {"label": 2}])
    assert classification.label_vocabulary(names, ClassificationConfig()) == ["a", "b"]
    assert classification.label_vocabulary(ids, ClassificationConfig()) == ["0", "1", "2"]
    assert classification.label_vocabulary(names, ClassificationConfig(labels=["b", "a", "c"])) == ["b", "a", "c"]


def test_config_checks_and_registration(compose: Any) -> None:
    assert METHODS["classification"].schema is ClassificationConfig
    assert compose(["method=classification"]).method.truncation_side == "right"
    with pytest.raises(ValueError, match="threshold"):
        ClassificationConfig(threshold=1.0)
    with pytest.raises(ValueError, match="duplicates"):
        ClassificationConfig(labels=["a", "a"])
    with pytest.raises(ValueError, match="must be > 0"):
        ClassificationConfig(class_weights={"a": 0.0})


# --- runs on the tiny random model ----------------------------------------------------------------------------------


def _trained_logits(model: Any, tokenizer: Any, texts: list[Any]) -> torch.Tensor:
    encoded = [reward_models.encode(tokenizer, t, max_length=1024)[0] for t in texts]
    input_ids, attention_mask = pad_batch(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        return sequence_scores(model.eval(), input_ids, attention_mask)


@pytest.mark.parametrize("lora", [False, True])
def test_multiclass_run_saves_labels_and_loads_with_the_same_logits(
    compose: Any, tmp_path: Path, models: list[Any], lora: bool
) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    extra = [f"model.lora.enabled={str(lora).lower()}", "+method.class_weights.subtraction=2"]
    metrics = run_method(classification.run, compose, tmp_path / "run", _overrides(data, data, *extra))
    for key in (
        "eval_accuracy",
        "eval_f1_macro",
        "eval_f1_micro",
        "eval_precision/addition",
        "eval_recall/subtraction",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert (tmp_path / "run" / "confusion_matrix.png").is_file()
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text(encoding="utf-8"))
    assert config["id2label"] == {"0": "addition", "1": "multiplication", "2": "subtraction"}
    assert config["label2id"] == {"addition": 0, "multiplication": 1, "subtraction": 2}
    assert config["problem_type"] == "single_label_classification"
    (trained, start), moved = models[0], trainable(models[0][0])
    assert all(not torch.equal(moved[n], start[n]) for n in moved)
    loaded, tokenizer = load_sequence_classifier(str(tmp_path / "run" / "model"))
    texts = [r["text"] for r in ROWS]
    expected = _trained_logits(trained, tokenizer, texts)
    assert torch.allclose(_trained_logits(loaded, tokenizer, texts), expected, atol=1e-4)
    assert loaded.config.id2label[2] == "subtraction"


def test_multilabel_run_with_message_text_logs_auc_and_no_confusion_matrix(compose: Any, tmp_path: Path) -> None:
    rows = [
        {"text": [{"role": "user", "content": r["text"]}], "label": [r["label"], *(["even"] if i % 2 else [])]}
        for i, r in enumerate(ROWS)
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    metrics = run_method(
        classification.run, compose, tmp_path / "run", _overrides(data, data, "method.problem_type=multilabel")
    )
    assert 0.0 <= metrics["eval_roc_auc"] <= 1.0
    assert "eval_recall/even" in metrics
    assert not (tmp_path / "run" / "confusion_matrix.png").exists()
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text(encoding="utf-8"))
    assert config["problem_type"] == "multi_label_classification"
    assert len(config["id2label"]) == 4


# --- the demo data, the CLI -----------------------------------------------------------------------------------------


def test_shipped_demo_files_match_the_generator(tmp_path: Path) -> None:
    for path in demo_classification.write(tmp_path):
        shipped = demo_classification.DEMO_DIR / path.name
        assert path.read_bytes() == shipped.read_bytes(), (
            f"{path.name} is stale: run python -m {demo_classification.__name__}"
        )
    rows = [json.loads(line) for line in shipped.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 100
    for row in rows:
        a, op, b = row["conversation"][1]["content"].split(" = ")[0].split()
        assert row["operation"] == demo_classification.OPERATIONS[op]
        result = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        stated = int(row["conversation"][1]["content"].split(" = ")[1])
        assert row["verdict"] == ("correct" if stated == result else "incorrect")
        assert row["tags"] == demo_classification.tags(result)


def test_cli_binary_run_on_the_verdict_demo_writes_metrics_and_plot(tmp_path: Path) -> None:
    result = launch(
        [
            "model=tiny_random",
            "method=classification",
            "method.problem_type=binary",
            "data=demo_classification_verdict",
            "logger=none",
            "data.sources.0.sample_fraction=0.05",
            "data.max_eval_samples=16",
            "method.max_steps=3",
            "method.per_device_train_batch_size=4",
            "method.logging_steps=1",
            "method.save_strategy=no",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("results.json")]
    final = [e for e in read_logs(run_dir) if "eval_accuracy" in e][-1]
    assert 0.0 <= final["eval_roc_auc"] <= 1.0
    assert {"eval_precision/correct", "eval_recall/incorrect", "eval_f1_macro"} <= set(final)
    assert (run_dir / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((run_dir / "model" / "config.json").read_text(encoding="utf-8"))
    assert config["id2label"] == {"0": "correct", "1": "incorrect"}


# --- learning check on the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_learns_the_operation_of_demo_questions(compose: Any, tmp_path: Path) -> None:
    """SmolLM2-135M (score head + top 6 layers) learns the operation of held-out demo questions.

    Accuracy ends well above the majority class (addition, 38 of 100). The command and the recorded numbers are in
    the README (classification section).
    """
    overrides = [
        "model=smollm2_135m",
        "model.unfreeze_layers_patterns=[score,'*.layers.2[4-9]']",
        "method=classification",
        "logger=none",
        "data=demo_classification",
        "method.max_steps=20",
        "method.per_device_train_batch_size=8",
        "method.per_device_eval_batch_size=50",
        "method.learning_rate=1e-4",
        "method.logging_steps=5",
        "method.eval_steps=20",
        "method.save_strategy=no",
        "method.max_length=64",
    ]
    set_seed(42)  # as the runner does
    run_method(classification.run, compose, tmp_path / "run", overrides)
    evals = [e for e in read_logs(tmp_path / "run") if "eval_accuracy" in e]
    before, after = evals[0], evals[-1]
    print({k: (before[k], after[k]) for k in ("eval_accuracy", "eval_f1_macro", "eval_loss")})
    assert (before["step"], after["step"]) == (0, 20)
    assert after["eval_accuracy"] >= 0.6  # majority class: 0.38
    assert after["eval_loss"] < before["eval_loss"]
