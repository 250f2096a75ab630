"""``lub_fast.models.local_init.neighbour_heads``: at step 0 layer 0's heads 0 and 1 attend to the
next and previous token, the model stays a plain BERT checkpoint that transformers loads and runs
the same, and shapes it does not fit are refused."""

import pytest
import torch

from lub_fast.models import EncoderConfig, MaskedLM
from lub_fast.models.local_init import neighbour_attention, neighbour_heads


def _model(family="bert", **changes):
    torch.manual_seed(0)
    config = dict(vocab_size=800, max_position_embeddings=130, initializer_range=0.05)
    return MaskedLM(EncoderConfig.preset(family, "tiny", **{**config, **changes}))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_neighbour_heads_attend_to_the_next_and_previous_token(family):
    model = _model(family)
    before = neighbour_attention(model.encoder)
    assert max(before) < 0.1, before  # BERT's random init: about uniform over 32 positions
    neighbour_heads(model.encoder)
    after = neighbour_attention(model.encoder)
    assert min(after) > 0.75, after
    # heads 4-7 of an 8-head model keep their random weights
    wide = _model(family, hidden_size=256, num_attention_heads=8, intermediate_size=512)
    reference = wide.encoder.layers[0].qkv.weight.detach().clone()
    neighbour_heads(wide.encoder)
    head_dim = wide.config.head_dim
    untouched = slice(4 * head_dim, 8 * head_dim)
    assert torch.equal(wide.encoder.layers[0].qkv.weight[untouched], reference[untouched])
    assert not torch.equal(wide.encoder.layers[0].qkv.weight[:4 * head_dim], reference[:4 * head_dim])


def test_neighbour_heads_keep_a_plain_bert_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model("bert", pad_token_id=0)
    neighbour_heads(model.encoder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"t{i}" for i in range(795)]
    model.save_pretrained(tmp_path, tokenizer={"vocab.txt": ("\n".join(vocab) + "\n").encode()})
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 800, (1, 20))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model.eval()(ids, mask, torch.zeros_like(ids)).logits
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_neighbour_heads_refuse_shapes_they_do_not_fit():
    with pytest.raises(ValueError, match="2\\+ heads"):
        neighbour_heads(_model(num_attention_heads=1).encoder)
    with pytest.raises(ValueError, match="even dims"):
        neighbour_heads(_model().encoder, dims=31)
    with pytest.raises(ValueError, match="as wide as the hidden size"):
        neighbour_heads(_model("albert", embedding_size=64).encoder)
