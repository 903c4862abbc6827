"""The prompt codebook, its trainer (training step and the shipped-text evaluation) and the run.

Kept apart from :mod:`alignment.methods.prompt_opt.prompt_opt` so that composing a config never imports torch.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from alignment.data.chat_template import IGNORE_INDEX
from alignment.methods.prompt_opt import codebook as cb
from alignment.methods.prompt_opt.estimators import Estimator
from alignment.methods.prompt_opt.layout import SlotCollator, insert_prompts, pad_sequences, shipped_sequence
from alignment.methods.prompt_opt.prompt_opt import Objective, PromptOptConfig
from alignment.training.chunked import chunked_head_loss, final_hidden_states, output_head
from alignment.training.trainer import StepNormalisedTrainer

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignment.config import RunConfig
    from alignment.context import RunContext
    from alignment.loggers import LoggerConfig

log = logging.getLogger(__name__)


# --- the trainable part ----------------------------------------------------------------------------------------


def forbidden_ids(tokenizer: PreTrainedTokenizerBase, rows: int, cfg: PromptOptConfig) -> torch.Tensor:
    """``(rows,)`` bool: the ids no slot may take (explicit, special and added tokens, rows past the tokenizer).

    Raises:
        ValueError: an explicit id outside the embedding matrix, or every id forbidden.
    """
    outside = [i for i in cfg.forbidden_token_ids if i >= rows]
    if outside:
        raise ValueError(f"method.forbidden_token_ids {outside} are outside the model's {rows} embedding rows")
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[len(tokenizer) :] = True  # padding rows of the matrix decode to nothing
    mask[list(cfg.forbidden_token_ids)] = True
    if cfg.forbid_special_tokens:
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        mask[[i for i in special if i < rows]] = True
    pad = tokenizer.pad_token_id
    if pad is not None and pad < rows:
        mask[pad] = not cfg.allow_empty_slots
    if bool(mask.all()):
        raise ValueError("method.forbidden_token_ids (with the special tokens) forbid the whole vocabulary")
    return mask


class PromptCodebook(torch.nn.Module):
    """The P x L trainable vectors (fp32), the Gumbel noise scale, and the best prompt so far (saved buffers).

    The frozen model's embedding matrix is referenced, not registered: the state dict (a checkpoint, the saved
    model) holds only what trains and the best prompt.
    """

    embeddings: torch.Tensor
    """``(V, d)``: the frozen model's input-embedding matrix (referenced)."""
    forbidden: torch.Tensor
    """``(V,)`` bool: ids no slot may take."""
    best_ids: torch.Tensor
    """``(L,)``: the slots of the best prompt so far (-1 before the first evaluation)."""
    best_loss: torch.Tensor
    """Its held-out loss (inf before the first evaluation)."""
    best_step: torch.Tensor
    """The step it was evaluated at."""
    noise_scale: torch.nn.Parameter
    """The trainable Gumbel noise scale s (``estimator=gumbel`` only)."""

    def __init__(self, init: torch.Tensor, embeddings: torch.Tensor, forbidden: torch.Tensor, cfg: PromptOptConfig):
        super().__init__()
        self.codebook = torch.nn.Parameter(init)
        if cfg.estimator is Estimator.gumbel:
            self.noise_scale = torch.nn.Parameter(torch.tensor(float(cfg.gumbel_noise_scale)))
        self.register_buffer("best_ids", torch.full((cfg.prompt_len,), -1, dtype=torch.long))
        self.register_buffer("best_loss", torch.tensor(math.inf))
        self.register_buffer("best_step", torch.tensor(-1, dtype=torch.long))
        self.__dict__["embeddings"] = embeddings
        self.__dict__["forbidden"] = forbidden.to(embeddings.device)
        self.cfg = cfg

    def logits(self) -> torch.Tensor:
        """``(P, L, V)`` fp32 vocabulary logits (forbidden ids at -inf)."""
        return cb.vocabulary_logits(
            self.codebook, self.embeddings, self.forbidden, kind=self.cfg.logits, scale=self.cfg.logit_scale
        )

    def forward(self, tau: float, noise: torch.Tensor | None) -> cb.Quantised:
        """The quantised prompts: straight-through (training), or the argmax tokens (``noise`` None, eval)."""
        if self.cfg.estimator is Estimator.pez:
            return cb.pez_project(self.codebook, self.embeddings, self.forbidden)
        logits = self.logits()
        if not self.training:
            ids = cb.hard_ids(logits)
            return cb.Quantised(self.embeddings[ids], ids, None)
        return cb.gumbel_straight_through(logits, self.embeddings, tau=tau, noise=noise, noise_scale=self.noise_scale)

    def hard(self) -> torch.Tensor:
        """``(P, L)``: each slot's token with no noise (what evaluation and the saved prompts use)."""
        with torch.no_grad():
            if self.cfg.estimator is Estimator.pez:
                return cb.pez_project(self.codebook, self.embeddings, self.forbidden).ids
            return cb.hard_ids(self.logits())

    def relaxed(self, tau: float) -> torch.Tensor:
        """``(P, L, d)``: the noise-free soft mixtures at ``tau`` (gumbel), or the continuous vectors (pez)."""
        with torch.no_grad():
            if self.cfg.estimator is Estimator.pez:
                return self.codebook.to(self.embeddings.dtype)
            return (torch.softmax(self.logits() / tau, dim=-1).to(self.embeddings.dtype)) @ self.embeddings


# --- the frozen model's objective --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrozenObjective:
    """The frozen model and how a batch of (prompt, sequence) inputs becomes per-prompt loss sums."""

    model: Any
    objective: Objective
    num_prompts: int
    center: float

    def __call__(
        self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss_sum, per_prompt_sums (P,), per_prompt_correct (P,))`` for ``P * N`` rows of inputs."""
        if self.objective is Objective.sft:
            return self._sft(embeds, mask, positions, batch["labels"])
        return self._reward(embeds, mask, positions, batch["margin"])

    def _sft(
        self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = final_hidden_states(self.model, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        labels = labels.to(hidden.device).repeat(self.num_prompts, 1)[:, 1:]
        counted = labels != IGNORE_INDEX
        owner = torch.arange(self.num_prompts, device=hidden.device)[:, None, None].expand(
            self.num_prompts, labels.size(0) // self.num_prompts, labels.size(1)
        )
        owner = owner.reshape(labels.shape)[counted]
        targets = labels[counted]
        _, head = output_head(self.model)
        p = self.num_prompts

        def objective(logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            ce = torch.nn.functional.cross_entropy(logits, targets[rows], reduction="none")
            sums = torch.zeros(p, dtype=torch.float64, device=logits.device).index_add(
                0, owner[rows], ce.detach().double()
            )
            return ce.sum(), sums

        total, sums = chunked_head_loss(hidden[:, :-1][counted], head, objective)
        return total, sums.float(), torch.zeros_like(sums).float()

    def _reward(
        self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, margin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from alignment.methods.seqcls.reward import bt_loss
        from alignment.models.seqcls import sequence_scores

        scores = (
            sequence_scores(self.model, None, mask, inputs_embeds=embeds, position_ids=positions)[:, 0]
            .float()
            .view(self.num_prompts, 2, -1)
        )
        chosen, rejected = scores[:, 0], scores[:, 1]
        per_pair = bt_loss(
            chosen,
            rejected,
            margin=margin.to(scores.device)[None].expand_as(chosen),
            center_rewards_coefficient=self.center,
        )
        correct = (chosen - rejected - margin.to(scores.device)[None] > 0).float().sum(-1)
        return per_pair.sum(), per_pair.detach().sum(-1), correct


# --- the trainer -------------------------------------------------------------------------------------------------


class PromptOptTrainer(StepNormalisedTrainer):
    """Trains the codebook against the frozen objective; evaluates the decoded prompts as text."""

    def __init__(
        self,
        *args: Any,
        method: PromptOptConfig,
        frozen: FrozenObjective,
        tokenizer: PreTrainedTokenizerBase,
        ctx: RunContext,
        logger_cfg: LoggerConfig,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.method = method
        self.frozen = frozen
        self.tokenizer = tokenizer
        self.ctx = ctx
        self.logger_cfg = logger_cfg
        self.pad_id = int(tokenizer.pad_token_id)
        self._noise: tuple[int, torch.Tensor] | None = None
        self._previous_ids: torch.Tensor | None = None
        self._sums: dict[str, float] = defaultdict(float)
        self._no_prompt: dict[str, float] | None = None
        self._last_train: dict[int, float] = {}
        self.roles = list(method.train_on_roles) if method.objective is Objective.sft else []

    # --- step bookkeeping ---------------------------------------------------------------------------------

    def items(self, batch: Mapping[str, Any]) -> float:
        """What one micro-batch adds to its step: loss tokens (sft) or pairs (reward)."""
        if self.method.objective is Objective.sft:
            return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return float(batch["margin"].numel())

    def step_counts(self, batch: Mapping[str, Any]) -> Sequence[float]:
        """Loss tokens (sft) or pairs (reward) of one micro-batch."""
        return (self.items(batch),)

    def train_lengths(self) -> Sequence[int]:
        """Tokens of each train row, all sides and the prompt included."""
        assert self.train_dataset is not None
        return [
            sum(len(h) + len(t) + self.method.prompt_len for h, t in zip(heads, tails, strict=True))
            for heads, tails in zip(self.train_dataset["head"], self.train_dataset["tail"], strict=True)
        ]

    def temperature(self) -> float:
        """Tau at the current optimizer step (a pure function of it, so a resumed run continues the schedule)."""
        return cb.temperature(
            self.state.global_step, max(self.state.max_steps, 1), self.method.gumbel_temp, self.method.gumbel_temp_end
        )

    def noise(self, device: torch.device) -> torch.Tensor | None:
        """The Gumbel noise of the current optimizer step: one draw per step, seeded by (seed, step).

        Every micro-batch and rank of a step shares it, so accumulation and data parallelism do not change the
        step's gradient, and a resumed run draws the same noise.
        """
        if self.method.estimator is not Estimator.gumbel:
            return None
        step = self.state.global_step
        if self._noise is None or self._noise[0] != step:
            generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + step)
            codebook = self.accelerator.unwrap_model(self.model).codebook
            shape = (*codebook.shape[:2], self.frozen_rows())
            self._noise = (step, cb.gumbel_noise(shape, generator=generator).to(device))
        return self._noise[1]

    def frozen_rows(self) -> int:
        """Rows of the frozen model's embedding matrix (the vocabulary the slots choose from)."""
        return int(self.accelerator.unwrap_model(self.model).embeddings.size(0))

    # --- the loss -----------------------------------------------------------------------------------------

    def objective_sums(
        self, batch: Mapping[str, torch.Tensor], prompts: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss sum and per-prompt sums of ``batch`` under the prompts ``(P, L, d)`` with tokens ``ids``."""
        embed = self.frozen.model.get_input_embeddings()
        device = embed.weight.device
        token_embeds = embed(batch["input_ids"].to(device))
        inputs = {key: value.to(device) for key, value in batch.items()}
        if self.method.fused_forward:
            embeds, mask, positions = insert_prompts(
                token_embeds, inputs, prompts, ids, pad_id=self.pad_id, empty_slots=self.method.allow_empty_slots
            )
            return self.frozen(embeds, mask, positions, inputs)
        single = FrozenObjective(self.frozen.model, self.frozen.objective, 1, self.frozen.center)
        totals, sums, correct = [], [], []
        for k in range(prompts.size(0)):
            embeds, mask, positions = insert_prompts(
                token_embeds,
                inputs,
                prompts[k : k + 1],
                ids[k : k + 1],
                pad_id=self.pad_id,
                empty_slots=self.method.allow_empty_slots,
            )
            # One prompt at a time, its activations recomputed in backward: memory of one prompt, not P.
            total, s, c = torch.utils.checkpoint.checkpoint(
                single, embeds, mask, positions, inputs, use_reentrant=False
            )
            totals.append(total)
            sums.append(s)
            correct.append(c)
        return torch.stack(totals).sum(), torch.cat(sums), torch.cat(correct)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The prompts' objective over this micro-batch, divided by the step's items; plus its share of the aux."""
        training = model.training and isinstance(num_items_in_batch, tuple)
        items = self.items(inputs)
        step_items = float(num_items_in_batch[0]) if training else items
        tau = self.temperature()
        device = self.frozen.model.get_input_embeddings().weight.device
        quantised = model(tau=tau, noise=self.noise(device) if model.training else None)
        codebook = self.accelerator.unwrap_model(model).codebook
        total, per_prompt, correct = self.objective_sums(inputs, quantised.embeds, quantised.ids)
        p = self.method.num_prompts
        diversity = cb.diversity(codebook)
        forbidden = (
            cb.forbidden_mass(quantised.probs, self.accelerator.unwrap_model(model).forbidden)
            if quantised.probs is not None
            else torch.zeros((), device=codebook.device)
        )
        aux = self.method.dissim_coef * diversity + self.method.special_token_coef * forbidden
        # The aux term depends on the codebook only: each micro-batch adds its share, so a step adds it once.
        loss = total / (p * max(step_items, 1.0)) + aux.to(total.device) * (items / max(step_items, 1.0))
        loss = self.scale_for_ranks(loss, training=training)
        if model.training:
            self._record(items, per_prompt, correct, aux, diversity, forbidden, quantised.ids, tau)
        return (loss, {}) if return_outputs else loss

    def _record(
        self,
        items: float,
        per_prompt: torch.Tensor,
        correct: torch.Tensor,
        aux: torch.Tensor,
        diversity: torch.Tensor,
        forbidden: torch.Tensor,
        ids: torch.Tensor,
        tau: float,
    ) -> None:
        sums = self._sums
        sums["items"] += items
        for k, value in enumerate(per_prompt.tolist()):
            sums[f"loss_{k}"] += value
        for k, value in enumerate(correct.tolist()):
            sums[f"correct_{k}"] += value
        sums["aux"] += float(aux.detach()) * items
        sums["diversity"] += float(diversity.detach()) * items
        sums["forbidden"] += float(forbidden.detach()) * items
        ids = ids.detach().cpu()
        if self._previous_ids is not None:
            sums["flips"] += float((ids != self._previous_ids).float().mean())
            sums["compared"] += 1
        self._previous_ids = ids
        sums["tau"] = tau
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "noise_scale"):
            sums["noise_scale"] = float(model.noise_scale.detach().clamp(-0.2, 0.2))

    def logged_metrics(self, mode: str) -> dict[str, float]:
        """Training metrics since the last log (evaluation logs its own)."""
        sums, self._sums = self._sums, defaultdict(float)
        if mode != "train" or not sums["items"]:
            return {}
        n = sums["items"]
        out: dict[str, float] = {}
        for k in range(self.method.num_prompts):
            out[f"prompt_{k}_loss"] = sums[f"loss_{k}"] / n
            self._last_train[k] = out[f"prompt_{k}_loss"]
            if self.method.objective is Objective.reward:
                out[f"prompt_{k}_accuracy"] = sums[f"correct_{k}"] / n
        out["mean_prompt_loss"] = sum(out[f"prompt_{k}_loss"] for k in range(self.method.num_prompts)) / (
            self.method.num_prompts
        )
        out.update(aux_loss=sums["aux"] / n, diversity=sums["diversity"] / n, forbidden_mass=sums["forbidden"] / n)
        out["gumbel_temp"] = sums["tau"]
        if "noise_scale" in sums:
            out["gumbel_noise_scale"] = sums["noise_scale"]
        if sums["compared"]:
            out["flip_rate"] = sums["flips"] / sums["compared"]
        return out

    # --- evaluation: the decoded prompts, as text ---------------------------------------------------------

    def prompt_texts(self, ids: torch.Tensor) -> tuple[list[str], list[list[int]], list[bool]]:
        """Each prompt's text (pad slots left out), its kept ids, and whether ids -> text -> ids is unchanged."""
        texts: list[str] = []
        kept: list[list[int]] = []
        consistent: list[bool] = []
        for row in ids.tolist():
            tokens = [int(i) for i in row if not (self.method.allow_empty_slots and i == self.pad_id)]
            text = str(self.tokenizer.decode(tokens))
            texts.append(text)
            kept.append(tokens)
            consistent.append(self.tokenizer(text, add_special_tokens=False)["input_ids"] == tokens)
        return texts, kept, consistent

    def _batches(self, dataset: Dataset) -> list[list[int]]:
        size = self.args.per_device_eval_batch_size
        return [list(range(i, min(i + size, len(dataset)))) for i in range(0, len(dataset), size)]

    def shipped_sums(self, dataset: Dataset, text: str | None) -> tuple[float, float, float]:
        """(loss sum, correct pairs, items) of ``dataset`` with ``text`` as the role's message; None: no message.

        None: the conversation as the template renders it without that message (the no-prompt baseline).
        """
        frozen = FrozenObjective(self.frozen.model, self.frozen.objective, 1, self.frozen.center)
        device = self.frozen.model.get_input_embeddings().weight.device
        loss = correct = items = 0.0
        with torch.no_grad():
            for indices in self._batches(dataset):
                rows = dataset.select(indices)
                sides = len(rows[0]["head"])
                sequences = []
                for side in range(sides):
                    for row in rows:
                        if text is None:
                            ids, labels = row["bare_ids"][side], row["bare_labels"][side]
                        else:
                            ids, labels = shipped_sequence(
                                self.tokenizer,
                                json.loads(row["conversation"][side]),
                                role=self.method.inserted_chat_role,
                                text=text,
                                roles=self.roles,
                                dropped=row["dropped"][side],
                            )
                        sequences.append((ids, labels))
                batch = pad_sequences(sequences, self.pad_id)
                batch["margin"] = torch.tensor([float(r["margin"]) for r in rows])
                inputs = {key: value.to(device) for key, value in batch.items()}
                mask = inputs["attention_mask"]
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                embeds = self.frozen.model.get_input_embeddings()(inputs["input_ids"])
                total, _, c = frozen(embeds, mask, positions, inputs)
                loss += float(total)
                correct += float(c.sum())
                items += self.items(batch)
        return loss, correct, items

    def slot_sums(
        self, dataset: Dataset, prompts: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-prompt loss sums and correct pairs of ``dataset`` with the prompts' embeddings in the slots."""
        collate = SlotCollator(self.pad_id, self.method.prompt_len)
        sums = torch.zeros(ids.size(0))
        correct = torch.zeros(ids.size(0))
        items = 0.0
        with torch.no_grad():
            for indices in self._batches(dataset):
                batch = collate([dataset[i] for i in indices])
                _, s, c = self.objective_sums(batch, prompts, ids)
                sums += s.cpu()
                correct += c.cpu()
                items += self.items(batch)
        return sums, correct, items

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Decode each prompt, evaluate it as shipped text (and in the slots, and relaxed); keep the best."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        assert dataset is not None
        codebook: PromptCodebook = self.accelerator.unwrap_model(self.model)
        was_training = codebook.training
        codebook.train(False)
        ids = codebook.hard()
        texts, kept, consistent = self.prompt_texts(ids)
        hard = codebook.embeddings[ids]
        slot_loss, _, items = self.slot_sums(dataset, hard, ids)
        relaxed_loss, _, _ = self.slot_sums(dataset, codebook.relaxed(self.temperature()), ids)
        prefix = metric_key_prefix
        metrics: dict[str, float] = {}
        losses = []
        for k, text in enumerate(texts):
            loss, correct, n = self.shipped_sums(dataset, text)
            losses.append(loss / max(n, 1.0))
            metrics[f"{prefix}_prompt_{k}_loss"] = losses[-1]
            metrics[f"{prefix}_prompt_{k}_slot_loss"] = float(slot_loss[k]) / max(items, 1.0)
            if self.method.objective is Objective.reward:
                metrics[f"{prefix}_prompt_{k}_accuracy"] = correct / max(n, 1.0)
        if self._no_prompt is None:
            loss, correct, n = self.shipped_sums(dataset, None)
            self._no_prompt = {"loss": loss / max(n, 1.0), "accuracy": correct / max(n, 1.0)}
        metrics[f"{prefix}_no_prompt_loss"] = self._no_prompt["loss"]
        if self.method.objective is Objective.reward:
            metrics[f"{prefix}_no_prompt_accuracy"] = self._no_prompt["accuracy"]
        metrics[f"{prefix}_relaxed_gap"] = float((relaxed_loss - slot_loss).mean()) / max(items, 1.0)
        metrics[f"{prefix}_retokenisation_consistency"] = sum(consistent) / len(consistent)
        best = min(range(len(losses)), key=losses.__getitem__)
        metrics[f"{prefix}_loss"] = losses[best]
        metrics[f"{prefix}_best_prompt"] = float(best)
        if losses[best] < float(codebook.best_loss):
            codebook.best_loss.fill_(losses[best])
            codebook.best_ids.copy_(ids[best])
            codebook.best_step.fill_(self.state.global_step)
        self._write_prompts(codebook, texts, kept, ids, losses, consistent)
        codebook.train(was_training)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def write_unevaluated(self) -> None:
        """Without an eval split: the final prompts, ranked by their last logged training loss (no held-out loss)."""
        codebook: PromptCodebook = self.accelerator.unwrap_model(self.model)
        ids = codebook.hard()
        texts, kept, consistent = self.prompt_texts(ids)
        losses = [self._last_train.get(k, math.inf) for k in range(len(texts))]
        best = min(range(len(texts)), key=losses.__getitem__)
        codebook.best_ids.copy_(ids[best])
        codebook.best_loss.fill_(math.nan)
        codebook.best_step.fill_(self.state.global_step)
        self._write_prompts(codebook, texts, kept, ids, losses, consistent, held_out=False)

    def _write_prompts(
        self,
        codebook: PromptCodebook,
        texts: list[str],
        kept: list[list[int]],
        ids: torch.Tensor,
        losses: list[float],
        consistent: list[bool],
        *,
        held_out: bool = True,
    ) -> None:
        """``prompts.json`` and ``best_prompt.txt`` in the run directory; the prompts table on the console.

        ``held_out`` False (no eval split): ``losses`` are the last training losses, written as ``train_loss``.
        """
        key = "held_out_loss" if held_out else "train_loss"
        order = sorted(range(len(losses)), key=losses.__getitem__)
        prompts = [
            {
                "index": k,
                "text": texts[k],
                "token_ids": kept[k],
                "slot_ids": ids[k].tolist(),
                key: losses[k],
                "rank": order.index(k) + 1,
                "retokenises_identically": consistent[k],
            }
            for k in range(len(texts))
        ]
        best_ids = codebook.best_ids.tolist()
        best_text, best_kept, _ = self.prompt_texts(torch.tensor([best_ids]))
        best = {
            "text": best_text[0],
            "token_ids": best_kept[0],
            "held_out_loss": float(codebook.best_loss) if held_out else None,
            "step": int(codebook.best_step),
            "no_prompt_loss": self._no_prompt["loss"] if self._no_prompt else None,
        }
        if not self.is_world_process_zero():
            return
        out = self.ctx.output_dir
        out.mkdir(parents=True, exist_ok=True)
        step = self.state.global_step
        (out / "prompts.json").write_text(json.dumps({"step": step, "prompts": prompts, "best": best}, indent=2))
        (out / "best_prompt.txt").write_text(best_text[0])
        print_prompts_table(prompts, step, key)
        from alignment.loggers import log_table

        rows = [{k: p[k] for k in ("index", "rank", key, "text")} for p in prompts]
        log_table(self.logger_cfg, self.ctx, "eval/prompts", rows, step)


def print_prompts_table(prompts: Sequence[Mapping[str, Any]], step: int, key: str = "held_out_loss") -> None:
    """The prompts as a rich table (rank, index, the loss ``key``, text) on the console."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prompts @ step {step}")
    for column in ("rank", "index", key.replace("_", " "), "text"):
        table.add_column(column)
    for prompt in sorted(prompts, key=lambda p: p["rank"]):
        table.add_row(str(prompt["rank"]), str(prompt["index"]), f"{prompt[key]:.4f}", repr(prompt["text"]))
    Console(stderr=True, width=160).print(table)


# --- the run -----------------------------------------------------------------------------------------------------


def prepare(cfg: RunConfig) -> tuple[PreTrainedTokenizerBase, Dataset, Dataset | None]:
    """Validated splits with the prompt placed; the tokenizer. No weights are loaded."""
    from alignment.data.mix import build_splits
    from alignment.methods.prompt_opt.layout import tokenize_split
    from alignment.methods.prompt_opt.prompt_opt import row_checks
    from alignment.models.load import load_tokenizer

    method = cfg.method
    assert isinstance(method, PromptOptConfig)
    checks = row_checks(method)
    splits = build_splits(cfg.data, checks.validate, checks.columns)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{cfg.model.name_or_path}: the tokenizer has no pad token; set model.pad_token")
    forbidden_ids(tokenizer, len(tokenizer), method)  # an impossible vocabulary fails before any weights load
    train = tokenize_split(splits.train, tokenizer, method, "train")
    evaluation = tokenize_split(splits.eval, tokenizer, method, "eval") if splits.eval is not None else None
    return tokenizer, train, evaluation


def load_frozen(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The frozen model: the run's causal LM (sft), or the reward model folder it names (reward)."""
    from alignment.models import embedded
    from alignment.models.frozen import load_frozen_copy
    from alignment.models.seqcls import load_reward_model

    method = cfg.method
    assert isinstance(method, PromptOptConfig)
    if method.objective is Objective.sft:
        return load_frozen_copy(cfg.model, tokenizer)
    model, _ = load_reward_model(
        embedded.resolve(cfg.model.name_or_path),
        dtype=cfg.model.dtype.value,
        device="cpu",
        trust_remote_code=cfg.model.trust_remote_code,
    )
    model.requires_grad_(False)
    return model


def initial_codebook(
    method: PromptOptConfig, tokenizer: PreTrainedTokenizerBase, embeddings: torch.Tensor, seed: int
) -> torch.Tensor:
    """The starting vectors: ``init_prompt``'s tokens (cut or pad-filled to L), or the mean embedding, plus noise."""
    init_ids = None
    if method.init_prompt is not None:
        init_ids = tokenizer(method.init_prompt, add_special_tokens=False)["input_ids"][: method.prompt_len]
    generator = torch.Generator().manual_seed(seed)
    return cb.initial_codebook(
        embeddings.detach().cpu(),
        method.num_prompts,
        method.prompt_len,
        init_ids=init_ids,
        pad_id=int(tokenizer.pad_token_id),
        generator=generator,
    ).to(embeddings.device)


def run_prompt_opt(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Validate and place the data, load the frozen model, optimise the prompts, write them; final metrics."""
    from alignment.models.frozen import move_to_device
    from alignment.training.arguments import training_args
    from alignment.training.callbacks import MetricsJsonlCallback
    from alignment.training.checkpoint import train_and_save

    method = cfg.method
    assert isinstance(method, PromptOptConfig)
    tokenizer, train, evaluation = prepare(cfg)
    frozen_model = load_frozen(cfg, tokenizer)
    args = training_args(
        cfg, ctx, evaluation=evaluation is not None, remove_unused_columns=False, prediction_loss_only=True
    )
    frozen_model = move_to_device(frozen_model, args.device)
    if args.activation_checkpointing:  # the frozen model's activations are what backward keeps; the codebook has none
        frozen_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        args.activation_checkpointing = False
    embedding_layer: Any = frozen_model.get_input_embeddings()
    embeddings: torch.Tensor = embedding_layer.weight.detach()
    forbidden = forbidden_ids(tokenizer, embeddings.size(0), method)
    codebook = PromptCodebook(initial_codebook(method, tokenizer, embeddings, args.seed), embeddings, forbidden, method)
    log.info(
        "prompt_opt: %d prompts x %d tokens against a frozen %s (%s objective); %d of %d ids allowed",
        method.num_prompts,
        method.prompt_len,
        type(frozen_model).__name__,
        method.objective,
        int((~forbidden).sum()),
        forbidden.numel(),
    )
    trainer = PromptOptTrainer(
        model=codebook,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=SlotCollator(int(tokenizer.pad_token_id), method.prompt_len),
        processing_class=tokenizer,
        callbacks=[MetricsJsonlCallback(ctx.output_dir / "metrics.jsonl")],
        method=method,
        frozen=FrozenObjective(frozen_model, method.objective, method.num_prompts, method.center_rewards_coefficient),
        tokenizer=tokenizer,
        ctx=ctx,
        logger_cfg=cfg.logger,
    )
    metrics = train_and_save(trainer, method=method, model_dir=ctx.model_dir)
    if evaluation is None:
        trainer.write_unevaluated()
    path = ctx.output_dir / "prompts.json"  # written by the main process
    best = json.loads(path.read_text())["best"] if path.exists() else None
    if best is not None and best["held_out_loss"] is not None:
        metrics["best/prompt_loss"] = float(best["held_out_loss"])
    if best is not None:
        metrics["best/step"] = float(best["step"])
    return metrics
