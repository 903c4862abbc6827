"""``method=export``: a LoRA adapter merged into its base gives the logits of base + adapter; full models pass as is.

Adapters are made here with peft on the embedded models, with random non-zero ``B`` matrices (peft initialises
``B = 0``, which would make any merge look right) and, for the reward model, a randomised ``score`` head in
``modules_to_save``. Each export runs the tool's ``run`` on a config composed from ``conf/``; the merged model is
read back from disk and compared with the unmerged peft model on a padded batch, in fp32.
"""

from __future__ import annotations

import filecmp
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignment.config import to_run_config
from alignment.models.seqcls import load_reward_model, sequence_scores
from alignment.tools import export
from tests.methods.helpers import run_method

TEXTS = ["What is 2+2? It is 4.", "Name a colour."]
# Files of a merged model's folder: safetensors weights, configs and the tokenizer; nothing pickled.
MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a busy 2-core machine two threads make SmolLM2's forward ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lora(model: Any, task_type: str, **extra: Any) -> Any:
    """LoRA (peft) on q_proj and v_proj with random, non-zero A and B (seeded)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type=task_type, **extra)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.02)
    return peft_model.eval()


def _batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    """Two texts, right-padded: the padded positions are compared too."""
    return dict(tokenizer(TEXTS, return_tensors="pt", padding=True))


def _export(compose: Any, out: Path, source: Path, *overrides: str) -> dict[str, float]:
    return run_method(export.run, compose, out, ["method=export", f"method.source='{source}'", *overrides])


def _assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5 of the largest logit (fp32 rounding of ``W + BA`` through SmolLM2's 30 layers reaches ~2e-6)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()))


def _check_folder(out: Path, tokenizer: Any, *, adapter_from: Path | None) -> None:
    """Safetensors only, the tokenizer's chat template kept, and the adapter copied unchanged (or none)."""
    model_dir = out / "model"
    assert {p.name for p in model_dir.iterdir()} - {"generation_config.json"} == MODEL_FILES
    assert AutoTokenizer.from_pretrained(model_dir).chat_template == tokenizer.chat_template
    copy = out / export.ADAPTER_DIR
    if adapter_from is None:
        assert not copy.exists()
        return
    same, different, missing = filecmp.cmpfiles(adapter_from, copy, [p.name for p in adapter_from.iterdir()])
    assert (different, missing) == ([], [])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(same)


def _causal_lm_round_trip(compose: Any, tmp_path: Path, base_path: str, *, run_dir: bool) -> None:
    """Train-less LoRA on ``base_path``, saved as a run's ``model/`` or a bare adapter folder, then exported."""
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    peft_model = _lora(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), "CAUSAL_LM")
    adapter = tmp_path / "train_run" / "model" if run_dir else tmp_path / "adapter_src"
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    metrics = _export(compose, tmp_path / "out", adapter.parent if run_dir else adapter, "method.dtype=float32")

    # The merge changed the adapted weights (so the logits check below can fail), and only those.
    merged_weights = load_file(tmp_path / "out" / "model" / "model.safetensors")
    base_weights = load_file(Path(base_path) / "model.safetensors")
    changed = {k for k in base_weights if not torch.equal(merged_weights[k], base_weights[k])}
    assert changed == {k for k in base_weights if ".q_proj." in k or ".v_proj." in k}

    batch = _batch(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    assert merged.dtype == torch.float32
    with torch.no_grad():
        _assert_same_logits(merged(**batch).logits, peft_model(**batch).logits)
    assert metrics["export/merged_adapter"] == 1.0
    assert metrics["export/parameters"] == sum(p.numel() for p in merged.parameters())
    _check_folder(tmp_path / "out", tokenizer, adapter_from=adapter)


def test_tiny_lora_from_a_run_directory_merges_to_the_same_logits(
    compose: Any, tmp_path: Path, tiny_random_path: str
) -> None:
    _causal_lm_round_trip(compose, tmp_path, tiny_random_path, run_dir=True)


def test_smollm2_lora_merges_to_the_same_logits(compose: Any, tmp_path: Path, smollm2_path: str) -> None:
    """A real 135M model with tied embeddings: the merged logits match to 1e-5 of the largest, in fp32."""
    _causal_lm_round_trip(compose, tmp_path, smollm2_path, run_dir=False)


def test_reward_model_with_a_trained_score_head_merges_to_the_same_scores(
    compose: Any, tmp_path: Path, tiny_random_path: str
) -> None:
    """A ``SEQ_CLS`` adapter as ``method=reward`` saves it: the merged head is the trained copy, not the base's."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_path)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_random_path, num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = tokenizer.pad_token_id
    peft_model = _lora(base, "SEQ_CLS", modules_to_save=["score"])
    trained_head = peft_model.base_model.model.score.modules_to_save["default"].weight
    trained_head.data.normal_(std=1.0)
    adapter = tmp_path / "adapter_src"
    peft_model.save_pretrained(adapter)
    peft_model.get_base_model().config.save_pretrained(adapter)  # the labelled config, as save_classifier writes
    tokenizer.save_pretrained(adapter)
    _export(compose, tmp_path / "out", adapter, "method.dtype=float32")

    batch = _batch(tokenizer)
    merged, _ = load_reward_model(str(tmp_path / "out" / "model"), dtype="float32", device="cpu")
    with torch.no_grad():
        expected = sequence_scores(peft_model, batch["input_ids"], batch["attention_mask"])
        with peft_model.disable_adapter():
            base_scores = sequence_scores(peft_model, batch["input_ids"], batch["attention_mask"])
        got = sequence_scores(merged, batch["input_ids"], batch["attention_mask"])
    assert (expected - base_scores).abs().min() > 1e-2  # adapter and head change every score
    _assert_same_logits(got, expected)
    assert torch.equal(merged.score.weight, trained_head)
    _check_folder(tmp_path / "out", tokenizer, adapter_from=adapter)


def test_full_model_is_exported_as_is_in_the_asked_dtype_and_pushed(
    compose: Any, tmp_path: Path, tiny_random_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No adapter: the weights are the source's cast to bf16, the config says so, and the push gets model/."""
    pushed: list[tuple[Path, str, bool]] = []
    monkeypatch.setattr(export, "push_to_hub", lambda folder, repo, *, private: pushed.append((folder, repo, private)))
    out = tmp_path / "out"
    metrics = _export(
        compose,
        out,
        Path(tiny_random_path),
        "method.dtype=bfloat16",
        "method.push_to_hub=true",
        "method.hub_repo_id=me/tiny",
    )
    saved = load_file(out / "model" / "model.safetensors")
    source = load_file(Path(tiny_random_path) / "model.safetensors")
    assert saved.keys() == source.keys()
    assert all(saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], source[k].bfloat16()) for k in saved)
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert pushed == [(out / "model", "me/tiny", True)]
    assert metrics["export/merged_adapter"] == 0.0
    _check_folder(out, AutoTokenizer.from_pretrained(tiny_random_path), adapter_from=None)


# --- mistakes, before any weights load ----------------------------------------------------------------------------


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading any weights or tokenizer fails the test: the errors below must come first."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were loaded before the source was checked")

    for name in ("merge_adapter", "load_full_model"):
        monkeypatch.setattr(export, name, refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


def _missing(root: Path) -> Path:
    return root / "nowhere"


def _empty_folder(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _run_without_model(root: Path) -> Path:
    """A run directory whose ``model/`` is empty (a run that failed before saving)."""
    (root / "run" / "model").mkdir(parents=True)
    (root / "run" / "results.json").write_text("{}")
    return root / "run"


def _adapter_whose_base_moved(root: Path) -> Path:
    folder = root / "adapter"
    folder.mkdir()
    config = {"base_model_name_or_path": "/moved/base-model", "peft_type": "LORA"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


MISTAKES = {
    "missing": (_missing, r"method.source='.*nowhere': no such file or folder"),
    "empty folder": (
        _empty_folder,
        r"empty holds neither a LoRA adapter \(adapter_config.json\) nor a model \(config.json and \*.safetensors",
    ),
    "run directory without a model": (
        _run_without_model,
        r"run holds neither .* nor does its model/ \(.*run/model\); expected a run directory, an adapter folder",
    ),
    "adapter whose base moved": (
        _adapter_whose_base_moved,
        r"adapter_config.json: base_model_name_or_path='/moved/base-model': no such folder; set method.base_model",
    ),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_source_without_model_or_adapter_fails_first(
    compose: Any, tmp_path: Path, no_weights: None, case: str
) -> None:
    make, message = MISTAKES[case]
    with pytest.raises(FileNotFoundError, match=message):
        _export(compose, tmp_path / "out", make(tmp_path))
    assert not (tmp_path / "out" / "model").exists()


def test_a_source_is_required(compose: Any, tmp_path: Path, no_weights: None) -> None:
    with pytest.raises(ValueError, match=r"method\.source is required: a run directory"):
        run_method(export.run, compose, tmp_path / "out", ["method=export"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.push_to_hub=true"], "method.push_to_hub=true needs method.hub_repo_id=<user or org>/<name>"),
        (["method.hub_repo_id=no-owner"], "method.hub_repo_id='no-owner': expected <user or org>/<name>"),
    ],
)
def test_hub_settings_are_checked_when_the_config_is_converted(
    compose: Any, overrides: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        to_run_config(compose(["method=export", *overrides]))
