"""``model.liger``: spellings, ``auto`` off on CPU, ``true`` refused before any weights load, Liger's numerics on GPU.

On a GPU with liger-kernel, the patched tiny Llama's layers and SFT loss are compared with the plain model's.

The GPU tests restore what Liger patches module-wide in ``transformers.models.llama.modeling_llama`` (its RoPE
function, norm and MLP classes), so later tests get the plain model again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from alignment.cli import user_error_message
from alignment.config import to_run_config
from alignment.distributed import DistributedSetupError
from alignment.launch.ranks import runtime_problems
from alignment.models import liger, load
from alignment.models.config import Dtype, Liger, ModelConfig
from alignment.plan import plan_lines
from alignment.ranges import RangeError

TINY = "embedded:tiny-random-llama"
NO_CUDA = "needs CUDA (torch sees no CUDA device); Liger's kernels are Triton GPU kernels"


@pytest.mark.parametrize(
    ("override", "expected"),
    [([], Liger.auto), (["model.liger=true"], Liger.true), (["model.liger=False"], Liger.false)],
)
def test_liger_takes_auto_true_false_as_typed_on_the_command_line(
    compose: Any, override: list[str], expected: Liger
) -> None:
    """Hydra parses ``true``/``False`` as booleans; the field still ends up the named setting."""
    assert to_run_config(compose(override)).model.liger is expected


def test_any_other_liger_value_is_a_user_error(compose: Any) -> None:
    with pytest.raises(RangeError, match=r"model\.liger must be auto, true or false, got 'maybe'") as caught:
        to_run_config(compose(["model.liger=maybe"]))
    assert user_error_message(caught.value) == "model.liger must be auto, true or false, got 'maybe'"


def test_auto_leaves_the_model_alone_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = ModelConfig(name_or_path=TINY)
    assert liger.liger_problems(cfg, cuda=False)[0] == NO_CUDA
    assert liger.liger_errors(cfg, cuda=False) == []  # auto: nothing to refuse
    model = load.load_model(cfg, load.load_tokenizer(cfg))
    assert not liger.is_patched(model)
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"


def test_true_on_cpu_fails_before_any_weights_load(compose: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_model`` stops before ``from_pretrained``; ``plan=true`` reports the same message; both are user errors.

    Every run loads through ``load_model`` (its model, a reference copy, a teacher); a user error prints as one line
    without a traceback.
    """

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(load.AutoModelForCausalLM, "from_pretrained", no_weights)
    cfg = to_run_config(compose(["model=tiny_random", "model.liger=true"]))
    with pytest.raises(liger.LigerUnavailableError) as caught:
        load.load_model(cfg.model, load.load_tokenizer(cfg.model))
    message = str(caught.value)
    assert message.startswith(f"model.liger=true (embedded:tiny-random-llama): {NO_CUDA}")
    assert message.endswith("; use model.liger=auto or false")
    assert user_error_message(caught.value) == message
    with pytest.raises(DistributedSetupError) as planned:
        plan_lines(cfg)
    assert str(planned.value) == message


def test_a_teachers_liger_true_is_named_by_its_key(compose: Any) -> None:
    cfg = to_run_config(compose(["method=distill", "method.teacher.liger=true"]))
    (problem,) = runtime_problems(cfg, cuda=False)
    assert problem.startswith(f"method.teacher.liger=true (embedded:smollm2-135m-instruct): {NO_CUDA}")


# --- on a GPU with liger-kernel -------------------------------------------------------------------------------------


@pytest.fixture
def llama_module_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo, after the test, what Liger replaces module-wide in the Llama modelling module."""
    from transformers.models.llama import modeling_llama

    pytest.importorskip("liger_kernel")
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))


def _cuda_model(cfg: ModelConfig) -> Any:
    return load.load_model(cfg, load.load_tokenizer(cfg)).to("cuda")


def _loss_and_grads(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.gpu
@pytest.mark.usefixtures("llama_module_restored")
def test_liger_layers_match_the_plain_model_in_fp32() -> None:
    """RMSNorm, RoPE and SwiGLU kernels on the tiny Llama: logits, loss and every gradient as the plain model's."""
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    plain = _cuda_model(ModelConfig(name_or_path=TINY, dtype=Dtype.float32, liger=Liger.false))
    plain_logits, plain_loss, plain_grads = _loss_and_grads(plain, ids)
    patched = _cuda_model(ModelConfig(name_or_path=TINY, dtype=Dtype.float32, liger=Liger.true))
    assert liger.is_patched(patched)
    assert patched.model.norm._get_name() == "LigerRMSNorm"
    assert patched.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
    logits, loss, grads = _loss_and_grads(patched, ids)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-5)
    assert loss.item() == pytest.approx(plain_loss.item(), abs=1e-5)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.usefixtures("llama_module_restored")
def test_sft_loss_through_liger_matches_the_chunked_loss(
    tmp_path: Path, tiny_random_path: str, smollm2_tokenizer: Any
) -> None:
    """SFT on CUDA: Liger's layers and fused linear cross entropy against the plain model's chunked loss (fp32).

    The rows are those of ``test_sft_trainer``: 51 labels, the 12 of a greedy answer right.
    """
    from trl import SFTConfig

    from alignment.methods.sft_trainer import ChunkedSFTTrainer
    from tests.methods.test_sft_trainer import GREEDY_TOKENS, sft_rows

    rows = sft_rows(tiny_random_path, smollm2_tokenizer)

    def step(setting: Liger) -> tuple[float, dict[str, torch.Tensor], dict[str, list[float]]]:
        cfg = ModelConfig(name_or_path=TINY, dtype=Dtype.float32, liger=setting)
        model = load.load_model(cfg, load.load_tokenizer(cfg))
        assert liger.is_patched(model) is (setting is Liger.true)
        args = SFTConfig(output_dir=str(tmp_path / setting), per_device_train_batch_size=5, report_to=[], bf16=False)
        trainer = ChunkedSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=smollm2_tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        counted = trainer._get_num_items_in_batch([batch], torch.device("cuda"))
        model.train()
        loss = trainer.compute_loss(model, trainer._prepare_inputs(batch), num_items_in_batch=counted)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads, dict(trainer._metrics["train"])

    plain_loss, plain_grads, plain_metrics = step(Liger.false)
    loss, grads, metrics = step(Liger.true)
    assert loss == pytest.approx(plain_loss, abs=1e-5)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert plain_metrics["mean_token_accuracy"] == [pytest.approx(GREEDY_TOKENS / 51)]
    assert metrics["mean_token_accuracy"] == [pytest.approx(GREEDY_TOKENS / 51)]
    assert "entropy" in plain_metrics
    assert "entropy" not in metrics  # Liger's kernel computes none
