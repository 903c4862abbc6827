r"""Sequence classification: binary, multiclass or multilabel, with a head on a decoder's last token.

Rows hold ``text`` (a string, or a ``[{role, content}]`` message list rendered with the chat template) and
``label``: a name (string) or an id (integer), or for ``multilabel`` a list of them. The label vocabulary is
``method.labels`` when set, else the sorted names (or ids ``0..max``) of the train split; an eval label outside it
fails before training with its ``file:line``. The names are saved with the model (``config.json``
``id2label``/``label2id``). Losses, with optional per-label weights :math:`w` and :math:`p = sigmoid(z)`:

* binary / multiclass (two or more logits, softmax): ``loss_i = w_{y_i} · (-log softmax(z_i)[y_i])``;
* multilabel (one logit per label): ``loss_i = (1/C) Σ_c w_c · BCE(z_ic, y_ic)``, a label predicted when
  :math:`p ≥` ``threshold``.

Both are averaged over the examples of the optimizer step. Eval logs accuracy (exact match for multilabel),
macro/micro F1, per-label precision/recall, ROC-AUC (binary, multilabel) and writes ``confusion_matrix.png``
(binary, multiclass).

Deviations from the original toolkit: multilabel works (thresholded predictions, micro/macro averaging; the
original's argmax metrics failed on multi-hot targets and ``problem_type`` was never set); ``num_labels`` comes
from the data, not a separate setting; the label vocabulary comes from the train split only (an unseen eval label
is an error, not a silent new class); weighted cross-entropy is a plain mean of weighted terms (torch divides by
the summed weights), so micro-batches add up exactly under gradient accumulation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.data.validate import ORIGIN, DataError, RowChecks, message_list_problems, require_columns
from alignment.models.config import ProblemType, TruncationSide
from alignment.models.seqcls import encode, pad_batch
from alignment.ranges import RANGE, Range, bounded, check_fields
from alignment.task import MethodConfig, TaskConfig

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from alignment.config import RunConfig
    from alignment.context import RunContext

log = logging.getLogger(__name__)

TEXT, LABEL = "text", "label"
COLUMNS = (TEXT, LABEL)


class Problem(StrEnum):
    """What a row's label means."""

    binary = "binary"
    """Exactly two labels, one per row (two logits; ROC-AUC on the second label's probability)."""
    multiclass = "multiclass"
    """Two or more labels, one per row."""
    multilabel = "multilabel"
    """Any subset of the labels per row (``label`` is a list)."""


@dataclass
class ClassificationConfig(MethodConfig):
    """Sequence classification."""

    name: str = "classification"
    """Registry key."""
    problem_type: Problem = Problem.multiclass
    """binary, multiclass or multilabel."""
    labels: list[str] = field(default_factory=list)
    """Label names in id order (integer labels index this list); empty: the sorted names of the train split, or
    ids ``0..max id`` named by their number when the labels are integers."""
    class_weights: dict[str, float] = field(default_factory=dict, metadata={RANGE: Range(gt=0)})
    """Loss weight per label name; unlisted labels weigh 1 (CLI: ``+method.class_weights.rare=5``)."""
    threshold: float = bounded(0.5, gt=0, lt=1)
    """multilabel: a label is predicted when its sigmoid probability is at least this."""
    max_length: int = bounded(1024, ge=1)
    """Tokens per sequence; longer ones are cut (counted and logged)."""
    truncation_side: TruncationSide = TruncationSide.right
    """Which end of a sequence longer than ``max_length`` is cut; the score is read at the last kept token."""
    max_tokens_per_batch: int | None = bounded(None, ge=1)
    """Token budget per training micro-batch (whole examples, at least one); None: ``per_device_train_batch_size``."""

    def __post_init__(self) -> None:
        check_fields(self, "method")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"method.labels has duplicates: {self.labels}")


# --- losses -----------------------------------------------------------------------------------------------------


def weighted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy per example, ``(batch,)``, times the weight of its label; the batch loss is the mean.

    ``logits`` ``(batch, classes)``, ``labels`` ``(batch,)`` ids, ``class_weights`` ``(classes,)``. Worked values
    with logits ``[0, ln 3]`` (softmax ``[1/4, 3/4]``): label 1 gives ``-ln 0.75 = 0.287682``; label 0 gives
    ``ln 4 = 1.386294``; label 0 with weights ``[2, 1]`` gives ``2.772589``. Equal logits over C classes give ``ln C``.
    """
    nll = -logits.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    return nll * class_weights[labels] if class_weights is not None else nll


def multilabel_bce(
    logits: torch.Tensor, targets: torch.Tensor, *, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy with logits per example, ``(batch,)``: the (weighted) mean over labels.

    ``logits`` and multi-hot ``targets`` ``(batch, labels)``, ``class_weights`` ``(labels,)``. Worked values
    (``sigmoid(ln 3) = 0.75``): logits ``[ln 3, ln 3]``, targets ``[1, 0]`` give
    ``(0.287682 + 1.386294) / 2 = 0.836988``; with weights ``[1, 3]`` ``(0.287682 + 3 · 1.386294) / 2 = 2.223282``;
    logit 0 gives ``ln 2`` whatever the target.
    """
    import torch

    per_label = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if class_weights is not None:
        per_label = per_label * class_weights
    return per_label.mean(-1)


# --- data ---------------------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    return "id" if isinstance(value, int) and not isinstance(value, bool) else "name" if isinstance(value, str) else ""


@dataclass
class RowChecker:
    """Validation of classification rows; remembers the first row's kinds so later rows must match them.

    (Every row of a column must hold the same kind: text or messages, names or ids; mixed kinds cannot form one
    dataset column, so they are reported with their row here.)
    """

    problem: Problem
    labels: list[str] | None
    text_kind: str | None = None
    label_kind: str | None = None

    def __call__(self, row: Mapping[str, Any]) -> list[str]:
        """Problems of one row; empty when it can be trained on."""
        problems = require_columns(row, COLUMNS)
        if problems:
            return problems
        return self._text_problems(row[TEXT]) + self._label_problems(row[LABEL])

    def _text_problems(self, text: Any) -> list[str]:
        kind = "text" if isinstance(text, str) else "messages"
        if kind == "text" and not text.strip():
            return [f"column {TEXT!r}: empty text"]
        problems = message_list_problems(text, TEXT) if kind == "messages" else []
        if problems:
            return problems
        self.text_kind = self.text_kind or kind
        if kind != self.text_kind:
            return [f"column {TEXT!r}: {kind}, but the first row holds {self.text_kind} (use one kind per dataset)"]
        return []

    def _label_problems(self, label: Any) -> list[str]:
        multi = self.problem is Problem.multilabel
        if multi != isinstance(label, list):
            expected = "a list of names or ids" if multi else "one name (string) or id (integer)"
            return [f"column {LABEL!r}: problem_type={self.problem.value} expects {expected}, got {label!r}"]
        problems = []
        for value in label if multi else [label]:
            kind = _kind(value)
            if not kind:
                problems.append(f"column {LABEL!r}: expected a name (string) or an id (integer), got {value!r}")
                continue
            self.label_kind = self.label_kind or kind
            if kind != self.label_kind:
                problems.append(f"column {LABEL!r}: {value!r} is a {kind}, but the first row uses {self.label_kind}s")
            elif kind == "id" and (value < 0 or (self.labels is not None and value >= len(self.labels))):
                upper = f" < {len(self.labels)} (method.labels)" if self.labels is not None else ""
                problems.append(f"column {LABEL!r}: id {value} out of range, expected 0 <= id{upper}")
            elif kind == "name" and self.labels is not None and value not in self.labels:
                problems.append(f"column {LABEL!r}: unknown label {value!r} (method.labels: {', '.join(self.labels)})")
        return problems


def _values(label: Any) -> list[Any]:
    return list(label) if isinstance(label, list) else [label]


def label_vocabulary(train: Dataset, method: ClassificationConfig) -> list[str]:
    """Label names in id order: ``method.labels``, or the train split's sorted names (ids: ``0..max`` as names).

    Raises:
        DataError: the problem type does not fit the number of labels.
    """
    if method.labels:
        names = list(method.labels)
    else:
        seen = {value for label in train[LABEL] for value in _values(label)}
        ids = all(isinstance(v, int) for v in seen)
        names = [str(i) for i in range(max(seen) + 1)] if ids and seen else sorted(str(v) for v in seen)
    if method.problem_type is Problem.binary and len(names) != 2:
        raise DataError(f"problem_type=binary needs exactly 2 labels, the train split has {len(names)}: {names}")
    if method.problem_type is Problem.multiclass and len(names) < 2:
        raise DataError(f"problem_type=multiclass needs at least 2 labels, the train split has {names}")
    return names


def check_eval_labels(evaluation: Dataset, names: Sequence[str]) -> None:
    """Every eval label must be in the vocabulary.

    Raises:
        DataError: lists the ``file:line`` of each row with an unseen label.
    """
    problems = [
        f"{row[ORIGIN]}: column {LABEL!r}: {value!r} never occurs in the train split (labels: {', '.join(names)}); "
        "set method.labels to list every label"
        for row in evaluation
        for value in _values(row[LABEL])
        if not (0 <= value < len(names) if isinstance(value, int) else value in names)
    ]
    if problems:
        raise DataError(f"{len(problems)} unseen eval label(s); nothing was trained:\n  " + "\n  ".join(problems[:20]))


def class_weight_vector(weights: Mapping[str, float], names: Sequence[str]) -> torch.Tensor | None:
    """Per-label weights in id order (1 where unlisted); None without weights.

    Raises:
        ValueError: a weighted label is not in the vocabulary.
    """
    import torch

    if not weights:
        return None
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"method.class_weights: unknown label(s) {unknown}; labels are {list(names)}")
    return torch.tensor([float(weights.get(name, 1.0)) for name in names])


def tokenize_examples(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, names: Sequence[str], method: ClassificationConfig
) -> Dataset:
    """``input_ids`` and ``labels`` (an id, or a multi-hot list for multilabel); cut rows are counted and logged."""
    index = {name: i for i, name in enumerate(names)}
    multi = method.problem_type is Problem.multilabel

    def label_id(value: Any) -> int:
        return value if isinstance(value, int) else index[value]

    def encode_row(row: dict[str, Any]) -> dict[str, Any]:
        ids, cut = encode(tokenizer, row[TEXT], max_length=method.max_length, truncation_side=method.truncation_side)
        ids_of_row = [label_id(v) for v in _values(row[LABEL])]
        target: Any = [float(i in ids_of_row) for i in range(len(names))] if multi else ids_of_row[0]
        return {"input_ids": ids, "labels": target, "truncated": cut}

    encoded = dataset.map(encode_row, remove_columns=list(dataset.column_names), desc="Tokenizing")
    truncated = sum(encoded["truncated"])
    if truncated:
        log.warning(
            "classification: %d of %d texts cut to max_length=%d (%s side)",
            truncated,
            len(encoded),
            method.max_length,
            method.truncation_side.value,
        )
    return encoded.remove_columns("truncated")


@dataclass
class ClassificationCollator:
    """Right-pad a micro-batch; ``labels`` are ids ``(batch,)`` or multi-hot ``(batch, labels)``."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` ``(batch, longest)`` and ``labels``."""
        import torch

        input_ids, attention_mask = pad_batch([r["input_ids"] for r in rows], self.pad_token_id)
        labels = torch.tensor([r["labels"] for r in rows])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- metrics and what the trainer calls ------------------------------------------------------------------------


def plot_confusion_matrix(matrix: Any, names: Sequence[str], path: Path, *, title: str) -> None:
    """Counts of (true, predicted) label pairs as an annotated heat map, saved as a PNG (matplotlib, no display)."""
    import numpy as np
    from matplotlib.figure import Figure

    size = 2.0 + 0.6 * len(names)
    figure = Figure(figsize=(size + 1.0, size))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(len(names)), labels=list(names), rotation=45, ha="right")
    axes.set_yticks(range(len(names)), labels=list(names))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for row, column in np.ndindex(*matrix.shape):
        count = matrix[row, column]
        color = "white" if count > threshold else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=color)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def _roc_auc(targets: Any, probabilities: Any) -> float | None:
    """Mean ROC-AUC over the label columns that hold both classes; None when none does."""
    from sklearn.metrics import roc_auc_score

    columns = [c for c in range(targets.shape[1]) if 0 < targets[:, c].sum() < targets.shape[0]]
    if not columns:
        return None
    return float(sum(roc_auc_score(targets[:, c], probabilities[:, c]) for c in columns) / len(columns))


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, names: Sequence[str], *, problem: Problem, threshold: float
) -> tuple[dict[str, float], Any]:
    """Accuracy, macro/micro F1, per-label precision/recall, ROC-AUC; and the confusion matrix (None: multilabel).

    ``logits`` ``(n, labels)``; ``labels`` ids ``(n,)`` or multi-hot ``(n, labels)``. ROC-AUC is averaged over the
    labels that are both present and absent in the targets, and left out when no label is.
    """
    import numpy as np
    import torch
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    ids = list(range(len(names)))
    if problem is Problem.multilabel:
        probabilities = torch.sigmoid(logits).numpy()
        truth = labels.numpy().astype(int)
        predicted = (probabilities >= threshold).astype(int)
        matrix = None
        auc = _roc_auc(truth, probabilities)
    else:
        probabilities = logits.softmax(-1).numpy()
        truth = labels.numpy()
        predicted = probabilities.argmax(-1)
        matrix = confusion_matrix(truth, predicted, labels=ids)
        one_hot = np.eye(len(names), dtype=int)[truth]
        auc = _roc_auc(one_hot[:, 1:], probabilities[:, 1:]) if problem is Problem.binary else None
    averaged = {"labels": ids, "zero_division": 0}
    metrics = {
        "accuracy": float(accuracy_score(truth, predicted)),
        "f1_macro": float(f1_score(truth, predicted, average="macro", **averaged)),
        "f1_micro": float(f1_score(truth, predicted, average="micro", **averaged)),
    }
    precision = precision_score(truth, predicted, average=None, **averaged)
    recall = recall_score(truth, predicted, average=None, **averaged)
    for name, p, r in zip(names, precision, recall, strict=True):
        metrics[f"precision/{name}"] = float(p)
        metrics[f"recall/{name}"] = float(r)
    if auc is not None:
        metrics["roc_auc"] = auc
    return metrics, matrix


@dataclass
class ClassificationObjective:
    """The classification loss and metrics, for :class:`~alignment.methods.seqcls.trainer.SequenceScoreTrainer`."""

    names: list[str]
    """Label names in id order."""
    problem: Problem
    """binary, multiclass or multilabel."""
    threshold: float
    """multilabel decision threshold on the sigmoid."""
    class_weights: torch.Tensor | None
    """Per-label loss weights ``(labels,)``, or None."""
    plot_path: Path | None
    """Where each evaluation writes the confusion matrix (binary/multiclass; None: no plot)."""

    def items(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Examples in the micro-batch."""
        return int(batch["labels"].size(0))

    def loss(
        self, scores: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example loss from ``(batch, labels)`` logits; records logits and labels."""
        labels = batch["labels"]
        weights = self.class_weights.to(scores.device) if self.class_weights is not None else None
        loss_fn = LOSSES[self.problem]
        per_example = loss_fn(scores, labels.to(scores.dtype) if labels.dtype.is_floating_point else labels, weights)
        return per_example, {"logits": scores.detach(), "labels": labels.detach()}

    def summarize(
        self, records: Mapping[str, torch.Tensor], *, mode: str, step: int, main_process: bool
    ) -> dict[str, float]:
        """Training: accuracy since the last log. Evaluation: every metric, and the confusion-matrix PNG."""
        metrics, matrix = classification_metrics(
            records["logits"].float(), records["labels"], self.names, problem=self.problem, threshold=self.threshold
        )
        if mode == "train":
            return {"accuracy": metrics["accuracy"]}
        if main_process and matrix is not None and self.plot_path is not None:
            title = f"step {step}: accuracy {metrics['accuracy']:.3f} on {len(records['labels'])} examples"
            plot_confusion_matrix(matrix, self.names, self.plot_path, title=title)
        return metrics


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return weighted_cross_entropy(logits, labels, class_weights=weights)


def _bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return multilabel_bce(logits, labels, class_weights=weights)


LOSSES = {Problem.binary: _cross_entropy, Problem.multiclass: _cross_entropy, Problem.multilabel: _bce}
"""The loss of each problem type (binary uses two logits and softmax, like multiclass)."""
PROBLEM_TYPES = {
    Problem.binary: ProblemType.single_label_classification,
    Problem.multiclass: ProblemType.single_label_classification,
    Problem.multilabel: ProblemType.multi_label_classification,
}
"""HF ``config.problem_type`` saved with the model."""


# --- run --------------------------------------------------------------------------------------------------------


def row_checks(method: TaskConfig) -> RowChecks:
    """The rows a classifier trains on: a text and labels of the configured problem type each."""
    assert isinstance(method, ClassificationConfig)
    return RowChecks(RowChecker(method.problem_type, list(method.labels) or None), COLUMNS)


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Validate the rows and labels, tokenise, load the classifier, train, save it with its labels; final metrics."""
    from alignment.data.mix import build_splits
    from alignment.methods.seqcls.trainer import SequenceScoreTrainer
    from alignment.models.load import load_tokenizer
    from alignment.models.seqcls import load_model_for_classification, save_classifier
    from alignment.training.arguments import training_args
    from alignment.training.callbacks import MetricsJsonlCallback
    from alignment.training.checkpoint import train_and_save

    method = cfg.method
    assert isinstance(method, ClassificationConfig)
    checks = row_checks(method)
    splits = build_splits(cfg.data, checks.validate, checks.columns)
    names = label_vocabulary(splits.train, method)
    if splits.eval is not None:
        check_eval_labels(splits.eval, names)
    weights = class_weight_vector(method.class_weights, names)
    tokenizer = load_tokenizer(cfg.model)
    train = tokenize_examples(splits.train, tokenizer, names, method)
    evaluation = tokenize_examples(splits.eval, tokenizer, names, method) if splits.eval is not None else None
    log.info("classification: %s over %d labels: %s", method.problem_type.value, len(names), ", ".join(names))
    model = load_model_for_classification(
        cfg.model, tokenizer, labels=names, problem_type=PROBLEM_TYPES[method.problem_type]
    )

    args = training_args(
        cfg,
        ctx,
        evaluation=evaluation is not None,
        remove_unused_columns=False,
        prediction_loss_only=True,
        label_names=["labels"],
    )
    objective = ClassificationObjective(
        names, method.problem_type, method.threshold, weights, ctx.output_dir / "confusion_matrix.png"
    )
    trainer = SequenceScoreTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=ClassificationCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[MetricsJsonlCallback(ctx.output_dir / "metrics.jsonl")],
        objective=objective,
        train_lengths=[len(ids) for ids in train["input_ids"]],
        max_tokens_per_batch=method.max_tokens_per_batch,
    )
    metrics = train_and_save(trainer, method=method, model_dir=ctx.model_dir)
    if trainer.is_world_process_zero():
        save_classifier(trainer.model, tokenizer, ctx.model_dir)
    return metrics
