"""Training runs on CUDA when a GPU is present, with the CPU's results up to floating point.

Skipped on machines without a GPU (CI); run on a GPU worker with `pytest tests/test_cuda.py`.
"""

import copy

import pytest
import torch

from privtune.data.tokenization import encode_records
from privtune.modeling import attach_lora, resolve_device
from privtune.train import train
from tests.conftest import synthetic_texts
from tests.test_train import PARAMS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_device_is_cuda():
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("method", ["dpsgd", "nonprivate"])
def test_cuda_run_matches_cpu_run(tiny_model, tiny_tokenizer, method):
    train_data = encode_records(synthetic_texts(160, seed=1), tiny_tokenizer, 64)
    valid_data = encode_records(synthetic_texts(32, seed=2), tiny_tokenizer, 64)
    results, states = {}, {}
    for device in ("cpu", "cuda"):
        # fp32 on both: precision auto would autocast CUDA to bf16 (the next test)
        params = PARAMS.model_copy(update={"device": device, "precision": "fp32"})
        model = attach_lora(copy.deepcopy(tiny_model), params.lora)
        results[device] = train(model, train_data, valid_data, params, method, show_progress=False)
        assert next(model.parameters()).device.type == device
        states[device] = {
            n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad
        }
    if method == "dpsgd":
        assert results["cpu"].ledger.entries == results["cuda"].ledger.entries
        assert results["cpu"].epsilon == results["cuda"].epsilon
    for name, value in states["cpu"].items():
        torch.testing.assert_close(states["cuda"][name], value, rtol=1e-3, atol=1e-4)
    assert results["cuda"].valid_loss == pytest.approx(results["cpu"].valid_loss, rel=1e-3)


def test_cuda_defaults_to_bf16_autocast_with_the_fp32_ledger(tiny_model, tiny_tokenizer):
    """precision auto on CUDA is bf16 autocast: the adapter moves and the frozen base does not,
    the ledger is the fp32 run's (norms, clipping and noise stay float32), and the model ends
    near the fp32 one (bf16 keeps 8 bits of mantissa)."""
    train_data = encode_records(synthetic_texts(160, seed=1), tiny_tokenizer, 64)
    valid_data = encode_records(synthetic_texts(32, seed=2), tiny_tokenizer, 64)
    results = {}
    for precision in ("fp32", "auto"):
        params = PARAMS.model_copy(update={"device": "cuda", "precision": precision})
        model = attach_lora(copy.deepcopy(tiny_model), params.lora)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        results[precision] = train(
            model, train_data, valid_data, params, "dpsgd", show_progress=False
        )
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32, name  # autocast computes in bf16, stores fp32
            assert p.equal(start[name].to(p.device)) != p.requires_grad, name
    assert results["auto"].ledger.entries == results["fp32"].ledger.entries
    assert results["auto"].epsilon == results["fp32"].epsilon
    assert results["auto"].valid_loss == pytest.approx(results["fp32"].valid_loss, rel=0.05)
