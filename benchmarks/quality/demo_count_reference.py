"""A count reference for the demo's held-out masked-token accuracy (issue #18 section 2).

It masks the demo's held-out set exactly as the demo's evaluation does (the first ``eval_batches``
micro-batches, the eval collator with seed + 1) and predicts each masked token from counts over the
demo's training examples: the most frequent token between the same visible left and right
neighbours, else after the visible left neighbour, else before the visible right one, else the most
frequent token. It tells how much of the accuracy purely local context gives under each masking.

    python benchmarks/quality/demo_count_reference.py [--mode whole_word|token] [--max-seq-len 32]
        [--model runs/demo-*/hf]

With ``--model`` (a demo's HF export) it also scores that model on the same masked batches, loaded
with transformers' ``AutoModelForMaskedLM``: how the demo's WWM-trained model does under either
masking, next to the reference.

Prepares the demo cache first if it is missing (``$LUB_FAST_CACHE/demo``). Pure Python: about
3 minutes on one core.
"""

import argparse
import collections
import dataclasses

from lub_fast.data.collator import MaskingCollator
from lub_fast.data.dataset import PretrainDataset
from lub_fast.data.loader import eval_batches, masking_config
from lub_fast.demo import prepare_demo_data
from lub_fast.pretrain import eval_dataset
from lub_fast.recipes import demo_config


def model_accuracy(path: str, batches) -> float:
    """Masked-token accuracy of the HF export at ``path`` on ``batches`` (arg-max at labelled positions)."""
    import torch
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    hits = total = 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            keep = batch["labels"] != -100
            hits += int((logits.argmax(-1)[keep] == batch["labels"][keep]).sum())
            total += int(keep.sum())
    return hits / max(total, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["whole_word", "token"], default="whole_word")
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: the demo's")
    parser.add_argument("--model", default=None, help="an HF export to score on the same batches")
    args = parser.parse_args()
    cfg = demo_config()
    data = cfg.data if args.max_seq_len is None else dataclasses.replace(cfg.data, max_seq_len=args.max_seq_len)
    cfg = prepare_demo_data(dataclasses.replace(cfg, data=data, masking=dataclasses.replace(cfg.masking, mode=args.mode)))
    common = {"max_seq_len": cfg.data.max_seq_len, "pair": cfg.pair, "short_seq_prob": cfg.data.short_seq_prob,
              "seed": cfg.data.seed}
    train = PretrainDataset(list(cfg.data.data), rank=0, world_size=1, verify_checksums=False, **common)
    masking = masking_config(train, cfg.mask_mode, cfg.masking, cfg.data.seed, cfg.data.max_seq_len)
    held = eval_dataset(list(cfg.data.eval_data), common, verify_checksums=False)
    collator = MaskingCollator(dataclasses.replace(masking, seed=cfg.data.seed + 1))
    batches = eval_batches(held, collator, cfg.data.batch_size, cfg.data.eval_batches)
    n = sum(len(batch["input_ids"]) for batch in batches)
    if args.model:
        print(f"{cfg.mask_mode} masking, {cfg.data.max_seq_len} tokens: {args.model} {model_accuracy(args.model, batches):.3f}")

    both = collections.defaultdict(collections.Counter)
    after = collections.defaultdict(collections.Counter)
    before = collections.defaultdict(collections.Counter)
    unigram = collections.Counter()
    for i in range(len(train)):
        ids = list(train[i]["input_ids"])
        for k in range(1, len(ids) - 1):
            left, token, right = int(ids[k - 1]), int(ids[k]), int(ids[k + 1])
            both[(left, right)][token] += 1
            after[left][token] += 1
            before[right][token] += 1
            unigram[token] += 1
    mask, most = masking.mask_token_id, unigram.most_common(1)[0][0]
    hits = total = 0
    for batch in batches:
        inputs, labels = batch["input_ids"], batch["labels"]
        for row, col in (labels != -100).nonzero().tolist():
            left = int(inputs[row, col - 1])
            right = int(inputs[row, col + 1]) if col + 1 < inputs.shape[1] else -1
            if left != mask and right != mask and (left, right) in both:
                guess = both[(left, right)].most_common(1)[0][0]
            elif left != mask and left in after:
                guess = after[left].most_common(1)[0][0]
            elif right != mask and right in before:
                guess = before[right].most_common(1)[0][0]
            else:
                guess = most
            hits += guess == int(labels[row, col])
            total += 1
    print(f"{cfg.mask_mode} masking, {cfg.data.max_seq_len} tokens: count reference {hits / total:.3f} "
          f"on {total} masked tokens of {n} held-out examples ({len(train)} training examples counted)")


if __name__ == "__main__":
    main()
