"""ELECTRA replaced-token detection (Clark et al. 2020, google-research/electra ``run_pretraining.py``).

A small generator (an MLM) fills the masked positions with tokens sampled from its own softmax (no
gradient flows through the sampling); the discriminator, sharing the generator's embeddings, labels
every real token as original or replaced. Loss = generator MLM loss + ``disc_weight`` x RTD loss
(50 in the paper). A sampled token equal to the original counts as original, as in the paper.
"""

import torch
from torch import Tensor, nn

from lub_fast.models.heads import ElectraPair
from lub_fast.objectives.mlm import masked_accuracy


class ElectraObjective(nn.Module):
    """Generator MLM + weighted discriminator RTD on an ``ElectraPair``.

    Metrics: ``gen_loss``, ``mlm_acc`` (the generator's masked-token accuracy), ``disc_loss``,
    ``disc_acc`` (over real tokens), ``replaced_rate`` (replaced / real tokens), ``num_masked``.
    """

    def __init__(self, pair: ElectraPair, disc_weight: float = 50.0, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.pair = pair
        self.disc_weight = disc_weight
        self.temperature = temperature

    def forward(self, batch) -> tuple[Tensor, dict]:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        token_type_ids = batch.get("token_type_ids")
        positions, labels = batch["masked_positions"], batch["masked_labels"]
        gen = self.pair.generator(
            input_ids, attention_mask, token_type_ids, masked_positions=positions, labels=None
        )
        if labels.numel() > 0:
            gen_loss = nn.functional.cross_entropy(gen.logits.float(), labels)
        else:
            gen_loss = gen.logits.sum() * 0.0

        with torch.no_grad():
            probs = torch.softmax(gen.logits.float() / self.temperature, dim=-1)
            sampled = torch.multinomial(probs, 1).view(-1) if labels.numel() > 0 else labels
            original = input_ids.reshape(-1).clone()
            original[positions] = labels
            corrupted = input_ids.reshape(-1).clone()
            corrupted[positions] = sampled
            replaced = (corrupted != original).view_as(input_ids).long()
        disc = self.pair.discriminator(
            corrupted.view_as(input_ids), attention_mask, token_type_ids, labels=replaced
        )
        loss = gen_loss + self.disc_weight * disc.loss
        with torch.no_grad():
            real = attention_mask.bool()
            predicted = disc.logits > 0
            num_real = real.sum().clamp(min=1).float()
            metrics = {
                "gen_loss": gen_loss.detach(),
                "mlm_acc": masked_accuracy(gen.logits, labels),
                "disc_loss": disc.loss.detach(),
                "disc_acc": ((predicted == replaced.bool()) & real).sum().float() / num_real,
                "replaced_rate": (replaced.bool() & real).sum().float() / num_real,
                "num_masked": torch.tensor(labels.numel()),
            }
        return loss, metrics
