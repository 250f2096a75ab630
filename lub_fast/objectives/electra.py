"""ELECTRA replaced-token detection (Clark et al. 2020, google-research/electra ``run_pretraining.py``).

A small generator (an MLM) fills the masked positions with tokens sampled from its own softmax (no
gradient flows through the sampling); the discriminator, sharing the generator's embeddings, labels
every real token as original or replaced. Loss = generator MLM loss + ``disc_weight`` x RTD loss
(50 in the paper). A sampled token equal to the original counts as original, as in the paper.
Both losses are token means over the global data-parallel micro-batch (``mlm.mean_scale``).
"""

import torch
from torch import Tensor, nn

from lub_fast.models.heads import ElectraPair
from lub_fast.objectives.mlm import masked_accuracy, masked_sum, mean_scale
from lub_fast.ops.wwm import IGNORE_INDEX


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
        gen = self.pair.generator(input_ids, attention_mask, token_type_ids, masked_positions=positions, sparse_last_layer=True)
        masked = labels != IGNORE_INDEX
        gen_scale = mean_scale(masked, self.training)
        token_loss = nn.functional.cross_entropy(gen.logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
        gen_loss = masked_sum(token_loss, masked) * gen_scale

        with torch.no_grad():
            probs = torch.softmax(gen.logits.float() / self.temperature, dim=-1)
            sampled = torch.multinomial(probs, 1).view(-1) if labels.numel() > 0 else labels
            original = input_ids.reshape(-1).clone()
            original[positions] = labels
            corrupted = input_ids.reshape(-1).clone()
            corrupted[positions] = sampled
            replaced = corrupted != original
        disc = self.pair.discriminator(corrupted.view_as(input_ids), attention_mask, token_type_ids)
        real = attention_mask.bool()
        replaced = replaced.view_as(real) & real
        disc_scale = mean_scale(real, self.training)
        token_bce = nn.functional.binary_cross_entropy_with_logits(
            disc.logits.float(), replaced.float(), reduction="none"
        )
        disc_loss = masked_sum(token_bce, real) * disc_scale
        loss = gen_loss + self.disc_weight * disc_loss
        with torch.no_grad():
            predicted = disc.logits > 0
            metrics = {
                "gen_loss": gen_loss.detach(),
                "mlm_acc": masked_accuracy(gen.logits, labels, gen_scale),
                "disc_loss": disc_loss.detach(),
                "disc_acc": ((predicted == replaced) & real).sum().float() * disc_scale,
                "replaced_rate": replaced.sum().float() * disc_scale,
                "num_masked": labels.new_tensor(labels.numel()),
            }
        return loss, metrics
