"""Hard-prompt optimisation: learn a real-token prompt (a system message) for a frozen LM or reward model.

P prompts of L tokens (``num_prompts``, ``prompt_len``) are trainable vectors in the frozen model's input-embedding
space, a codebook ``C (P, L, d)``. Each vector is quantised to a real token every step:

* ``estimator=gumbel`` (the original toolkit's): logits ``u_v = scale * <c, E_v>`` (``logits=dot``) or
  ``scale * cos(c, E_v)`` (``logits=cosine``) over the model's own embedding matrix ``E``; training draws
  ``pi = softmax((u + clip(s, -0.2, 0.2) g) / tau)`` with Gumbel noise ``g`` and a trainable noise scale ``s``; the
  forward uses the exact embedding of ``argmax pi`` and the gradient flows through the soft mixture ``pi E``
  (straight-through); ``tau`` follows a cosine from ``gumbel_temp`` to ``gumbel_temp_end`` over the run.
* ``estimator=pez`` (Wen et al. 2023, https://arxiv.org/abs/2302.03668): the forward uses the nearest embedding
  by cosine, and its gradient is applied to the continuous vector.

The prompt becomes the message of ``inserted_chat_role`` (default ``system``; the data's own messages of that role
are removed), placed through the chat template (after BOS and the role's header, before its end-of-turn). The
objective is either

* ``sft``: the cross-entropy of the conversation's ``train_on_roles`` tokens given the prompt, summed over tokens
  and divided by the step's token count (as SFT), averaged over the P prompts:
  ``L = (1/P) sum_k sum_{b,t} CE_kbt / N``; or
* ``reward``: the Bradley-Terry loss of a frozen reward model's scores of ``prompt + chosen`` over
  ``prompt + rejected`` (per-pair ``margin`` and the centring term as ``method=reward``), averaged over pairs and
  prompts;

plus ``dissim_coef * D + special_token_coef * S``: ``D`` the mean pairwise cosine of the prompts' mean codebook
rows (divided by P^2, as the original), ``S`` the relaxed probability mass on forbidden tokens.

Each evaluation decodes every prompt's tokens to text, renders the held-out conversations with that text through
the chat template, re-tokenises them and evaluates the objective there: ``eval_prompt_<i>_loss`` is what a user
gets by pasting the text. The best prompt so far (lowest held-out loss) is kept (in the checkpoint, so a resumed
run keeps it too) and written to ``prompts.json`` and ``best_prompt.txt``, usable as
``method.system_prompt_file=<run>/best_prompt.txt`` by SFT and the generation tools.

Deviations from the original toolkit (seed spec section 6): it could not be constructed at its pinned TRL; its
SFT labels had the wrong shape; its loss was not divided over gradient accumulation; its reward model read a
padding position; its prompt went in front of BOS (here it goes inside the role's turn); it logged the
noisy training argmax as "the prompt" (here the logged prompt is the evaluated, retokenised text); ``pez`` and
``logits=cosine`` are additions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING

from alignment.data.validate import ROLES, RowChecks
from alignment.methods import sft
from alignment.methods.pairwise import core
from alignment.methods.prompt_opt.estimators import Estimator, LogitKind
from alignment.ranges import bounded, check_fields
from alignment.task import MethodConfig, TaskConfig

if TYPE_CHECKING:
    from alignment.config import RunConfig
    from alignment.context import RunContext


class Objective(StrEnum):
    """What the prompt is optimised for."""

    sft = "sft"
    """Cross-entropy of the ``train_on_roles`` turns of ``messages`` conversations under the frozen LM."""
    reward = "reward"
    """Bradley-Terry loss of a frozen reward model on ``prompt``/``chosen``/``rejected`` pairs."""


@dataclass
class PromptOptConfig(MethodConfig):
    """Gradient-based hard-prompt optimisation against a frozen model (the run's ``model``)."""

    name: str = "prompt_opt"
    """Registry key."""
    learning_rate: float = bounded(0.05, gt=0)
    """Peak learning rate of the codebook (0.05: what the learning checks used; the weights' 2e-5 moves nothing)."""
    objective: Objective = Objective.sft
    """``sft``: the run's model is a causal LM; ``reward``: a reward model folder saved by ``method=reward``."""
    num_prompts: int = bounded(3, ge=1)
    """P: prompts optimised in parallel (each evaluated; the best is kept)."""
    prompt_len: int = bounded(16, ge=1)
    """L: tokens per prompt (slots that pick the pad token are dropped, so a prompt can end up shorter)."""
    inserted_chat_role: str = "system"
    """Role of the message the prompt becomes; the data's messages of that role are removed."""
    init_prompt: str | None = None
    """Text every prompt starts from (cut to ``prompt_len`` tokens); None: the mean embedding plus noise."""
    estimator: Estimator = Estimator.gumbel
    """How a continuous vector becomes a token: Gumbel-softmax straight-through, or PEZ projection."""
    logits: LogitKind = LogitKind.cosine
    """Vector-to-vocabulary logits of the ``gumbel`` estimator: cosine (default, measured) or the original's raw dot
    product, times ``logit_scale``. With dot products no learning check lowered the held-out loss (README,
    hard-prompt optimisation)."""
    logit_scale: float = bounded(10.0, gt=0)
    """Multiplier of the logits (10: best of 1, 5, 10, 20, 30 with cosine logits in the planted-prompt check)."""
    gumbel_temp: float = bounded(0.5, gt=0)
    """tau_0: temperature at step 0, annealed by a cosine to ``gumbel_temp_end`` at the last step."""
    gumbel_temp_end: float = bounded(0.005, gt=0)
    """tau at the last step."""
    gumbel_noise_scale: float = bounded(0.05, ge=-0.2, le=0.2)
    """Initial value of the trainable noise scale s (clamped to [-0.2, 0.2] where used)."""
    dissim_coef: float = bounded(0.3, ge=0)
    """Weight of the prompt-diversity penalty D (0 with one prompt)."""
    special_token_coef: float = bounded(0.8, ge=0)
    """Weight of the relaxed probability mass on forbidden tokens."""
    forbidden_token_ids: list[int] = field(default_factory=list)
    """Token ids never selected, on top of the special and added tokens (``forbid_special_tokens``)."""
    forbid_special_tokens: bool = True
    """Forbid the tokenizer's special and added tokens (the pad token stays allowed: a pad slot is an empty slot)."""
    allow_empty_slots: bool = True
    """A slot whose token is the pad token is left out of the prompt (a shorter prompt); false forbids pad too."""
    fused_forward: bool = True
    """All P prompts x the micro-batch in one forward (faster, P times the activation memory), else a loop."""
    train_on_roles: list[str] = field(default_factory=lambda: ["assistant"])
    """``sft``: roles whose turns carry the loss."""
    max_length: int = bounded(1024, ge=1)
    """Tokens per conversation, before the prompt is added; longer ones are cut (the end for ``sft``, the start
    for ``reward``, as ``method=reward``)."""
    center_rewards_coefficient: float = bounded(0.0, ge=0)
    """``reward``: weight c of the centring term c (r_w + r_l)^2."""

    def __post_init__(self) -> None:
        check_fields(self, "method")
        if self.inserted_chat_role not in ROLES:
            raise ValueError(f"method.inserted_chat_role must be one of {ROLES}, got {self.inserted_chat_role!r}")
        unknown = [r for r in self.train_on_roles if r not in ROLES]
        if unknown or not self.train_on_roles:
            raise ValueError(f"method.train_on_roles must be a non-empty subset of {ROLES}, got {self.train_on_roles}")
        if self.inserted_chat_role in self.train_on_roles:
            raise ValueError(
                f"method.inserted_chat_role={self.inserted_chat_role!r} is also in method.train_on_roles: the prompt "
                "would be trained to predict itself"
            )
        negative = [i for i in self.forbidden_token_ids if i < 0]
        if negative:
            raise ValueError(f"method.forbidden_token_ids must be token ids >= 0, got {negative}")
        if self.gumbel_temp_end > self.gumbel_temp:
            raise ValueError(
                f"method.gumbel_temp_end={self.gumbel_temp_end} is above method.gumbel_temp={self.gumbel_temp}: "
                "the temperature anneals downwards"
            )


def row_checks(method: TaskConfig) -> RowChecks:
    """``sft``: conversations with a trained turn (as SFT); ``reward``: preference pairs (as ``method=reward``)."""
    assert isinstance(method, PromptOptConfig)
    if method.objective is Objective.reward:
        return core.row_checks(method)
    return RowChecks(partial(sft.row_problems, roles=list(method.train_on_roles)), (sft.COLUMN,))


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Validate and tokenise the data, load the frozen model, optimise the prompts, write them; final metrics."""
    from alignment.methods.prompt_opt.trainer import run_prompt_opt

    return run_prompt_opt(cfg, ctx)
