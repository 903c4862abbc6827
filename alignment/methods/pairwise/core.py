"""What the pairwise preference methods share: pair data, one padding-free forward, and the trainer.

DPO, CPO/SimPO, ORPO and SMPO differ only in a pure loss function over :class:`PairLogps` (policy, and the
reference where the method needs one). Everything else lives here:

* **Data.** Rows hold ``prompt``/``chosen``/``rejected`` message lists, or only ``chosen``/``rejected`` full
  conversations sharing a prefix (the implicit-prompt form: the prompt is their longest common prefix of
  messages). An optional ``margin`` column is carried per pair. Each side is tokenised as prompt + completion with
  the chat template; loss spans cover the completion's assistant turns only (content and end-of-turn token,
  never the role header). Pairs longer than ``max_length`` are cut at the end of the completion; pairs whose
  prompt leaves no completion token are dropped; both are counted and reported.
* **Forward.** All ``2B`` sequences of a micro-batch (chosen first, then rejected) are packed into one row with
  restarting position ids and a block-diagonal causal mask (flash-attention varlen on GPU), so no padding token
  is computed. It returns per-sequence summed completion log-probs and token counts.
* **Normalisation.** A loss is ``mean_pairs(per_pair) + w_c * NLL_chosen + w_r * NLL_rejected`` with the NLLs
  token means. Under gradient accumulation (and across data-parallel ranks) the means are taken over the whole
  optimizer step: pair and token counts of every micro-batch of the step are summed first (:class:`PairCounts`), so
  micro-batch 1 x accumulation 4 gives the same gradient as micro-batch 4 x accumulation 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from alignment.data.chat_template import IGNORE_INDEX, Message, tokenize_conversation
from alignment.data.validate import RowChecks, empty_split_error, message_list_problems, require_columns
from alignment.models.config import ReferenceKind
from alignment.ranges import bounded
from alignment.task import MethodConfig, TaskConfig

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignment.config import RunConfig
    from alignment.context import RunContext
    from alignment.models.frozen import FrozenModel

log = logging.getLogger(__name__)

COLUMNS = ("prompt", "chosen", "rejected", "margin")
"""Columns kept on load; ``prompt`` (implicit-prompt rows) and ``margin`` may be absent and then are null."""


@dataclass
class PairwiseConfig(MethodConfig):
    """Settings every pairwise preference method shares (DPO, CPO, SimPO, ORPO, SMPO)."""

    max_length: int = bounded(1024, ge=1)
    """Tokens per prompt + completion; longer pairs lose the completion's tail (counted and logged)."""
    max_tokens_per_batch: int | None = bounded(None, ge=1)
    """Token budget per micro-batch: pairs (both sides) are grouped up to this many tokens, at least one pair per
    micro-batch; replaces ``per_device_train_batch_size`` for training when set. None: fixed pair count."""


# --- what a loss function sees and returns -------------------------------------------------------------------


@dataclass
class PairLogps:
    """Per-pair completion log-probs of one model; every tensor has shape ``(batch,)``."""

    chosen: torch.Tensor
    """Sum of the chosen completion's token log-probs."""
    rejected: torch.Tensor
    """Sum of the rejected completion's token log-probs."""
    chosen_tokens: torch.Tensor
    """Completion tokens of each chosen sequence (float)."""
    rejected_tokens: torch.Tensor
    """Completion tokens of each rejected sequence (float)."""
    shaped: PairLogps | None = None
    """The same sums over token log-probs reshaped by a :data:`TokenShaper` (None without one). Only losses that
    ask for it read it (SMPO's preference term); the NLL terms, the logged ``logps/*`` and the reference always use
    the plain sums above."""

    @property
    def chosen_mean(self) -> torch.Tensor:
        """Length-normalised chosen log-prob, ``(batch,)``."""
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        """Length-normalised rejected log-prob, ``(batch,)``."""
        return self.rejected / self.rejected_tokens.clamp(min=1)

    def detach(self) -> PairLogps:
        """The same values without autograd history."""
        shaped = self.shaped.detach() if self.shaped is not None else None
        return PairLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_tokens, self.rejected_tokens, shaped)


@dataclass
class PreferenceLoss:
    """What a method's loss function returns for one micro-batch.

    The total is ``mean(per_pair_loss) + chosen_nll_weight * NLL_chosen + rejected_nll_weight * NLL_rejected``
    (:func:`total_loss`), with the NLL token means taken by the trainer over the optimizer step.
    """

    per_pair_loss: torch.Tensor
    """Preference term per pair, ``(batch,)``."""
    chosen_reward: torch.Tensor
    """Implicit reward of each chosen completion (detached), ``(batch,)``."""
    rejected_reward: torch.Tensor
    """Implicit reward of each rejected completion (detached), ``(batch,)``."""
    chosen_nll_weight: float = 0.0
    """Weight of the token-mean NLL of the chosen completions."""
    rejected_nll_weight: float = 0.0
    """Weight of the token-mean NLL of the rejected completions."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Extra scalars to log (e.g. SMPO's current target margin)."""


@dataclass(frozen=True)
class Progress:
    """Where training is, for losses with a schedule."""

    step: int
    max_steps: int


@dataclass(frozen=True)
class PairCounts:
    """Pair and completion-token counts of a whole optimizer step (all micro-batches, all ranks)."""

    pairs: float
    chosen_tokens: float
    rejected_tokens: float

    @classmethod
    def of(cls, policy: PairLogps) -> PairCounts:
        """The window of a single micro-batch (evaluation, or no accumulation)."""
        return cls(float(policy.chosen.numel()), float(policy.chosen_tokens.sum()), float(policy.rejected_tokens.sum()))


LossFn: TypeAlias = "Callable[[PairLogps, PairLogps | None, Progress], PreferenceLoss]"
"""``loss_fn(policy, reference, progress)``; ``reference`` is None for reference-free methods."""

TokenShaper: TypeAlias = "Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]"
"""``token_shaper(token_logps, targets, sequence_ids, mask, num_pairs) -> token_logps``: reshapes the policy's
per-token log-probs of one packed micro-batch before the per-sequence sums of :attr:`PairLogps.shaped`.

All tensors are flat over the packed row's shifted positions: ``token_logps`` (float, zero where ``mask`` is
False), ``targets`` (the predicted token ids, ``-100`` outside completions), ``sequence_ids`` (which of the ``2 *
num_pairs`` sequences each position belongs to: chosen ``0..num_pairs-1``, then rejected), ``mask`` (completion
positions). Positions outside ``mask`` are zeroed after the call whatever it returns. Never applied to the
reference."""


def total_loss(out: PreferenceLoss, policy: PairLogps, window: PairCounts) -> torch.Tensor:
    """This micro-batch's share of the optimizer step's loss: summed over micro-batches it is the step's mean."""
    loss = out.per_pair_loss.sum() / window.pairs
    if out.chosen_nll_weight:
        loss = loss + out.chosen_nll_weight * -policy.chosen.sum() / max(window.chosen_tokens, 1.0)
    if out.rejected_nll_weight:
        loss = loss + out.rejected_nll_weight * -policy.rejected.sum() / max(window.rejected_tokens, 1.0)
    return loss


# --- data ------------------------------------------------------------------------------------------------------


def split_implicit_prompt(chosen: Sequence[Message], rejected: Sequence[Message]) -> tuple[list[Message], ...]:
    """``(prompt, chosen_completion, rejected_completion)`` from two full conversations sharing a prefix."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return list(chosen[:shared]), list(chosen[shared:]), list(rejected[shared:])


def _completion_problems(row: Mapping[str, Any], column: str) -> list[str]:
    completion = row[column]
    if any(m["role"] != "assistant" for m in completion):
        return [f"column {column!r}: completion messages must all be assistant turns"]
    if all(not m["content"].strip() for m in completion):
        return [f"column {column!r}: empty completion"]
    return []


def row_problems(row: Mapping[str, Any]) -> list[str]:
    """Validation of one preference row (explicit or implicit prompt); empty when it can be trained on."""
    problems = require_columns(row, ("chosen", "rejected"))
    for column in ("prompt", "chosen", "rejected"):
        if column in row and row[column] is not None:
            problems += message_list_problems(row[column], column)
    if problems:
        return problems
    pair = dict(row)
    prompt_column = "column 'prompt'"
    if pair.get("prompt") is None:
        pair["prompt"], pair["chosen"], pair["rejected"] = split_implicit_prompt(row["chosen"], row["rejected"])
        prompt_column = "columns 'chosen'/'rejected': their shared prefix (the implicit prompt)"
        if not pair["prompt"]:
            return ["columns 'chosen'/'rejected': no 'prompt' column and no shared prefix to take as the prompt"]
    if pair["prompt"][-1]["role"] == "assistant":
        return [f"{prompt_column} ends on an assistant turn; the completion must answer the prompt's last turn"]
    problems = _completion_problems(pair, "chosen") + _completion_problems(pair, "rejected")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, int | float)):
        problems.append(f"column 'margin': expected a number, got {type(margin).__name__}")
    elif margin is not None and not math.isfinite(margin):
        problems.append(f"column 'margin': expected a finite number, got {margin}")
    return problems


@dataclass
class PairStats:
    """Counts reported after tokenisation (never silent)."""

    pairs: int = 0
    identical: int = 0
    truncated: int = 0
    dropped: int = 0


def _encode_side(
    tokenizer: PreTrainedTokenizerBase, prompt: list[Message], completion: list[Message], max_length: int
) -> tuple[list[int], list[int], bool]:
    out = tokenize_conversation(tokenizer, prompt + completion, ["assistant"], max_length, first_trained=len(prompt))
    return out.input_ids, out.labels, out.truncated


def tokenize_pairs(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, *, split: str = "train"
) -> Dataset:
    """Token ids and completion labels of both sides of every pair, with the documented truncation rule.

    Rule: each side is cut to ``max_length`` tokens from its end (the prompt is kept, the completion's tail is
    lost); a pair where either side keeps no completion token is dropped. Identical chosen/rejected pairs (also
    those identical once cut) carry no preference signal and are dropped too. Counts of all three are logged.

    Raises:
        DataError: every pair of the ``split`` was dropped (its files, the counts and the reasons named).
    """
    stats = PairStats()

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        if prompt is None:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        chosen_ids, chosen_labels, cut_c = _encode_side(tokenizer, prompt, chosen, max_length)
        rejected_ids, rejected_labels, cut_r = _encode_side(tokenizer, prompt, rejected, max_length)
        margin = row.get("margin")
        empty = all(t == IGNORE_INDEX for t in chosen_labels) or all(t == IGNORE_INDEX for t in rejected_labels)
        return {
            "chosen_input_ids": chosen_ids,
            "chosen_labels": chosen_labels,
            "rejected_input_ids": rejected_ids,
            "rejected_labels": rejected_labels,
            "margin": float(margin) if margin is not None else 0.0,
            "truncated": cut_c or cut_r,
            "empty": empty,
            # Also pairs that differ only beyond max_length: after the cut both sides are the same tokens.
            "identical": not empty and (chosen == rejected or chosen_ids == rejected_ids),
        }

    columns = list(dataset.column_names)
    encoded = dataset.map(encode, remove_columns=columns, desc="Tokenizing pairs")
    stats.pairs = len(encoded)
    stats.truncated = sum(encoded["truncated"])
    stats.identical = sum(encoded["identical"])
    kept = encoded.filter(lambda row: not (row["empty"] or row["identical"]), desc="Dropping pairs")
    kept = kept.remove_columns(["truncated", "empty", "identical"])
    stats.dropped = stats.pairs - len(kept)
    if stats.truncated or stats.dropped:
        log.warning(
            "pairs: %d of %d cut to max_length=%d; %d dropped (%d with chosen == rejected, the rest with no "
            "completion token left)",
            stats.truncated,
            stats.pairs,
            max_length,
            stats.dropped,
            stats.identical,
        )
    if len(kept) == 0:
        reasons = {
            "chosen == rejected": stats.identical,
            f"no completion token left within method.max_length={max_length}": stats.dropped - stats.identical,
        }
        raise empty_split_error(split, dataset, reasons, unit="pairs")
    return kept


# --- batching and the forward ------------------------------------------------------------------------------


@dataclass
class PairCollator:
    """Pack the ``2B`` sequences of a micro-batch into one padding-free row (chosen first, then rejected)."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Concatenate ids and labels; position ids restart and ``sequence_ids`` say which sequence a token is in."""
        import torch

        sequences = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows]
        sequences += [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
        input_ids = [t for ids, _ in sequences for t in ids]
        labels = [t for _, lab in sequences for t in lab]
        positions = [p for ids, _ in sequences for p in range(len(ids))]
        sequence_ids = [i for i, (ids, _) in enumerate(sequences) for _ in ids]
        batch = {
            "input_ids": torch.tensor([input_ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
            "sequence_ids": torch.tensor([sequence_ids]),
            "margin": torch.tensor([float(r.get("margin", 0.0)) for r in rows]),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in rows[0]:
                batch[key] = torch.tensor([float(r[key]) for r in rows])
        return batch


def sequence_logps(
    model: PreTrainedModel, batch: Mapping[str, torch.Tensor], token_shaper: TokenShaper | None = None
) -> PairLogps:
    """One forward over the packed row; per-sequence summed completion log-probs and token counts.

    Only completion positions go through the output head, a chunk of tokens at a time
    (:func:`~alignment.training.packed.counted_token_logps`); prompt positions never do. With a ``token_shaper``
    the sums of its reshaped token log-probs come too, as :attr:`PairLogps.shaped`.
    """
    import torch

    from alignment.training.packed import attention_kwargs, counted_token_logps, sum_per_sequence

    position_ids, sequence_ids = batch["position_ids"], batch["sequence_ids"]
    counted, predicting = counted_token_logps(model, batch, attention_kwargs(model, position_ids, sequence_ids))
    targets = batch["labels"][0, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = counted.new_zeros(targets.shape).index_copy(0, predicting, counted)  # zero outside completions
    owner = sequence_ids[0, 1:]
    count = int(sequence_ids.max()) + 1
    sums = sum_per_sequence(token_logps, owner, count)
    tokens = sum_per_sequence(mask.to(token_logps.dtype), owner, count)
    half = count // 2
    shaped = None
    if token_shaper is not None:
        reshaped = torch.where(mask, token_shaper(token_logps, targets, owner, mask, half), 0.0)
        shaped_sums = sum_per_sequence(reshaped, owner, count)
        shaped = PairLogps(shaped_sums[:half], shaped_sums[half:], tokens[:half], tokens[half:])
    return PairLogps(sums[:half], sums[half:], tokens[:half], tokens[half:], shaped)


def batch_counts(batch: Mapping[str, torch.Tensor]) -> PairCounts:
    """Pairs and completion tokens of one packed micro-batch (chosen sequences are the first half)."""
    targets = batch["labels"][0, 1:]
    owner = batch["sequence_ids"][0, 1:]
    pairs = int(batch["sequence_ids"].max() + 1) // 2
    trained = owner[targets != IGNORE_INDEX]
    chosen = float((trained < pairs).sum())
    return PairCounts(float(pairs), chosen, float(trained.numel()) - chosen)


# --- the reference model -----------------------------------------------------------------------------------


def _batch_tokens(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    targets = batch["labels"][0, 1:]
    owner = batch["sequence_ids"][0, 1:]
    count = int(batch["sequence_ids"].max()) + 1
    tokens = torch.zeros(count, device=targets.device).index_add(0, owner, (targets != IGNORE_INDEX).float())
    return tokens[: count // 2], tokens[count // 2 :]


def reference_logps(frozen: FrozenModel, policy_model: Any, batch: Mapping[str, torch.Tensor]) -> PairLogps:
    """Reference log-probs of the batch's pairs (no gradient): precomputed columns, else the frozen model's."""
    if "ref_chosen_logps" in batch:
        return PairLogps(batch["ref_chosen_logps"], batch["ref_rejected_logps"], *_batch_tokens(batch))
    return frozen.run(policy_model, lambda model: sequence_logps(model, batch).detach())


def precompute_reference(dataset: Dataset, reference: PreTrainedModel, key: str, batch_size: int) -> Dataset:
    """Add ``ref_chosen_logps``/``ref_rejected_logps`` columns, from the disk cache when this key was seen."""
    import torch

    from alignment.models.frozen import cached_outputs

    def compute() -> dict[str, torch.Tensor]:
        collate = PairCollator()
        chosen, rejected = [], []
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                logps = sequence_logps(reference, {k: v.to(reference.device) for k, v in collate(rows).items()})
                chosen.append(logps.chosen.cpu())
                rejected.append(logps.rejected.cpu())
        log.info("reference log-probs: computed %d pairs", len(dataset))
        return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}

    cached = cached_outputs(key, compute)
    dataset = dataset.add_column("ref_chosen_logps", cached["chosen"].tolist())
    return dataset.add_column("ref_rejected_logps", cached["rejected"].tolist())


# --- the shared run ----------------------------------------------------------------------------------------


def row_checks(method: TaskConfig) -> RowChecks:
    """The rows every pairwise method (and the reward model) trains on: a preference pair each."""
    return RowChecks(row_problems, COLUMNS)


def run_pairwise(
    cfg: RunConfig,
    ctx: RunContext,
    loss_fn: LossFn,
    *,
    max_length: int,
    reference_kind: ReferenceKind | None,
    make_token_shaper: Callable[[PreTrainedTokenizerBase], TokenShaper | None] | None = None,
) -> dict[str, float]:
    """Validate and tokenise pairs, set up the reference (None: reference-free), train, save; final metrics.

    ``make_token_shaper`` (optional) builds, from the tokenizer, the shaper of the policy's token log-probs
    (:attr:`PairLogps.shaped`); it runs after the data checks, like everything that needs the tokenizer.
    """
    from alignment.data.mix import build_splits
    from alignment.methods.pairwise.trainer import PairwiseTrainer
    from alignment.models.frozen import FrozenModel, fingerprint, load_frozen_copy, move_to_device, resolve_kind
    from alignment.models.load import load_model, load_tokenizer
    from alignment.training.arguments import training_args
    from alignment.training.callbacks import MetricsJsonlCallback
    from alignment.training.checkpoint import train_and_save

    method = cfg.method
    assert isinstance(method, MethodConfig)
    # Resolved first, so a reference that cannot work fails before any data or model is loaded.
    kind = resolve_kind(reference_kind, cfg.model.lora.enabled) if reference_kind is not None else None
    checks = row_checks(method)
    splits = build_splits(cfg.data, checks.validate, checks.columns)
    tokenizer = load_tokenizer(cfg.model)
    token_shaper = make_token_shaper(tokenizer) if make_token_shaper is not None else None
    train = tokenize_pairs(splits.train, tokenizer, max_length)
    evaluation = tokenize_pairs(splits.eval, tokenizer, max_length, split="eval") if splits.eval is not None else None
    model = load_model(cfg.model, tokenizer)
    args = training_args(
        cfg, ctx, evaluation=evaluation is not None, remove_unused_columns=False, prediction_loss_only=True
    )

    reference: FrozenModel | None = None
    if kind is ReferenceKind.precomputed:
        frozen = move_to_device(load_frozen_copy(cfg.model, tokenizer), args.device)
        batch = method.per_device_eval_batch_size
        # The main process computes and caches first; the other ranks then read its cache file.
        with args.main_process_first(desc="reference log-probs"):
            train = precompute_reference(
                train, frozen, fingerprint(cfg.model, train._fingerprint, str(max_length)), batch
            )
            if evaluation is not None:
                key = fingerprint(cfg.model, evaluation._fingerprint, str(max_length))
                evaluation = precompute_reference(evaluation, frozen, key, batch)
        del frozen
        reference = FrozenModel(None)
    elif kind is not None:
        copy = load_frozen_copy(cfg.model, tokenizer, sharded=True) if kind is ReferenceKind.copy else None
        reference = FrozenModel(copy)

    trainer = PairwiseTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=PairCollator(),
        processing_class=tokenizer,
        callbacks=[MetricsJsonlCallback(ctx.output_dir / "metrics.jsonl")],
        loss_fn=loss_fn,
        reference=reference,
        token_shaper=token_shaper,
        max_tokens_per_batch=method.max_tokens_per_batch if isinstance(method, PairwiseConfig) else None,
    )
    return train_and_save(trainer, method=method, model_dir=ctx.model_dir)
