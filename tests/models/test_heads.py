"""Head losses against HF's definitions (tiny random HF models, fp32 CPU), and head structure."""

import pytest
import torch
import transformers

import lub_fast
from lub_fast.models import EncoderConfig, MaskedLM, PreTraining, SequenceClassification

TOL = dict(atol=1e-5, rtol=1e-5)
LENGTHS = (8, 3, 1, 6)


def hf_pair(tmp_path, family, arch, **changes):
    config_cls = getattr(transformers, {"bert": "BertConfig", "roberta": "RobertaConfig",
                                        "albert": "AlbertConfig", "electra": "ElectraConfig"}[family])  # fmt: skip
    fields = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64)  # fmt: skip
    if family in ("albert", "electra"):
        fields["embedding_size"] = 16
    fields.update(changes)
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(config_cls(**fields)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    return hf, lub_fast.from_pretrained(tmp_path).eval()


def inputs(family, full=False):
    gen = torch.Generator().manual_seed(3)
    lengths = (8,) * 4 if full else LENGTHS
    mask = (torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]).long()
    pad = 1 if family == "roberta" else 0
    ids = torch.randint(5, 99, (4, 8), generator=gen).masked_fill(mask == 0, pad)
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize(
    "num_labels,labels,problem",
    [
        (1, torch.tensor([0.5, -1.0, 2.0, 0.0]), "regression"),
        (3, torch.tensor([0, 2, 1, 2]), "single_label_classification"),
        (3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]]), "multi_label_classification"),
    ],
)
@pytest.mark.parametrize("family", ["bert", "roberta", "albert", "electra"])
def test_heads_sequence_classification_loss(family, num_labels, labels, problem, tmp_path):
    hf, ours = hf_pair(tmp_path, family, f"{family.capitalize()}ForSequenceClassification", num_labels=num_labels)
    batch = inputs(family)
    expected = hf(**batch, labels=labels)
    assert hf.config.problem_type == problem
    got = ours(**batch, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, **TOL)
    torch.testing.assert_close(got.loss, expected.loss, **TOL)


@pytest.mark.parametrize("family", ["bert", "roberta", "albert", "electra"])
def test_heads_token_classification_and_qa_loss(family, tmp_path):
    hf, ours = hf_pair(tmp_path / "tok", family, f"{family.capitalize()}ForTokenClassification", num_labels=5)
    batch = inputs(family)
    labels = torch.randint(0, 5, (4, 8)).masked_fill(batch["attention_mask"] == 0, -100)
    labels[0, 2] = -100
    torch.testing.assert_close(ours(**batch, labels=labels).loss, hf(**batch, labels=labels).loss, **TOL)

    hf, ours = hf_pair(tmp_path / "qa", family, f"{family.capitalize()}ForQuestionAnswering")
    full = inputs(family, full=True)  # HF's softmax runs over padded positions too; compare unpadded
    spans = dict(start_positions=torch.tensor([1, 0, 7, 30]), end_positions=torch.tensor([3, 0, 7, 2]))
    torch.testing.assert_close(ours(**full, **spans).loss, hf(**full, **spans).loss, **TOL)
    padded = ours(**batch)
    assert (padded.start_logits[batch["attention_mask"] == 0] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("family,arch", [("bert", "BertForPreTraining"), ("albert", "AlbertForPreTraining")])
def test_heads_pretraining_loss_is_mlm_plus_pair(family, arch, tmp_path):
    hf, ours = hf_pair(tmp_path, family, arch)
    batch = inputs(family)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    pair = torch.tensor([0, 1, 1, 0])
    kwarg = "next_sentence_label" if family == "bert" else "sentence_order_label"
    expected = hf(**batch, labels=labels, **{kwarg: pair}).loss
    got = ours(**batch, labels=labels, pair_labels=pair)
    torch.testing.assert_close(got.loss, expected, **TOL)
    mlm_only = ours(**batch, labels=labels).loss
    pair_only = ours(**batch, pair_labels=pair).loss
    torch.testing.assert_close(mlm_only + pair_only, got.loss)
    assert ours(**batch).loss is None


def test_heads_electra_discriminator_loss(tmp_path):
    hf, ours = hf_pair(tmp_path, "electra", "ElectraForPreTraining")
    batch = inputs("electra")
    labels = torch.randint(0, 2, (4, 8))
    torch.testing.assert_close(ours(**batch, labels=labels).loss, hf(**batch, labels=labels).loss, **TOL)


def test_heads_mlm_decoder_tied_and_structure():
    model = PreTraining(EncoderConfig.preset("albert", "tiny"))
    names = [n for n, _ in model.named_parameters()]
    assert not any("decoder" in n for n in names), "the MLM decoder must be the word embeddings, not a copy"
    word = model.encoder.embeddings.word.weight
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (2, 6))
    out = model(ids, masked_positions=torch.tensor([1, 7]), labels=torch.tensor([3, 4]))
    out.loss.backward()
    assert word.grad is not None and word.grad[3].abs().sum() > 0, "decoder gradient must reach the embeddings"
    assert out.logits.shape == (2, model.config.vocab_size)
    with pytest.raises(ValueError, match="masked labels of the same shape"):
        model(ids, masked_positions=torch.tensor([1, 7]), labels=ids)
    with pytest.raises(ValueError, match="bert and albert"):
        PreTraining(EncoderConfig.preset("roberta", "tiny"))
    assert SequenceClassification(EncoderConfig.preset("electra", "tiny"), 4).encoder.pooler is None
    assert MaskedLM(EncoderConfig.preset("bert", "tiny")).encoder.pooler is None
