"""The training loop's ``batches`` and held-out evaluation over a ``PretrainDataset`` (what
``pretrain`` and ``distill`` both feed the loop): a micro-batch sampler whose micro-batch ``m`` is
a pure function of ``(m, rank, world size)``, the masking collator keyed on the epoch, and a
``torch.utils.data.DataLoader`` that runs them in worker processes."""

import torch

from lub_fast.errors import UsageError


class BatchError(UsageError, ValueError):
    """A dataset too small for the micro-batch size; raised before training."""


class _Examples(torch.utils.data.Dataset):
    """``(epoch, i)`` -> example ``i`` of epoch ``epoch``, tagged with the epoch for the collator."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        self.dataset.set_epoch(epoch)
        example = self.dataset[i]
        example["epoch"] = epoch
        return example


class _Collate:
    """The masking collator, run with the epoch of the batch's examples (masking keys on it)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        epoch = examples[0].pop("epoch")
        for example in examples[1:]:
            example.pop("epoch")
        self.collator.set_epoch(epoch)
        return self.collator(examples)


class _MicroBatches(torch.utils.data.Sampler):
    """Micro-batch ``m`` of a rank = its examples ``[b * m, b * (m + 1))`` counted over epochs of
    ``len(dataset) // b`` micro-batches, as ``(epoch, index)`` keys. With the dataset's rank
    interleaving, the global batch of step ``m`` is the same set of examples for any world size."""

    def __init__(self, num_examples: int, batch_size: int, start: int):
        self.per_epoch = num_examples // batch_size
        self.batch_size = batch_size
        self.start = start

    def __iter__(self):
        m = self.start
        while True:
            epoch, k = divmod(m, self.per_epoch)
            yield [(epoch, k * self.batch_size + j) for j in range(self.batch_size)]
            m += 1


def masking_config(dataset, mode: str, masking, seed: int, max_seq_len: int):
    """The collator's ``MaskingConfig`` for ``dataset``'s special tokens and vocabulary; ``masking``:
    a ``lub_fast.sections.MaskingSection`` (its rate and max_predictions; ``mode`` resolved)."""
    from lub_fast.data.collator import MaskingConfig

    return MaskingConfig(
        vocab_size=dataset.vocab_size,
        cls_token_id=dataset.cls_token_id,
        sep_token_id=dataset.sep_token_id,
        pad_token_id=dataset.pad_token_id,
        mask_token_id=dataset.mask_token_id,
        unk_token_id=dataset.unk_token_id,
        mode=mode,
        rate=masking.rate,
        max_predictions=masking.max_predictions,
        seed=seed,
        max_seq_len=max_seq_len,
    )


def make_batches(dataset, collator, batch_size: int, num_workers: int):
    """The training loop's ``batches(start_micro_step, rank, world_size)`` over a rank's dataset."""
    if len(dataset) < batch_size:
        raise BatchError(
            f"{len(dataset)} examples per rank cannot fill one micro-batch of {batch_size}: "
            "lower --data.batch_size or add data"
        )

    def batches(start: int, rank: int, world_size: int):
        if (dataset.rank, dataset.world_size) != (rank, world_size):
            raise RuntimeError(f"dataset built for rank {dataset.rank}/{dataset.world_size}, loop is {rank}/{world_size}")
        loader = torch.utils.data.DataLoader(
            _Examples(dataset),
            batch_sampler=_MicroBatches(len(dataset), batch_size, start),
            collate_fn=_Collate(collator),
            num_workers=num_workers,
            prefetch_factor=4 if num_workers else None,
            # Its own generator: a DataLoader iterator draws a base seed when created, which from
            # the global generator would shift every later dropout mask of a resumed run.
            generator=torch.Generator(),
        )
        return iter(loader)

    return batches


def eval_batches(dataset, collator, batch_size: int, num_batches: int) -> list[dict]:
    """The first ``num_batches`` micro-batches of ``dataset`` (epoch 0), masked by ``collator``:
    the fixed held-out batches an evaluation scores."""
    n = min(num_batches * batch_size, len(dataset))
    keys = [(0, i) for i in range(n)]
    examples = _Examples(dataset)
    collate = _Collate(collator)
    return [collate([examples[k] for k in keys[i : i + batch_size]]) for i in range(0, n, batch_size)]


def make_eval_fn(dataset, collator, batch_size: int, num_batches: int):
    """Held-out metrics of an objective (MLM loss, masked-token accuracy, ...), each weighted by the
    batch's masked tokens, over the first ``num_batches`` fixed micro-batches of ``dataset``."""
    fixed = eval_batches(dataset, collator, batch_size, num_batches)

    def eval_fn(objective):
        device = next(objective.parameters()).device
        totals: dict[str, float] = {}
        weight = 0.0
        for batch in fixed:
            batch = {k: v.to(device) for k, v in batch.items()}
            _, metrics = objective(batch)
            w = float(metrics["num_masked"])
            weight += w
            for k, v in metrics.items():
                if not k.startswith("num_"):
                    totals[k] = totals.get(k, 0.0) + float(v) * w
        return {k: v / max(weight, 1.0) for k, v in totals.items()}

    return eval_fn
