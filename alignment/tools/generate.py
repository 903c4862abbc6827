"""Batched generation over a prompt basket through any OpenAI-compatible server (``method=generate``).

``python launch.py method=generate data=demo_basket model=smollm2_135m method.client.base_url=http://HOST:PORT/v1``
sends every basket row (``data.sources``, see :mod:`alignment.data.basket`) to the server, ``client.concurrency``
rows at a time, asking for ``model.name_or_path`` (or ``method.served_model_name``). Each row becomes one line of
``<run dir>/generations.jsonl`` (schema in :func:`alignment.inference.openai_batch.generate_row`); rows that
still fail after the client's retries go to ``generations.errors.jsonl``. Rerunning with the same
``method.output_path`` (or ``hydra.run.dir``) resumes by id. The key comes from ``$OPENAI_API_KEY`` (or
``method.client.key_env``) and is never written.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.data.basket import BasketFields, basket_system_prompt
from alignment.inference.openai_batch import ClientConfig, RunSummary, SamplingConfig
from alignment.ranges import bounded, check_fields
from alignment.task import TaskConfig

if TYPE_CHECKING:
    from alignment.config import RunConfig
    from alignment.context import RunContext

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig(TaskConfig):
    """Generate answers for every row of a prompt basket."""

    name: str = "generate"
    """Registry key."""
    client: ClientConfig = field(default_factory=ClientConfig)
    """Server, key variable, retries and concurrency."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Completions per row, temperature, token cap and extra request fields."""
    fields: BasketFields = field(default_factory=BasketFields)
    """Basket column names."""
    global_system_prompt: str | None = None
    """System prompt for rows without their own (a row's ``system_prompt`` wins)."""
    system_prompt_file: str | None = None
    """File whose text is ``global_system_prompt`` (e.g. ``<prompt_opt run>/best_prompt.txt``); not with it."""
    served_model_name: str | None = None
    """Model name sent to the server; None sends ``model.name_or_path``."""
    output_path: str | None = None
    """Output JSONL; None writes ``<run dir>/generations.jsonl``. Point a rerun at the same file to resume."""
    allow_failures: float = bounded(0.0, ge=0, le=1)
    """Fraction of the basket's rows that may fail (after retries, into the errors file) with the run still
    succeeding; beyond it the run fails (non-zero exit), after writing what succeeded."""

    def __post_init__(self) -> None:
        check_fields(self, "method")
        basket_system_prompt(self.global_system_prompt, self.system_prompt_file)  # both set, or no such file


def output_paths(cfg: GenerateConfig, run_dir: Path) -> tuple[Path, Path]:
    """The output JSONL and its errors file (``<stem>.errors.jsonl`` beside it)."""
    output = Path(cfg.output_path) if cfg.output_path is not None else run_dir / "generations.jsonl"
    return output, output.with_name(f"{output.stem}.errors.jsonl")


async def generate_basket(
    cfg: GenerateConfig, rows: list[Any], *, model: str, output: Path, errors: Path
) -> RunSummary:
    """Run :func:`~alignment.inference.openai_batch.generate_row` over ``rows`` with resume and an errors file."""
    from alignment.inference.openai_batch import generate_row, make_client, process_rows

    client = make_client(cfg.client)

    system = basket_system_prompt(cfg.global_system_prompt, cfg.system_prompt_file)

    async def handle(row: Any) -> dict[str, Any]:
        return await generate_row(
            client,
            row,
            model=model,
            sampling=cfg.sampling,
            global_system_prompt=system,
        )

    try:
        return await process_rows(
            rows,
            handle,
            output_path=output,
            errors_path=errors,
            id_field=cfg.fields.id,
            concurrency=cfg.client.concurrency,
            desc="generate",
            secrets=[os.environ.get(cfg.client.key_env, "")],
        )
    finally:
        await client.close()


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Generate the basket; return the run summary (``generate/rows_written``, ``generate/tokens_per_s``…).

    Raises:
        ValueError: ``allow_failures`` is not a fraction in [0, 1] (nothing was sent).
        alignment.data.validate.DataError: a bad basket row (``file:line``); nothing was sent.
        alignment.inference.openai_batch.RowsFailedError: more rows failed than ``allow_failures`` lets through
            (the output, the errors file and the summary are written first).
    """
    from alignment.data.basket import load_baskets
    from alignment.inference.openai_batch import raise_if_rows_failed

    method = cfg.method
    assert isinstance(method, GenerateConfig)
    rows = load_baskets(cfg.data, method.fields)
    output, errors = output_paths(method, ctx.output_dir)
    model = method.served_model_name or cfg.model.name_or_path
    log.info("generating %d rows with %r at %s into %s", len(rows), model, method.client.base_url, output)
    summary = asyncio.run(generate_basket(method, rows, model=model, output=output, errors=errors))
    metrics = summary.metrics("generate")
    log.info(
        "generate: %d rows written, %d resumed, %d failed (see %s); %.2f rows/s, %.1f completion tokens/s",
        summary.rows_written,
        summary.rows_resumed,
        summary.rows_failed,
        errors,
        metrics["generate/rows_per_s"],
        metrics["generate/tokens_per_s"],
    )
    raise_if_rows_failed({errors: summary}, allow_failures=method.allow_failures, metrics=metrics)
    return metrics
