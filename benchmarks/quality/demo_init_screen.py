"""Screen initialisations of the offline demo's model (issue 18 section 2) that keep it a plain BERT
checkpoint: the demo config (``lub_fast.recipes.demo_config``) with ``--section.field=value``
overrides, plus one of

- ``--init none``: the demo's own initial weights;
- ``--init local``: ``lub_fast.models.local_init.neighbour_heads`` (``--dims``, ``--gain``): at
  step 0 layer 0's head 0 attends to the next token and head 1 to the previous one; the model stays
  a plain BERT checkpoint.

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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import lub_fast.pretrain as pretrain  # noqa: E402
from lub_fast.config_cli import resolve_config  # noqa: E402
from lub_fast.models.local_init import neighbour_attention, neighbour_heads  # noqa: E402
from lub_fast.recipes import demo_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", choices=("none", "local"), default="none")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--dims", type=int, default=32)
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
        encoder = objective.model.encoder
        checks["before"] = neighbour_attention(encoder)
        if args.init == "local":
            neighbour_heads(encoder, args.dims, args.gain)
        checks["after"] = neighbour_attention(encoder)
        print(f"step-0 attention on the neighbour (head 0 -> i+1, head 1 -> i-1): {checks['before']} -> {checks['after']}",
              flush=True)
        return objective, config

    pretrain.build_objective = build
    start = time.perf_counter()
    summary = pretrain.run(cfg, demo=True)
    wall = time.perf_counter() - start
    evals = [json.loads(line) for line in (Path(args.output) / "metrics.jsonl").read_text().splitlines()
             if '"split": "eval"' in line]
    record = {"init": args.init, "dims": args.dims, "gain": args.gain,
              "overrides": overrides, "steps": args.steps, "wall_s": round(wall, 1), "step0_neighbour": checks,
              "evals": [{"step": e["step"], "mlm_acc": round(e["mlm_acc"], 4), "mlm_loss": round(e["mlm_loss"], 4)}
                        for e in evals],
              "fill_mask": summary.get("fill_mask")}
    (Path(args.output) / "screen.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: record[k] for k in ("init", "gain", "wall_s", "evals")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
