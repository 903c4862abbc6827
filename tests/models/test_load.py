"""Model/tokenizer loading on the embedded 2-layer random Llama (SmolLM2's tokenizer, vocab 49152, tied embeddings).

Shapes used for the hand-computed parameter counts: hidden 64, intermediate 128, 2 layers, 4 query heads and
2 KV heads of head_dim 16, so per layer the linear maps (in -> out) are q 64->64, k 64->32, v 64->32, o 64->64,
gate 64->128, up 64->128, down 128->64. The embedding has 49152 * 64 = 3,145,728 parameters (shared with the head).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from alignment.models import load
from alignment.models.config import AttnImplementation, Dtype, LoraConfig, ModelConfig, QuantizationConfig

TINY = "embedded:tiny-random-llama"
VOCAB = 49152
HIDDEN = 64
EMBEDDING = VOCAB * HIDDEN
# Per layer: LoRA adds r * (in + out) per linear map.
LORA_PER_RANK = 2 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 128) + (64 + 128) + (128 + 64))
# Per layer: DoRA adds one magnitude per output feature of each adapted linear map.
DORA_MAGNITUDES = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
# Per layer: 7 linear maps + 2 RMSNorm weights.
LAYER = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def tokenizer(tiny_random_path: str) -> PreTrainedTokenizerBase:
    return load.load_tokenizer(ModelConfig(name_or_path=TINY))


@pytest.fixture(scope="module")
def bare_tokenizer_dir(tiny_random_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer without pad token and without chat template."""
    out = tmp_path_factory.mktemp("bare_tokenizer")
    tok = AutoTokenizer.from_pretrained(tiny_random_path)
    tok.pad_token = None
    tok.chat_template = None
    tok.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.pad_token is None
    assert reloaded.chat_template is None
    return out


def test_unset_overrides_keep_the_tokenizers_own_tokens(
    tokenizer: PreTrainedTokenizerBase, tiny_random_path: str
) -> None:
    """Regression: the original toolkit assigned the unset (None) overrides and erased the special tokens."""
    raw = AutoTokenizer.from_pretrained(tiny_random_path)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        raw.bos_token_id,
        raw.eos_token_id,
        raw.pad_token_id,
    )
    assert len(tokenizer) == len(raw) == VOCAB
    assert tokenizer.chat_template == raw.chat_template


def test_unset_overrides_keep_the_models_own_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    model = load.load_model(ModelConfig(name_or_path=TINY), tokenizer)
    for target in (model.config, model.generation_config):
        assert (target.bos_token_id, target.eos_token_id, target.pad_token_id) == (1, 2, 2)
    assert model.get_input_embeddings().weight.shape == (VOCAB, HIDDEN)


def test_a_checkpoints_own_stop_ids_survive_when_eos_is_not_overridden(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Llama-3-style generation configs list several stop ids; only an eos override may replace them."""
    real = AutoModelForCausalLM.from_pretrained

    def with_stop_list(*args: Any, **kwargs: Any) -> Any:
        model = real(*args, **kwargs)
        model.generation_config.eos_token_id = [2, 0]
        return model

    monkeypatch.setattr(load, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=with_stop_list))
    model = load.load_model(ModelConfig(name_or_path=TINY), tokenizer)
    assert model.generation_config.eos_token_id == [2, 0]
    overridden = ModelConfig(name_or_path=TINY, eos_token="<|endoftext|>")
    model = load.load_model(overridden, load.load_tokenizer(overridden))
    assert model.generation_config.eos_token_id == 0


def test_pad_falls_back_to_eos_when_the_tokenizer_has_none(bare_tokenizer_dir: Path) -> None:
    tok = load.load_tokenizer(ModelConfig(name_or_path=str(bare_tokenizer_dir), chat_template="{{ messages }}"))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_overrides_reach_the_tokenizer_and_both_model_configs() -> None:
    """A new pad token is added to the vocabulary (a plain assignment would alias it to the unk id 0)."""
    cfg = ModelConfig(name_or_path=TINY, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok = load.load_tokenizer(cfg)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, VOCAB)
    assert len(tok) == VOCAB + 1
    model = load.load_model(cfg, tok)
    assert model.get_input_embeddings().weight.shape == (VOCAB + 1, HIDDEN)
    for target in (model.config, model.generation_config):
        assert (target.bos_token_id, target.eos_token_id, target.pad_token_id) == (0, 0, VOCAB)


def test_added_special_tokens_grow_the_tokenizer_and_resize_the_embeddings() -> None:
    cfg = ModelConfig(name_or_path=TINY, added_special_tokens=["<tool>", "</tool>"])
    tok = load.load_tokenizer(cfg)
    assert len(tok) == VOCAB + 2
    assert tok.convert_tokens_to_ids(["<tool>", "</tool>"]) == [VOCAB, VOCAB + 1]
    assert tok.tokenize("a<tool>b") == ["a", "<tool>", "b"]
    assert {"<|im_start|>", "<|im_end|>", "<tool>", "</tool>"} <= set(tok.all_special_tokens)
    model = load.load_model(cfg, tok)
    assert model.get_input_embeddings().weight.shape == (VOCAB + 2, HIDDEN)
    assert model.get_output_embeddings().weight.shape == (VOCAB + 2, HIDDEN)


def test_chat_template_only_replaces_an_existing_one_when_forced(tokenizer: PreTrainedTokenizerBase) -> None:
    own = tokenizer.chat_template
    assert own is not None
    kept = load.load_tokenizer(ModelConfig(name_or_path=TINY, chat_template="{{ 'mine' }}"))
    assert kept.chat_template == own
    forced = load.load_tokenizer(ModelConfig(name_or_path=TINY, chat_template="{{ 'mine' }}", force_chat_template=True))
    assert forced.chat_template == "{{ 'mine' }}"


def test_chat_template_fills_a_missing_one_and_its_absence_fails(bare_tokenizer_dir: Path) -> None:
    path = str(bare_tokenizer_dir)
    assert load.load_tokenizer(ModelConfig(name_or_path=path, chat_template="{{ 'x' }}")).chat_template == "{{ 'x' }}"
    with pytest.raises(ValueError, match=r"no chat template; set model\.chat_template"):
        load.load_tokenizer(ModelConfig(name_or_path=path))


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        pytest.param({"r": 4}, 4 * LORA_PER_RANK, id="lora-r4"),  # 8,192
        pytest.param({"r": 8}, 8 * LORA_PER_RANK, id="lora-r8"),  # 16,384
        pytest.param({"r": 4, "use_dora": True}, 4 * LORA_PER_RANK + DORA_MAGNITUDES, id="dora-r4"),  # 9,216
        pytest.param({"r": 4, "use_rslora": True}, 4 * LORA_PER_RANK, id="rslora-r4"),  # 8,192
        # q 64->64 and v 64->32 only: 2 layers * 2 * ((64 + 64) + (64 + 32)) = 896.
        pytest.param({"r": 2, "target_modules": ["q_proj", "v_proj"]}, 896, id="lora-qv-r2"),
    ],
)
def test_lora_trains_exactly_the_adapter_parameters(
    tokenizer: PreTrainedTokenizerBase, lora: dict[str, Any], expected: int
) -> None:
    assert LORA_PER_RANK == 2048
    assert DORA_MAGNITUDES == 1024
    cfg = ModelConfig(name_or_path=TINY, lora=LoraConfig(enabled=True, dropout=0.0, **lora))
    model = load.load_model(cfg, tokenizer)
    assert trainable(model) == expected
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in names)


@pytest.mark.parametrize(("use_rslora", "scaling"), [(False, 8 / 4), (True, 8 / 4**0.5)])
def test_rslora_scales_by_alpha_over_sqrt_r(
    tokenizer: PreTrainedTokenizerBase, use_rslora: bool, scaling: float
) -> None:
    cfg = ModelConfig(name_or_path=TINY, lora=LoraConfig(enabled=True, r=4, alpha=8, use_rslora=use_rslora))
    model = load.load_model(cfg, tokenizer)
    q_proj = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert q_proj.scaling["default"] == pytest.approx(scaling)


def test_modules_to_save_trains_the_module_in_full_and_keeps_it_tied(tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = ModelConfig(name_or_path=TINY, lora=LoraConfig(enabled=True, r=4, modules_to_save=["embed_tokens"]))
    model = load.load_model(cfg, tokenizer)
    assert trainable(model) == 4 * LORA_PER_RANK + EMBEDDING  # 3,153,920
    full = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    assert [n for n, _ in full] == ["base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    # The embedding is tied to the LM head: the head must use the trained copy, or new tokens' logits never train.
    head = [p for n, p in model.named_parameters(remove_duplicate=False) if "lm_head" in n]
    assert any(p.data_ptr() == full[0][1].data_ptr() for p in head)


def test_unfreeze_layers_patterns_trains_only_matching_modules(tokenizer: PreTrainedTokenizerBase) -> None:
    assert LAYER == 36_992
    cfg = ModelConfig(name_or_path=TINY, unfreeze_layers_patterns=["model.layers.1.*"])
    model = load.load_model(cfg, tokenizer)
    assert trainable(model) == LAYER
    assert all(n.startswith("model.layers.1.") for n, p in model.named_parameters() if p.requires_grad)
    # An exact module name and a glob: the final norm (64) plus layer 0's MLP (3 * 64 * 128).
    cfg = dataclasses.replace(cfg, unfreeze_layers_patterns=["model.norm", "*.layers.0.mlp"])
    assert trainable(load.load_model(cfg, tokenizer)) == 64 + 3 * 64 * 128


def test_an_unfreeze_pattern_that_matches_nothing_raises_naming_it(tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = ModelConfig(name_or_path=TINY, unfreeze_layers_patterns=["model.layers.1.*", "model.layer.9*"])
    with pytest.raises(ValueError, match=r"'model\.layer\.9\*' matches no module"):
        load.load_model(cfg, tokenizer)


def test_quantization_without_lora_is_refused_before_loading(tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = ModelConfig(name_or_path="/nonexistent", quantization=QuantizationConfig(load_in_4bit=True))
    with pytest.raises(ValueError, match=r"lora\.enabled"):
        load.load_model(cfg, tokenizer)


class _Spy:
    """Stands in for ``AutoTokenizer``/``AutoModelForCausalLM``: records the kwargs, then loads for real."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.kwargs: list[dict[str, Any]] = []

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        self.kwargs.append(kwargs)
        return self.real.from_pretrained(*args, **kwargs)


@pytest.mark.parametrize("trust", [None, True])
def test_trust_remote_code_defaults_to_false_and_is_passed_through(
    monkeypatch: pytest.MonkeyPatch, trust: bool | None
) -> None:
    tok_spy, model_spy = _Spy(AutoTokenizer), _Spy(AutoModelForCausalLM)
    monkeypatch.setattr(load, "AutoTokenizer", tok_spy)
    monkeypatch.setattr(load, "AutoModelForCausalLM", model_spy)
    cfg = ModelConfig(name_or_path=TINY) if trust is None else ModelConfig(name_or_path=TINY, trust_remote_code=trust)
    load.load_model(cfg, load.load_tokenizer(cfg))
    expected = bool(trust)
    assert [k["trust_remote_code"] for k in tok_spy.kwargs + model_spy.kwargs] == [expected, expected]


def test_dtype_auto_is_float32_on_cpu(tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load.resolve_dtype(Dtype.auto) == torch.float32
    model = load.load_model(ModelConfig(name_or_path=TINY), tokenizer)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(("bf16_supported", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_auto_on_cuda_depends_on_bf16_support(
    monkeypatch: pytest.MonkeyPatch, bf16_supported: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert load.resolve_dtype(Dtype.auto) == expected


def test_an_explicit_dtype_is_used(tokenizer: PreTrainedTokenizerBase) -> None:
    assert load.resolve_dtype(Dtype.float16) == torch.float16
    model = load.load_model(ModelConfig(name_or_path=TINY, dtype=Dtype.bfloat16), tokenizer)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_attention_auto_is_sdpa_on_cpu_and_explicit_choices_pass_through(tokenizer: PreTrainedTokenizerBase) -> None:
    assert ModelConfig(name_or_path=TINY).attn_implementation is AttnImplementation.auto  # the default
    assert load.resolve_attention(ModelConfig(name_or_path=TINY)) == "sdpa"
    for choice in AttnImplementation:
        if choice is not AttnImplementation.auto:
            assert load.resolve_attention(ModelConfig(name_or_path=TINY, attn_implementation=choice)) == choice.value
    model = load.load_model(ModelConfig(name_or_path=TINY), tokenizer)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("cuda", "capability", "dtype", "flash", "expected"),
    [
        (False, (9, 0), torch.bfloat16, True, False),  # no CUDA
        (True, (7, 5), torch.bfloat16, True, False),  # Turing: flash-attention 2 needs 8.0+
        (True, (9, 0), torch.float32, True, False),  # fp32 models have no flash kernels
        (True, (9, 0), torch.bfloat16, False, False),  # flash-attn not installed or not importable
        (True, (8, 0), torch.float16, True, True),
        (True, (9, 0), torch.bfloat16, True, True),
    ],
)
def test_flash_attention_runs_only_where_every_condition_holds(
    monkeypatch: pytest.MonkeyPatch,
    cuda: bool,
    capability: tuple[int, int],
    dtype: torch.dtype,
    flash: bool,
    expected: bool,
) -> None:
    import transformers.utils.import_utils as import_utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability)
    monkeypatch.setattr(import_utils, "is_flash_attn_2_available", lambda: flash)
    assert load.flash_attention_runs(dtype) is expected


def test_auto_attention_falls_back_to_sdpa_when_flash_attention_is_refused(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``auto`` picks flash where it runs; a refusal at construction (here: flash-attn absent) loads sdpa, logged.

    An explicit ``flash_attention_2`` is not second-guessed: the same refusal is raised.
    """
    monkeypatch.setattr(load, "flash_attention_runs", lambda dtype: True)
    spy = _Spy(AutoModelForCausalLM)
    monkeypatch.setattr(load, "AutoModelForCausalLM", spy)
    with caplog.at_level("WARNING", logger=load.__name__):
        model = load.load_model(ModelConfig(name_or_path=TINY), tokenizer)
    assert [k["attn_implementation"] for k in spy.kwargs] == ["flash_attention_2", "sdpa"]
    assert model.config._attn_implementation == "sdpa"
    assert "flash_attention_2 refused" in caplog.text
    explicit = ModelConfig(name_or_path=TINY, attn_implementation=AttnImplementation.flash_attention_2)
    with pytest.raises((ImportError, ValueError), match=r"(?i)flash"):
        load.load_model(explicit, tokenizer)


def test_parameter_groups_fold_layer_indices(tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = ModelConfig(name_or_path=TINY, unfreeze_layers_patterns=["model.layers.1.*"])
    groups = load.parameter_groups(load.load_model(cfg, tokenizer))
    assert groups["model.layers.X.self_attn.q_proj.weight"] == (64 * 64, 2 * 64 * 64)
    assert groups["model.layers.X.mlp.down_proj.weight"] == (128 * 64, 2 * 128 * 64)
    assert groups["model.embed_tokens.weight"] == (0, EMBEDDING)
    assert not any(".0." in key or ".1." in key for key in groups)
    assert sum(total for _, total in groups.values()) == EMBEDDING + 2 * LAYER + 64


def test_parameter_groups_fold_nested_and_leading_indices() -> None:
    """Regression: the old pattern consumed the dot between two indices, so ``experts.0.1`` became ``experts.X.1``."""

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList([nn.ModuleList([nn.Linear(2, 3) for _ in range(2)]) for _ in range(3)])

    groups = load.parameter_groups(Experts())
    assert groups == {"experts.X.X.weight": (36, 36), "experts.X.X.bias": (18, 18)}
    assert set(load.parameter_groups(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))) == {"X.weight", "X.bias"}
