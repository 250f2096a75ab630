"""Neighbour heads: an initialisation that gives a fresh encoder, at step 0, attention heads that
look at the next and the previous token (and, with 4+ heads, the tokens two away). The model stays a plain BERT checkpoint (only the
initial values of existing weights change), and training is free to change all of it.

Why: a tiny model trained for minutes (the offline demo) spends most of its steps learning which
positions to attend to; with learned absolute positions and BERT's random initialisation every
head starts out uniform, and masked-token accuracy sits on the unigram plateau for a long time.

What: the first ``dims`` embedding dimensions of every position hold ``dims / 2`` sine/cosine pairs
of the frequencies ``pi k / (n + 1)`` (k = 1..n, ``n = dims / 2``), times the model's
``initializer_range`` (the token and segment embeddings are zero there, so that after the
embedding LayerNorm these dimensions carry the position alone). In layer 0 the key weights of
heads 0-3 read those dimensions as they are, and their query weights rotate them by +1, -1, +2 and
-2 positions (``SHIFTS``), times ``gain``: the logit of position ``j`` for a query at ``i`` is then a sharp
Dirichlet kernel of ``i + shift - j``. Value and output weights keep their random values, so the
heads pass on a random projection of the neighbour's content. With the demo's model (hidden 128,
2 heads, std 0.05), gain 2.5 puts 85% of each head's attention on its neighbour.
"""

import torch

from lub_fast.models.encoder import Encoder

SHIFTS = (1, -1, 2, -2)  # the relative position heads 0, 1, 2, 3 attend to; later heads stay random


def fits(config, dims: int = 32) -> str | None:
    """Why ``neighbour_heads(..., dims)`` does not fit an encoder of ``config``; ``None`` when it does."""
    if config.embedding_size != config.hidden_size:
        return (f"neighbour heads need embeddings as wide as the hidden size ({config.embedding_size} vs "
                f"{config.hidden_size})")
    if config.num_attention_heads < 2 or dims % 2 or not 2 <= dims <= config.head_dim:
        return (f"neighbour heads need 2+ heads and an even dims <= the head size {config.head_dim}, got "
                f"{config.num_attention_heads} heads, dims {dims}")
    return None


def neighbour_heads(encoder: Encoder, dims: int = 32, gain: float = 2.5) -> None:
    """Write the neighbour-head initialisation (module docstring) into a freshly initialised
    ``encoder``; raises ``ValueError`` for a shape it does not fit (``fits``)."""
    cfg = encoder.config
    emb, layer = encoder.embeddings, encoder.layers[0]
    hidden, head_dim = cfg.hidden_size, cfg.head_dim
    problem = fits(cfg, dims)
    if problem:
        raise ValueError(problem)
    n = dims // 2
    freqs = torch.pi * torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
    angles = torch.arange(emb.position.weight.shape[0], dtype=torch.float64)[:, None] * freqs
    table = torch.empty(angles.shape[0], dims, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(angles), torch.cos(angles)
    with torch.no_grad():
        emb.position.weight[:, :dims] = (table * cfg.initializer_range).to(emb.position.weight.dtype)
        emb.word.weight[:, :dims] = 0.0
        emb.token_type.weight[:, :dims] = 0.0
        weight, bias = layer.qkv.weight, layer.qkv.bias  # rows: query, key, value
        for head, shift in enumerate(SHIFTS[:cfg.num_attention_heads]):
            q_rows = slice(head * head_dim, head * head_dim + dims)
            k_rows = slice(hidden + head * head_dim, hidden + head * head_dim + dims)
            c, s = torch.cos(freqs * shift), torch.sin(freqs * shift)
            rot = torch.zeros(dims, dims, dtype=torch.float64)
            # sin(w (i + shift)) = cos(w shift) sin(w i) + sin(w shift) cos(w i), cos likewise
            rot[0::2, 0::2], rot[0::2, 1::2] = torch.diag(c), torch.diag(s)
            rot[1::2, 0::2], rot[1::2, 1::2] = torch.diag(-s), torch.diag(c)
            weight[q_rows] = 0.0
            weight[q_rows, :dims] = (gain * rot).to(weight.dtype)
            weight[k_rows] = 0.0
            weight[k_rows, :dims] = gain * torch.eye(dims, dtype=weight.dtype)
            bias[q_rows] = 0.0
            bias[k_rows] = 0.0


def neighbour_attention(encoder: Encoder, length: int = 32, seed: int = 0) -> tuple[float, float]:
    """Mean attention probability of layer 0's head 0 on position ``i + 1`` and of head 1 on
    ``i - 1`` (interior positions of one random sequence of ``length`` tokens)."""
    cfg = encoder.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (length,), generator=generator)
    positions = torch.arange(length) + cfg.position_offset
    with torch.no_grad():
        x = encoder.embeddings(ids, torch.zeros_like(ids), positions)
        qkv = encoder.layers[0].qkv(x).view(length, 3, cfg.num_attention_heads, cfg.head_dim)
        probs = torch.softmax(torch.einsum("ihd,jhd->hij", qkv[:, 0], qkv[:, 1]) / cfg.head_dim**0.5, -1)
    idx = torch.arange(1, length - 1)
    return float(probs[0, idx, idx + 1].mean()), float(probs[1, idx, idx - 1].mean())
