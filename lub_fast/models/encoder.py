"""One post-LayerNorm Transformer encoder for BERT, RoBERTa, ALBERT and ELECTRA, run on unpadded tokens.

Architecture: Devlin et al. 2019 (BERT), with the family differences of ``EncoderConfig``
(factorized embeddings and cross-layer sharing from ALBERT, the embedding projection of ELECTRA,
RoBERTa's padding-aware positions). Numerics follow HF ``transformers`` 5 (``modeling_bert.py`` and
siblings) so that imported checkpoints give the same outputs.

The encoder accepts padded batches (``input_ids [B, S]`` + ``attention_mask [B, S]``), gathers the
``T`` real tokens once (``Unpadded``), and runs embeddings, every layer and the heads on ``[T, ...]``
tensors: no compute on padding. Attention is ``lub_fast.ops.varlen_attention`` over
``cu_seqlens``; the feed-forward activation is ``lub_fast.ops.bias_gelu``; Q, K and V come from one
fused ``[3 * hidden, hidden]`` matmul. Padded ``[B, S, hidden]`` states are built only on request
(``EncoderOutput.last_hidden_state``), with zeros at padding.

Sparse last layer: when only some positions' final states are needed (the MLM head at the masked
positions, the pooler at the first token), ``forward(..., output_positions=...)`` runs the last
layer's queries, attention output, LayerNorms and feed-forward at those rows only; its keys and
values still come from every token, so the states there are the full encoder's. It runs through
the same attention op with a query layout of its own (``cu_seqlens_q`` over the kept rows), with
each query's position as its dropout row, so its attention dropout is the full layer's at those
rows. At 15% masking that skips about 6% of a 12-layer encoder's layer FLOPs and 18% of a 4-layer
one's.

Dropout: hidden dropout uses ``torch.nn.functional.dropout``; attention dropout is counter-based
with a seed drawn from torch's default generator on each training forward, so restoring torch's RNG
state reproduces every dropout mask.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lub_fast.models.config import EncoderConfig
from lub_fast.ops.attention import varlen_attention
from lub_fast.ops.bias_gelu import bias_gelu

_SEED_HIGH = 2**62


@dataclass(frozen=True)
class Unpadded:
    """Where the ``T`` real tokens of a padded ``[B, S]`` batch live.

    ``indices`` int64 ``[T]``: flat positions ``b * S + s`` of the real tokens, ascending.
    ``cu_seqlens`` int32 ``[B + 1]``: row boundaries in the unpadded order (row ``b`` is tokens
    ``cu_seqlens[b]:cu_seqlens[b + 1]``). ``max_seqlen``: longest row. ``token_rank`` int64
    ``[B * S]``: for a real position its index in ``[0, T)`` (meaningless at padding). ``is_real``
    bool ``[B * S]``: the flattened mask.

    ``dummy_tokens``: rows the encoder appends after the ``T`` real ones, so that its row count
    ``T + dummy_tokens`` is a multiple of ``from_mask``'s ``token_multiple``. They form their own
    sequences of at most ``max_seqlen`` rows, so no real token attends to them; attention runs on
    ``attention_cu_seqlens`` (``cu_seqlens`` followed by those sequences' ends).
    """

    indices: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    token_rank: Tensor
    is_real: Tensor
    batch_size: int
    seq_len: int
    dummy_tokens: int
    attention_cu_seqlens: Tensor

    @classmethod
    def from_mask(cls, attention_mask: Tensor, token_multiple: int = 1) -> "Unpadded":
        """From ``attention_mask [B, S]`` (1/True = real token, any int or bool dtype); the row
        count is rounded up to a multiple of ``token_multiple`` with dummy rows."""
        batch_size, seq_len = attention_mask.shape
        flat = attention_mask.reshape(-1).bool()
        indices = flat.nonzero().squeeze(1)
        lengths = attention_mask.bool().sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
        max_seqlen = int(lengths.max()) if batch_size else 0
        token_rank = torch.cumsum(flat, dim=0) - 1
        num_tokens = indices.numel()
        dummy_tokens = -num_tokens % token_multiple
        attention_cu_seqlens = cu_seqlens
        if dummy_tokens:  # then num_tokens > 0, so max_seqlen > 0
            end = num_tokens + dummy_tokens
            ends = [*range(num_tokens + max_seqlen, end, max_seqlen), end]
            attention_cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor(ends)])
        return cls(
            indices, cu_seqlens, max_seqlen, token_rank, flat, batch_size, seq_len,
            dummy_tokens, attention_cu_seqlens,
        )  # fmt: skip

    @property
    def num_tokens(self) -> int:
        return self.indices.numel()

    def unpad(self, x: Tensor) -> Tensor:
        """``[B, S, ...] -> [T, ...]``: the real tokens."""
        return x.reshape(self.batch_size * self.seq_len, *x.shape[2:]).index_select(0, self.indices)

    def pad(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """``[T, ...] -> [B, S, ...]`` with ``fill`` at padding; differentiable."""
        out = x.new_full((self.batch_size * self.seq_len, *x.shape[1:]), fill)
        out = out.index_copy(0, self.indices, x)
        return out.view(self.batch_size, self.seq_len, *x.shape[1:])

    def rows(self, flat_positions: Tensor) -> Tensor:
        """Unpadded token indices of flat padded positions ``b * S + s`` (which must be real tokens)."""
        return self.token_rank.index_select(0, flat_positions)

    def first_tokens(self, hidden: Tensor) -> Tensor:
        """``[B, hidden]``: the state at padded position 0 of each row (zeros for rows padded there)."""
        starts = torch.arange(self.batch_size, device=hidden.device) * self.seq_len
        real = self.is_real[starts]
        picked = hidden.index_select(0, self.token_rank[starts].clamp(min=0))
        return picked * real[:, None].to(hidden.dtype)


@dataclass
class EncoderOutput:
    """``hidden [T, hidden]`` (real tokens) plus ``pooler_output [B, hidden]`` when the encoder has a
    pooler; ``last_hidden_state [B, S, hidden]`` (zeros at padding) is built on first access.

    After ``Encoder.forward(..., output_positions=P)`` the last layer ran at those positions only:
    ``hidden`` is ``[len(P), hidden]`` in the order of ``P`` (``positions`` holds ``P``), and only
    ``at(P)`` and ``pooler_output`` are available."""

    hidden: Tensor
    unpadded: Unpadded
    pooler_output: Tensor | None = None
    positions: Tensor | None = None

    @functools.cached_property
    def last_hidden_state(self) -> Tensor:
        if self.positions is not None:
            raise ValueError("the encoder's last layer ran at output_positions only: no last_hidden_state")
        return self.unpadded.pad(self.hidden)

    def at(self, flat_positions: Tensor) -> Tensor:
        """``[M, hidden]``: the final states at flat padded positions ``b * S + s`` (real tokens)."""
        if self.positions is None:
            return self.hidden.index_select(0, self.unpadded.rows(flat_positions))
        if flat_positions is self.positions or torch.equal(flat_positions, self.positions):
            return self.hidden
        raise ValueError("the encoder's last layer ran at other output_positions than the ones asked for")


class Embeddings(nn.Module):
    """Word + position + token type embeddings, LayerNorm, dropout; width ``embedding_size``."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        width = config.embedding_size
        self.word = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, width)
        self.token_type = nn.Embedding(config.type_vocab_size, width)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor) -> Tensor:
        """All ``[T]`` int64 -> ``[T, embedding_size]``."""
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)
        x = self.norm(x)
        return F.dropout(x, self.config.hidden_dropout_prob, self.training)


class EncoderLayer(nn.Module):
    """Post-LN block: ``x = LN(x + attn(x))``, ``x = LN(x + W2 gelu(W1 x + b1))`` on ``[T, hidden]``."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.qkv = nn.Linear(hidden, 3 * hidden)  # rows: query, key, value
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(hidden, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, unpadded: Unpadded, rows: Tensor | None = None) -> Tensor:
        """``[T, hidden] -> [T, hidden]``; with ``rows`` (int64 ``[P]`` unpadded token indices)
        ``-> [P, hidden]``: the outputs at those rows only (keys and values from every token)."""
        if rows is not None:
            return self._forward_rows(x, unpadded, rows)
        cfg = self.config
        tokens = x.shape[0]
        qkv = self.qkv(x).view(tokens, 3, cfg.num_attention_heads, cfg.head_dim)
        q, k, v = qkv.unbind(1)
        dropout_p, seed = self._attention_dropout()
        cu, max_seqlen = unpadded.attention_cu_seqlens, unpadded.max_seqlen
        attn = varlen_attention(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p, seed)
        attn = self.attn_out(attn.reshape(tokens, cfg.hidden_size))
        x = self.attn_norm(x + F.dropout(attn, cfg.hidden_dropout_prob, self.training))
        h = bias_gelu(F.linear(x, self.ffn_in.weight), self.ffn_in.bias, cfg.gelu_approximate)
        h = self.ffn_out(h)
        return self.ffn_norm(x + F.dropout(h, cfg.hidden_dropout_prob, self.training))

    def _forward_rows(self, x: Tensor, unpadded: Unpadded, rows: Tensor) -> Tensor:
        cfg = self.config
        hidden = cfg.hidden_size
        x_rows = x.index_select(0, rows)
        q = F.linear(x_rows, self.qkv.weight[:hidden], self.qkv.bias[:hidden])
        kv = F.linear(x, self.qkv.weight[hidden:], self.qkv.bias[hidden:])
        dropout_p, seed = self._attention_dropout()
        attn = rows_attention(q, kv, unpadded, rows, cfg.num_attention_heads, dropout_p, seed)
        attn = self.attn_out(attn)
        x = self.attn_norm(x_rows + F.dropout(attn, cfg.hidden_dropout_prob, self.training))
        h = bias_gelu(F.linear(x, self.ffn_in.weight), self.ffn_in.bias, cfg.gelu_approximate)
        h = self.ffn_out(h)
        return self.ffn_norm(x + F.dropout(h, cfg.hidden_dropout_prob, self.training))

    def _attention_dropout(self) -> tuple[float, int]:
        """(dropout_p, seed) of this forward's attention: a seed from torch's generator when training."""
        if self.training and self.config.attention_probs_dropout_prob > 0:
            return self.config.attention_probs_dropout_prob, int(torch.randint(0, _SEED_HIGH, (1,)))
        return 0.0, 0


def rows_attention(
    q: Tensor, kv: Tensor, unpadded: Unpadded, rows: Tensor, heads: int, dropout_p: float, seed: int
) -> Tensor:
    """Attention of the queries ``q [P, hidden]`` at unpadded ``rows [P]`` over the keys and values
    ``kv [T, 2 * hidden]`` (every row the layers run on) of their own sequences -> ``[P, hidden]``.

    One ``varlen_attention`` call with a query layout of its own: the queries sorted by row (so
    grouped by sequence, as ``cu_seqlens_q`` needs), the keys in the layers' layout. Each query passes
    its position in its sequence as its dropout row, so it draws the attention dropout mask it has in
    the full layer with the same ``seed`` (offset 0 in both).
    """
    num_rows, hidden = q.shape
    if num_rows == 0:
        return q
    head_dim = hidden // heads
    cu_k = unpadded.attention_cu_seqlens
    order = torch.argsort(rows, stable=True)
    sorted_rows = rows.index_select(0, order)
    seq = torch.searchsorted(cu_k[1:].to(rows.dtype), sorted_rows, right=True)
    counts = torch.bincount(seq, minlength=cu_k.numel() - 1)
    cu_q = F.pad(torch.cumsum(counts, dim=0, dtype=torch.int32), (1, 0))
    positions = (sorted_rows - cu_k.index_select(0, seq)).to(torch.int32)
    k, v = kv.view(kv.shape[0], 2, heads, head_dim).unbind(1)
    out = varlen_attention(
        q.index_select(0, order).view(num_rows, heads, head_dim), k, v, cu_q, cu_k, int(counts.max()),
        unpadded.max_seqlen, dropout_p, seed, q_positions=positions,
    )  # fmt: skip
    return out.reshape(num_rows, hidden).index_select(0, torch.argsort(order))


class Encoder(nn.Module):
    """Embeddings, optional projection to ``hidden_size``, the (possibly shared) layers and an
    optional pooler (``tanh(W h_0 + b)`` on the first token, BERT/RoBERTa/ALBERT).

    ``forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None)`` takes
    int64 ``[B, S]`` tensors (``attention_mask`` any int/bool dtype, 1 = real token; default all
    real) and returns an ``EncoderOutput``. Default ``position_ids``: ``0..S-1`` per row, or for
    RoBERTa (``position_offset > 0``) HF's ``cumsum(input_ids != pad) + pad`` at real tokens.

    ``token_multiple`` (default 1: off): the rows the layers run on are rounded up to a multiple of
    it with pad-token rows in sequences of their own (``Unpadded.dummy_tokens``), which no output
    reads. Real tokens' states are unchanged up to float rounding (GEMMs of another row count may
    sum in another order); the point is fewer distinct tensor sizes per run, which keeps glibc's
    heap from fragmenting (``lub_fast.train`` sets it while training).
    """

    def __init__(self, config: EncoderConfig, add_pooler: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.embedding_projection = (
            nn.Linear(config.embedding_size, config.hidden_size) if config.has_embedding_projection else None
        )
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_unique_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooler else None
        self._schedule = config.layer_schedule()
        self.token_multiple = 1
        self.apply(functools.partial(init_weights, std=config.initializer_range))

    def default_position_ids(self, input_ids: Tensor) -> Tensor:
        cfg = self.config
        if cfg.position_offset == 0:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        not_pad = input_ids.ne(cfg.pad_token_id).long()
        return torch.cumsum(not_pad, dim=1) * not_pad + (cfg.position_offset - 1)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        output_positions: Tensor | None = None,
    ) -> EncoderOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"Encoder: input_ids must be [B, S]; got {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        unpadded = Unpadded.from_mask(attention_mask, self.token_multiple)
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids)
        ids = unpadded.unpad(input_ids)
        positions = unpadded.unpad(position_ids.expand_as(input_ids))
        types = torch.zeros_like(ids) if token_type_ids is None else unpadded.unpad(token_type_ids)
        if unpadded.dummy_tokens:
            dummy = (0, unpadded.dummy_tokens)
            ids = F.pad(ids, dummy, value=self.config.pad_token_id)
            positions, types = F.pad(positions, dummy), F.pad(types, dummy)
        x = self.embeddings(ids, types, positions)
        if self.embedding_projection is not None:
            x = self.embedding_projection(x)
        if output_positions is None:
            for index in self._schedule:
                x = self.layers[index](x, unpadded)
            x = x[: unpadded.num_tokens]
            pooled = None
            if self.pooler is not None:
                pooled = torch.tanh(self.pooler(unpadded.first_tokens(x)))
            return EncoderOutput(hidden=x, unpadded=unpadded, pooler_output=pooled)
        return self._forward_sparse_last(x, unpadded, output_positions)

    def _forward_sparse_last(self, x: Tensor, unpadded: Unpadded, output_positions: Tensor) -> EncoderOutput:
        """All layers but the last on every token; the last at ``output_positions`` (and, with a
        pooler, at each row's first position) only."""
        rows = unpadded.rows(output_positions)
        num_rows = rows.numel()
        if self.pooler is not None:
            starts = torch.arange(unpadded.batch_size, device=rows.device) * unpadded.seq_len
            rows = torch.cat([rows, unpadded.token_rank[starts].clamp(min=0)])
        for index in self._schedule[:-1]:
            x = self.layers[index](x, unpadded)
        x = self.layers[self._schedule[-1]](x, unpadded, rows)
        pooled = None
        if self.pooler is not None:
            first = x[num_rows:] * unpadded.is_real[starts][:, None].to(x.dtype)
            pooled = torch.tanh(self.pooler(first))
        return EncoderOutput(hidden=x[:num_rows], unpadded=unpadded, pooler_output=pooled, positions=output_positions)


def init_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation (HF ``_init_weights``): N(0, std) weights, zero biases, unit LayerNorm,
    zero embedding row at ``padding_idx``."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
