"""The distillation trainer, its teacher sources and cache, and the wiring of a run.

Kept apart from :mod:`alignment.methods.distill.distill` so that composing a config never imports the Trainer.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alignment.data.chat_template import IGNORE_INDEX
from alignment.data.validate import empty_split_error
from alignment.methods.distill.distill import (
    CacheFormat,
    DistillConfig,
    TeacherSource,
    tokenize_row,
)
from alignment.methods.distill.losses import LOSSES, LossParams, Support, hard_label_weights, topk_support, topk_teacher
from alignment.models.frozen import cached_outputs, fingerprint, load_frozen_copy, move_to_device
from alignment.training.chunked import (
    CHUNK_LOGITS,
    Objective,
    OutputHead,
    chunked_head_loss,
    eager_head_loss,
    final_hidden_states,
    head_is_sharded,
    module_head_loss,
    output_head,
    project,
)
from alignment.training.trainer import StepNormalisedTrainer

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignment.config import RunConfig
    from alignment.context import RunContext
    from alignment.methods.distill.distill import TeacherConfig

log = logging.getLogger(__name__)

STATS = ("tokens", "kd", "ce", "student_entropy", "teacher_entropy", "top1_agreement", "teacher_mass")
"""Sums kept per micro-batch for the logged metrics (added over micro-batches and ranks, divided at log time)."""

SHARD_ROWS = 512
"""Rows per cache shard file."""


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers map some id to different tokens (or disagree on special tokens)."""


def check_tokenizers(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Fail unless both tokenizers have the same id -> token map and the same special tokens.

    Raises:
        TokenizerMismatchError: naming the first differing id (or special token).
    """
    size_s, size_t = len(student), len(teacher)
    shared = min(size_s, size_t)
    tokens_s = student.convert_ids_to_tokens(list(range(shared)))
    tokens_t = teacher.convert_ids_to_tokens(list(range(shared)))
    for index, (a, b) in enumerate(zip(tokens_s, tokens_t, strict=True)):
        if a != b:
            raise TokenizerMismatchError(
                f"teacher and student tokenizers differ at id {index}: student {a!r}, teacher {b!r}; distillation "
                "needs one shared tokenizer (set method.teacher.name_or_path to a teacher of the student's family)"
            )
    if size_s != size_t:
        longer, extra = ("student", student) if size_s > size_t else ("teacher", teacher)
        raise TokenizerMismatchError(
            f"the {longer} tokenizer has {abs(size_s - size_t)} more ids (first: id {shared} = "
            f"{extra.convert_ids_to_tokens(shared)!r}); distillation needs one shared tokenizer"
        )
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id"):
        a, b = getattr(student, attr), getattr(teacher, attr)
        if a != b:
            raise TokenizerMismatchError(f"teacher and student tokenizers differ in {attr}: student {a}, teacher {b}")


def shared_vocabulary(student_rows: int, teacher_rows: int, tokenizer_size: int) -> int:
    """The output rows both heads share; a padded-larger head is cut to it (logged)."""
    vocab = min(student_rows, teacher_rows)
    if vocab < tokenizer_size:
        raise ValueError(f"an output head has {vocab} rows, fewer than the tokenizer's {tokenizer_size} ids")
    if student_rows != teacher_rows:
        log.warning(
            "distill: output heads differ in size (student %d, teacher %d rows) but the tokenizers agree on all %d "
            "ids: using the shared range [0, %d)",
            student_rows,
            teacher_rows,
            tokenizer_size,
            vocab,
        )
    return vocab


# --- data ------------------------------------------------------------------------------------------------------


def tokenize_split(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DistillConfig, split: str) -> Dataset:
    """Token ids, labels and a ``row`` index per conversation; those with no counted token are dropped.

    Raises:
        DataError: every conversation of the split was dropped.
    """
    encoded = dataset.map(
        lambda row: tokenize_row(row, tokenizer, cfg), remove_columns=dataset.column_names, desc="Tokenizing"
    )
    kept = encoded.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"][1:]))
    truncated, dropped = sum(encoded["truncated"]), len(encoded) - len(kept)
    if truncated or dropped:
        log.warning(
            "distill: %d of %d conversations cut to max_length=%d; %d dropped because no counted token survived",
            truncated,
            len(encoded),
            cfg.max_length,
            dropped,
        )
    if len(kept) == 0:
        reason = f"no counted token left within method.max_length={cfg.max_length}"
        raise empty_split_error(split, dataset, {reason: dropped}, unit="conversations")
    kept = kept.remove_columns("truncated")
    return kept.add_column("row", list(range(len(kept))))


@dataclass(frozen=True)
class Collator:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` and each row's index."""

    pad_token_id: int

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of tokenised rows to the longest."""
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "row": torch.tensor([r["row"] for r in rows], dtype=torch.long),
        }


def counted_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens - 1)``: the positions that predict a counted label (shifted by one)."""
    return labels[:, 1:] != IGNORE_INDEX


# --- teachers --------------------------------------------------------------------------------------------------


class TeacherOutputs:
    """The teacher's per-token outputs for the counted tokens of a micro-batch."""

    head: OutputHead | None = None
    """The teacher's output head on the student's device (None for a top-k cache)."""

    def prepare(self, accelerator: Any) -> None:
        """Place what runs beside the student once the Trainer's accelerator exists (nothing, for a cache)."""

    def outputs(self, batch: Mapping[str, torch.Tensor], counted: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
        """``hidden`` ``(N, H_T)``, or ``ids``/``logp``/``tail`` of a top-k cache, in counted-token order."""
        raise NotImplementedError


class ModelTeacher(TeacherOutputs):
    """The frozen teacher in this process, on its own device or the student's, or sharded like the student.

    A ZeRO-3 partitioned teacher (loaded under ``zero.Init``) keeps its body sharded and runs in a DeepSpeed engine,
    an FSDP2 one is sharded per layer like the student (:meth:`prepare`); its output head alone is kept as a full
    copy (gathered once under ZeRO-3), which the loss projects through.
    """

    def __init__(self, model: PreTrainedModel, device: torch.device, student_device: torch.device) -> None:
        from alignment.models.sharded import fsdp_loading, is_partitioned

        _, head = output_head(model)
        self.sharded = is_partitioned(model) or fsdp_loading()
        self.device = student_device if self.sharded else device  # a sharded teacher runs where the student does
        if self.sharded:
            self.model: Any = model
            # FSDP's rank-0 loading moves the other ranks' weights to the meta device: the copy must be its own.
            self.head = (
                _gathered_head(head, student_device) if is_partitioned(model) else _head_copy(head, student_device)
            )
        else:
            self.model = move_to_device(model, device)
            self.head = head if device == student_device else _head_on(head, student_device)
        self.student_device = student_device

    def prepare(self, accelerator: Any) -> None:
        """Shard a teacher loaded for it like the student: a ZeRO-3 DeepSpeed engine (no optimizer), FSDP2 shards."""
        from alignment.models.sharded import prepare_frozen

        if self.sharded:
            self.model = prepare_frozen(self.model, accelerator)

    def outputs(self, batch: Mapping[str, torch.Tensor], counted: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
        """The teacher's final hidden states at the counted positions (only they move between devices)."""
        with torch.no_grad():
            hidden = final_hidden_states(
                self.model,
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
            )
            return {"hidden": hidden[:, :-1][counted.to(self.device)].to(self.student_device)}


class CacheTeacher(TeacherOutputs):
    """Cached teacher outputs, one table per split, looked up by the rows' indices."""

    def __init__(self, tables: dict[str, dict[str, torch.Tensor]], head: OutputHead | None) -> None:
        self.tables = tables
        self.head = head

    def outputs(self, batch: Mapping[str, torch.Tensor], counted: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
        """The rows' cached outputs, concatenated in batch order."""
        table = self.tables[mode]
        offsets = table["offsets"]
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for position, row in enumerate(batch["row"].tolist()):
            start, end = int(offsets[row]), int(offsets[row + 1])
            expected = int(counted[position].sum())
            if end - start != expected:
                raise RuntimeError(f"teacher cache row {row}: {end - start} tokens cached, {expected} counted")
            for key, value in table.items():
                if key != "offsets":
                    parts[key].append(value[start:end])
        device = counted.device
        return {key: torch.cat(values).to(device) for key, values in parts.items()}


def _head_on(head: OutputHead, device: torch.device) -> OutputHead:
    """A copy of a frozen head's tensors on ``device``."""
    bias = head.bias.to(device) if head.bias is not None else None
    return replace(head, weight=head.weight.detach().to(device), bias=bias)


def _gathered_head(head: OutputHead, device: torch.device) -> OutputHead:
    """A full copy on ``device`` of a ZeRO-3 partitioned head's tensors, gathered once from every rank's partition."""
    import deepspeed  # type: ignore[import-untyped]

    tensors = [t for t in head.tensors() if t is not None]
    with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None):
        weight = head.weight.detach().to(device, copy=True)
        bias = head.bias.detach().to(device, copy=True) if head.bias is not None else None
    return replace(head, weight=weight, bias=bias)


def _head_copy(head: OutputHead, device: torch.device) -> OutputHead:
    """A copy of a frozen head's tensors on ``device`` that shares no storage with the model."""
    bias = head.bias.detach().to(device, copy=True) if head.bias is not None else None
    return replace(head, weight=head.weight.detach().to(device, copy=True), bias=bias)


def _teacher_device(cfg: TeacherConfig, student_device: torch.device) -> torch.device:
    return torch.device(cfg.device) if cfg.device is not None else student_device


def load_teacher_head(cfg: TeacherConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> OutputHead:
    """The teacher's output head alone: read from its safetensors when it is a local folder, else from a load.

    A ``hidden`` cache trains with this head and no teacher body in memory.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    from alignment.models import embedded
    from alignment.models.load import resolve_dtype

    path = Path(embedded.resolve(cfg.name_or_path))
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code) if files else None
    if config is not None:
        text = config.get_text_config()
        names = ["lm_head.weight"]
        if getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
            names += ["embed_tokens.weight", "wte.weight", "word_embeddings.weight"]
        for name in names:
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    key = next((k for k in f.keys() if k == name or k.endswith("." + name)), None)  # noqa: SIM118
                    if key is None:
                        continue
                    weight = f.get_tensor(key).to(device=device, dtype=resolve_dtype(cfg.dtype))
                scale = float(getattr(text, "logit_scale", None) or 1.0)
                if getattr(text, "logits_scaling", None):
                    scale /= float(text.logits_scaling)
                cap = getattr(text, "final_logit_softcapping", None)
                log.info("distill: teacher output head %s read from %s (no teacher body loaded)", key, file.name)
                return OutputHead(weight, logit_scale=scale, softcap=float(cap) if cap else None)
    log.info("distill: loading the teacher to take its output head (%s is not a local safetensors folder)", path)
    teacher = load_frozen_copy(cfg, tokenizer)
    _, head = output_head(teacher)
    head = _head_on(head, device)
    del teacher
    return head


# --- the cache -------------------------------------------------------------------------------------------------


def cache_key(cfg: DistillConfig, split: Dataset) -> str:
    """Fingerprint of a split's cache: teacher, token ids and labels, max_length, tokens, format (k, tau: topk)."""
    parts = [token_hash(split), str(cfg.max_length), str(cfg.tokens), str(cfg.cache_format)]
    if cfg.cache_format is CacheFormat.topk:
        parts += [str(cfg.cache_topk), repr(cfg.temperature)]
    return "distill-" + fingerprint(cfg.teacher, *parts)


def token_hash(split: Dataset) -> str:
    """A hash of the split's token ids and labels: the cache follows the tokens, whatever produced them."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for ids, labels in zip(split["input_ids"], split["labels"], strict=True):
        digest.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        digest.update(np.asarray(labels, dtype=np.int64).tobytes() + b"/")
    return digest.hexdigest()


def teacher_cache(
    split: Dataset, teacher: PreTrainedModel | None, cfg: DistillConfig, batch_size: int, key: str
) -> tuple[dict[str, torch.Tensor], bool]:
    """The split's cached teacher outputs (``offsets`` + per-token tensors), computed by ``teacher`` when missing.

    Returns the table and whether every shard was a cache hit. Shards of :data:`SHARD_ROWS` rows are files of
    their own (``<cache>/reference_logps/distill-<key>-<shard>.safetensors``).
    """
    from alignment.paths import cache_dir

    collate = Collator(pad_token_id=0)
    tables, hit = [], True
    for shard, start in enumerate(range(0, len(split), SHARD_ROWS)):
        rows = range(start, min(start + SHARD_ROWS, len(split)))
        name = f"{key}-{shard:05d}"
        if not (cache_dir() / "reference_logps" / f"{name}.safetensors").exists():
            hit = False
            if teacher is None:
                raise RuntimeError(f"teacher cache shard {name} is missing and no teacher was loaded")

        def compute(rows: range = rows) -> dict[str, torch.Tensor]:
            assert teacher is not None
            return _compute_shard(split, rows, teacher, cfg, collate, batch_size)

        tables.append(cached_outputs(name, compute, what=f"teacher cache ({cfg.cache_format}) shard {shard}"))
    return _concat_shards(tables), hit


def _compute_shard(
    split: Dataset, rows: range, teacher: PreTrainedModel, cfg: DistillConfig, collate: Collator, batch_size: int
) -> dict[str, torch.Tensor]:
    device = next(teacher.parameters()).device
    _, head = output_head(teacher)
    lengths, parts = [0], defaultdict(list)
    with torch.no_grad():
        for start in range(rows.start, rows.stop, batch_size):
            batch = collate([split[i] for i in range(start, min(start + batch_size, rows.stop))])
            counted = counted_positions(batch["labels"]).to(device)
            hidden = final_hidden_states(
                teacher, input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            )[:, :-1][counted]
            lengths.extend(counted.sum(1).tolist())
            if cfg.cache_format is CacheFormat.hidden:
                parts["hidden"].append(hidden.cpu())
                continue
            size = cfg.chunk_size or max(1, CHUNK_LOGITS // head.weight.size(0))
            for chunk in torch.split(hidden, size):
                logp = torch.log_softmax(project(head, chunk) / cfg.temperature, dim=-1)
                ids, top, tail = topk_teacher(logp, min(cfg.cache_topk, logp.size(-1)))
                parts["ids"].append(ids.to(torch.int32).cpu())
                parts["logp"].append(top.to(torch.bfloat16).cpu())
                parts["tail"].append(tail.float().cpu())
    out = {key: torch.cat(values) for key, values in parts.items()}
    out["offsets"] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return out


def _concat_shards(tables: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = defaultdict(list)
    base = 0
    for index, table in enumerate(tables):
        offsets = table["offsets"]
        out["offsets"].append((offsets if index == 0 else offsets[1:]) + base)
        base += int(offsets[-1])
        for key, value in table.items():
            if key != "offsets":
                out[key].append(value)
    return {key: torch.cat(values) for key, values in out.items()}


def cache_summary(table: dict[str, torch.Tensor]) -> dict[str, float]:
    """Tokens, bytes per token and (top-k) the mean captured teacher mass of one split's cache."""
    tokens = int(table["offsets"][-1])
    size = sum(t.numel() * t.element_size() for k, t in table.items() if k != "offsets")
    out = {"tokens": float(tokens), "bytes_per_token": size / max(tokens, 1)}
    if "logp" in table:
        out["teacher_mass"] = float(table["logp"].float().exp().sum(-1).mean())
    return out


# --- the loss --------------------------------------------------------------------------------------------------


def make_objective(
    cfg: DistillConfig, labels: torch.Tensor, teacher: Mapping[str, torch.Tensor], teacher_head: OutputHead | None
) -> Objective:
    """The per-chunk loss ``kd_weight * sum(kd) + ce_weight * sum(ce)`` and the :data:`STATS` sums (no grad)."""
    spec = LOSSES[cfg.loss]
    params = LossParams(jsd_beta=cfg.jsd_beta, skew_alpha=cfg.skew_alpha, ab_alpha=cfg.ab_alpha, ab_beta=cfg.ab_beta)
    tau = cfg.temperature
    factor = tau**2 if cfg.tau_squared else 1.0

    def objective(student: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        vocab = student.size(-1)
        y = labels[rows]
        student_logp1 = torch.log_softmax(student, dim=-1)
        student_logp = student_logp1 if tau == 1.0 else torch.log_softmax(student / tau, dim=-1)
        teacher_logits = None
        if "hidden" in teacher:
            assert teacher_head is not None
            with torch.no_grad():
                teacher_logits = project(teacher_head, teacher["hidden"][rows])[:, :vocab]
                teacher_logp1 = torch.log_softmax(teacher_logits, dim=-1)
                teacher_logp = teacher_logp1 if tau == 1.0 else torch.log_softmax(teacher_logits / tau, dim=-1)
            support = Support(
                student_logp=student_logp,
                teacher_logp=teacher_logp,
                student_logits=student,
                teacher_logits=teacher_logits,
                student_label_logp=student_logp1.gather(-1, y[:, None]).squeeze(-1),
                teacher_label_logp=teacher_logp1.gather(-1, y[:, None]).squeeze(-1),
                student_label_logp_tau=student_logp.gather(-1, y[:, None]).squeeze(-1),
                teacher_label_logp_tau=teacher_logp.gather(-1, y[:, None]).squeeze(-1),
            )
        else:
            ids = teacher["ids"][rows].long()
            if int(ids.max()) >= vocab:
                raise ValueError(f"teacher cache holds id {int(ids.max())}, outside the shared vocabulary of {vocab}")
            support = topk_support(student_logp, ids, teacher["logp"][rows].float(), teacher["tail"][rows].float())
        kd = spec.fn(support, params) * factor
        if cfg.hard_label_weighting:
            assert support.student_label_logp is not None
            assert support.teacher_label_logp is not None
            kd = kd * hard_label_weights(support.student_label_logp, support.teacher_label_logp)
        ce = -student_logp1.gather(-1, y[:, None]).squeeze(-1)
        loss = cfg.kd_weight * kd.sum() + cfg.ce_weight * ce.sum()
        with torch.no_grad():
            probs_s = student_logp1.exp()
            entropy_s = -(probs_s * student_logp1).sum()
            if teacher_logits is not None:
                entropy_t = -torch.xlogy(teacher_logp1.exp(), teacher_logp1.exp()).sum()
                agree = (student.argmax(-1) == teacher_logits.argmax(-1)).sum()
                mass = torch.tensor(float(y.numel()), device=student.device)
            else:
                probs_t = support.teacher_logp.exp()
                entropy_t = -torch.xlogy(probs_t, probs_t).sum()
                agree = (student.argmax(-1) == teacher["ids"][rows][:, 0].long()).sum()
                mass = teacher["logp"][rows].float().exp().sum()
            sums = torch.stack(
                [
                    torch.as_tensor(float(y.numel()), device=student.device),
                    kd.sum(),
                    ce.sum(),
                    entropy_s,
                    entropy_t,
                    agree.float(),
                    mass.float(),
                ]
            ).double()
        return loss, sums

    return objective


def _metrics(sums: Mapping[str, float], loss: str, topk: bool) -> dict[str, float]:
    tokens = max(sums["tokens"], 1.0)
    out = {
        f"distill/{loss}": sums["kd"] / tokens,
        "ce": sums["ce"] / tokens,
        "entropy/student": sums["student_entropy"] / tokens,
        "entropy/teacher": sums["teacher_entropy"] / tokens,
        "top1_agreement": sums["top1_agreement"] / tokens,
    }
    if topk:
        out["teacher_topk_mass"] = sums["teacher_mass"] / tokens
    return out


class DistillTrainer(StepNormalisedTrainer):
    """A step-normalised trainer whose loss is the chunked distillation objective over counted tokens."""

    def __init__(self, *args: Any, method: DistillConfig, teacher: TeacherOutputs, vocab: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method = method
        self.teacher = teacher
        teacher.prepare(self.accelerator)
        self.vocab = vocab
        """Output rows student and teacher share; logits are cut to it."""
        self._sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}

    def step_counts(self, batch: Mapping[str, Any]) -> Sequence[float]:
        """Counted tokens of one micro-batch."""
        return (float(counted_positions(batch["labels"]).sum()),)

    def train_lengths(self) -> Sequence[int]:
        """Tokens of each train conversation."""
        assert self.train_dataset is not None
        return [len(ids) for ids in self.train_dataset["input_ids"]]

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Student hidden states, teacher outputs, the chunked loss, and this micro-batch's share of the step's."""
        mode = "train" if model.training else "eval"
        counted = counted_positions(inputs["labels"])
        training = model.training and isinstance(num_items_in_batch, tuple)
        tokens = float(num_items_in_batch[0]) if training else float(counted.sum())
        hidden = final_hidden_states(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        hidden = hidden[:, :-1][counted]
        labels = inputs["labels"][:, 1:][counted]
        teacher = self.teacher.outputs(inputs, counted, mode)
        module, head = output_head(model)
        objective = make_objective(self.method, labels, teacher, self.teacher.head)
        if head_is_sharded(model):
            total, sums = module_head_loss(hidden, module, head, objective, self.vocab)
        elif self.method.chunked:
            total, sums = chunked_head_loss(
                hidden, head.truncated(self.vocab), objective, chunk_size=self.method.chunk_size
            )
        else:
            total, sums = eager_head_loss(hidden, head.truncated(self.vocab), objective)
        loss = self.scale_for_ranks(total / max(tokens, 1.0), training=training)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        for key, value in zip(STATS, sums.tolist(), strict=True):
            self._sums[mode][key] += value
        return (loss, {}) if return_outputs else loss

    def logged_metrics(self, mode: str) -> dict[str, float]:
        """The distillation metrics gathered since the last log."""
        out = (
            _metrics(self._sums[mode], str(self.method.loss), self.method.uses_topk_cache)
            if self._sums[mode]["tokens"]
            else {}
        )
        self._sums[mode].clear()
        return out


# --- runs ------------------------------------------------------------------------------------------------------


def _prepare(cfg: RunConfig) -> tuple[PreTrainedTokenizerBase, Dataset, Dataset | None, Dataset | None]:
    """Validated, tokenised splits (and the raw eval split for sample prompts); tokenizers checked. No weights."""
    from alignment.data.mix import build_splits
    from alignment.methods.distill.distill import row_checks
    from alignment.models.load import load_tokenizer

    method = cfg.method
    assert isinstance(method, DistillConfig)
    checks = row_checks(method)
    splits = build_splits(cfg.data, checks.validate, checks.columns)
    tokenizer = load_tokenizer(cfg.model)
    check_tokenizers(tokenizer, load_tokenizer(method.teacher))
    train = tokenize_split(splits.train, tokenizer, method, "train")
    evaluation = tokenize_split(splits.eval, tokenizer, method, "eval") if splits.eval is not None else None
    return tokenizer, train, evaluation, splits.eval


def _caches(
    method: DistillConfig, tokenizer: PreTrainedTokenizerBase, splits: dict[str, Dataset], device: torch.device
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str], bool]:
    """Every split's teacher cache, key and whether all were hits; the teacher loads only when a shard is missing."""
    from alignment.paths import cache_dir

    keys = {mode: cache_key(method, split) for mode, split in splits.items()}
    missing = any(
        not (cache_dir() / "reference_logps" / f"{keys[mode]}-{shard:05d}.safetensors").exists()
        for mode, split in splits.items()
        for shard in range((len(split) + SHARD_ROWS - 1) // SHARD_ROWS)
    )
    teacher = None
    if missing:
        teacher = move_to_device(load_frozen_copy(method.teacher, tokenizer), _teacher_device(method.teacher, device))
    tables = {}
    for mode, split in splits.items():
        tables[mode], _ = teacher_cache(split, teacher, method, method.per_device_eval_batch_size, keys[mode])
        log.info("distill: teacher cache for %s: %s", mode, json.dumps(cache_summary(tables[mode])))
    del teacher
    return tables, keys, not missing


def run_distillation(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Validate and tokenise the data, check the tokenizers, load teacher and student, distil, save the student."""
    from alignment.methods import sft
    from alignment.models.load import load_model
    from alignment.training.arguments import training_args
    from alignment.training.callbacks import MetricsJsonlCallback, SampleGenerationCallback
    from alignment.training.checkpoint import train_and_save

    method = cfg.method
    assert isinstance(method, DistillConfig)
    tokenizer, train, evaluation, raw_eval = _prepare(cfg)
    prompts = sft.eval_prompts(raw_eval, tokenizer, method) if raw_eval is not None else []
    # Student and teacher are created sharded under ZeRO-3 (the run opened its zero.Init config before the method).
    model = load_model(cfg.model, tokenizer)
    teaching = method.teacher_source is TeacherSource.model
    frozen = load_frozen_copy(method.teacher, tokenizer, sharded=True) if teaching else None
    args = training_args(
        cfg, ctx, evaluation=evaluation is not None, remove_unused_columns=False, prediction_loss_only=True
    )
    device = args.device
    splits = {"train": train, **({"eval": evaluation} if evaluation is not None else {})}
    teacher: TeacherOutputs
    teacher_rows: int
    if frozen is not None:
        teacher = ModelTeacher(frozen, _teacher_device(method.teacher, device), device)
        assert teacher.head is not None
        teacher_rows = teacher.head.weight.size(0)
    else:
        with args.main_process_first(desc="teacher cache"):
            tables, _, _ = _caches(method, tokenizer, splits, device)
        head = (
            load_teacher_head(method.teacher, tokenizer, device) if method.cache_format is CacheFormat.hidden else None
        )
        teacher = CacheTeacher(tables, head)
        teacher_rows = head.weight.size(0) if head is not None else _teacher_vocab(method.teacher)
    _, student_head = output_head(model)
    student_rows = int(getattr(student_head.weight, "ds_shape", student_head.weight.shape)[0])  # ZeRO-3: a partition
    vocab = shared_vocabulary(student_rows, teacher_rows, len(tokenizer))
    samples = SampleGenerationCallback(
        prompts,
        tokenizer,
        ctx,
        cfg.logger,
        max_new_tokens=method.max_new_tokens,
        batch_size=method.per_device_eval_batch_size,
    )
    trainer = DistillTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=Collator(pad_token_id=int(tokenizer.pad_token_id)),
        processing_class=tokenizer,
        callbacks=[MetricsJsonlCallback(ctx.output_dir / "metrics.jsonl"), samples],
        method=method,
        teacher=teacher,
        vocab=vocab,
    )
    samples.trainer = trainer
    return train_and_save(trainer, method=method, model_dir=ctx.model_dir)


def _teacher_vocab(cfg: TeacherConfig) -> int:
    """Output rows of the teacher, from its config alone."""
    from transformers import AutoConfig

    from alignment.models import embedded

    config = AutoConfig.from_pretrained(embedded.resolve(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code)
    return int(config.get_text_config().vocab_size)


def run_cache_tool(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """``method=distill_cache``: compute (or find) every split's teacher cache; write its summary."""
    method = cfg.method
    assert isinstance(method, DistillConfig)
    tokenizer, train, evaluation, _ = _prepare(cfg)
    splits = {"train": train, **({"eval": evaluation} if evaluation is not None else {})}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tables, keys, hit = _caches(method, tokenizer, splits, device)
    out: dict[str, float] = {"cache_hit": float(hit)}
    for mode, table in tables.items():
        out.update({f"{mode}/{key}": value for key, value in cache_summary(table).items()})
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    (ctx.output_dir / "cache.json").write_text(json.dumps({"keys": keys, **out}, indent=2))
    return out
