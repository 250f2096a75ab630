"""Screen initialisations of the offline demo's model (issue 18 section 2) that keep it a plain BERT
checkpoint: the demo config (``lub_fast.recipes.demo_config``) with ``--section.field=value``
overrides, plus one of

- ``--init none``: the demo's own initial weights;
- ``--init local``: "neighbour heads". The first ``--dims`` hidden dimensions of the position
  embeddings hold a table of ``--dims / 2`` sine/cosine pairs of frequencies ``pi k / (n + 1)``
  (k = 1..n) times ``--pos-scale`` (the token and segment embeddings are zero there), and in layer
  0 the query/key weights of head 0 and head 1 rotate that table by +1 and -1 positions times
  ``--gain``: at step 0 head 0 attends to the next token and head 1 to the previous one (their
  value and output weights, and everything else, are the usual random ones). Training is free to
  change all of it.

    python benchmarks/quality/demo_init_screen.py --init local --steps 1000 --output /tmp/screen-local

Prints and writes ``OUTPUT/screen.json``: the held-out masked-token accuracy and loss of every
evaluation (``--train.eval_every``) and the wall seconds; the attention of layer 0 at step 0 is
checked (the share of heads 0/1 on the +1/-1 neighbour) so that a wrong table shows up before a
5-minute run.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import lub_fast.pretrain as pretrain  # noqa: E402
from lub_fast.config_cli import resolve_config  # noqa: E402
from lub_fast.recipes import demo_config  # noqa: E402


def local_init(model, dims: int, pos_scale: float, gain: float) -> None:
    """Write the neighbour-head initialisation (module docstring) into ``model`` (a ``MaskedLM``)."""
    emb, layer, cfg = model.encoder.embeddings, model.encoder.layers[0], model.config
    hidden, head_dim = cfg.hidden_size, cfg.head_dim
    if dims % 2 or dims > head_dim or cfg.num_attention_heads < 2 or emb.word.weight.shape[1] != hidden:
        raise SystemExit(f"--dims {dims}: needs an even number <= head size {head_dim}, 2+ heads, no factorized embeddings")
    n = dims // 2
    freqs = torch.pi * torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
    angles = torch.arange(emb.position.weight.shape[0], dtype=torch.float64)[:, None] * freqs
    with torch.no_grad():
        table = torch.zeros(angles.shape[0], dims, dtype=torch.float64)
        table[:, 0::2], table[:, 1::2] = torch.sin(angles), torch.cos(angles)
        emb.position.weight[:, :dims] = (table * pos_scale).to(emb.position.weight.dtype)
        emb.word.weight[:, :dims] = 0.0
        emb.token_type.weight[:, :dims] = 0.0
        q = layer.qkv.weight[:hidden]
        k = layer.qkv.weight[hidden:2 * hidden]
        for head, shift in ((0, 1), (1, -1)):
            rows = slice(head * head_dim, head * head_dim + dims)
            c, s = torch.cos(freqs * shift), torch.sin(freqs * shift)
            rot = torch.zeros(dims, dims, dtype=torch.float64)
            # q_sin(i) = sin(w (i + shift)) = cos(w shift) sin(w i) + sin(w shift) cos(w i); q_cos likewise
            rot[0::2, 0::2], rot[0::2, 1::2] = torch.diag(c), torch.diag(s)
            rot[1::2, 0::2], rot[1::2, 1::2] = torch.diag(-s), torch.diag(c)
            q[rows, :dims] = (gain * rot).to(q.dtype)
            q[rows, dims:] = 0.0
            k[rows, :dims] = gain * torch.eye(dims, dtype=k.dtype)
            k[rows, dims:] = 0.0
            layer.qkv.bias[rows] = 0.0
            layer.qkv.bias[hidden + head * head_dim:hidden + head * head_dim + dims] = 0.0


def neighbour_share(model, length: int = 32) -> tuple[float, float]:
    """Mean attention probability of layer 0's head 0 on position i+1 and of head 1 on i-1, for a
    random sequence of ``length`` tokens (interior positions)."""
    cfg = model.config
    ids = torch.randint(5, cfg.vocab_size, (length,))
    with torch.no_grad():
        x = model.encoder.embeddings(ids, torch.zeros_like(ids), torch.arange(length))
        qkv = model.encoder.layers[0].qkv(x).view(length, 3, cfg.num_attention_heads, cfg.head_dim)
        q, k = qkv[:, 0], qkv[:, 1]
        probs = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) / cfg.head_dim**0.5, -1)
    idx = torch.arange(1, length - 1)
    return float(probs[0, idx, idx + 1].mean()), float(probs[1, idx, idx - 1].mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", choices=("none", "local"), default="none")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--dims", type=int, default=32)
    parser.add_argument("--pos-scale", type=float, default=0.05)
    parser.add_argument("--gain", type=float, default=2.5)
    parser.add_argument("--output", required=True)
    args, overrides = parser.parse_known_args()
    cfg, rest = resolve_config(demo_config(args.steps), [f"--output={args.output}", *overrides])
    if rest:
        parser.error(f"unknown arguments {rest}")
    checks = {}
    original = pretrain.build_objective

    def build(cfg, vocab_size, special_ids, init=None):
        objective, config = original(cfg, vocab_size, special_ids, init)
        checks["before"] = neighbour_share(objective.model)
        if args.init == "local":
            local_init(objective.model, args.dims, args.pos_scale, args.gain)
        checks["after"] = neighbour_share(objective.model)
        print(f"step-0 attention on the neighbour (head 0 -> i+1, head 1 -> i-1): {checks['before']} -> {checks['after']}",
              flush=True)
        return objective, config

    pretrain.build_objective = build
    start = time.perf_counter()
    summary = pretrain.run(cfg, demo=True)
    wall = time.perf_counter() - start
    evals = [json.loads(line) for line in (Path(args.output) / "metrics.jsonl").read_text().splitlines()
             if '"split": "eval"' in line]
    record = {"init": args.init, "dims": args.dims, "pos_scale": args.pos_scale, "gain": args.gain,
              "overrides": overrides, "steps": args.steps, "wall_s": round(wall, 1), "step0_neighbour": checks,
              "evals": [{"step": e["step"], "mlm_acc": round(e["mlm_acc"], 4), "mlm_loss": round(e["mlm_loss"], 4)}
                        for e in evals],
              "fill_mask": summary.get("fill_mask")}
    (Path(args.output) / "screen.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: record[k] for k in ("init", "gain", "wall_s", "evals")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
