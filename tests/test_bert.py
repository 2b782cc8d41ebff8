"""BERT/ELECTRA models: forward parity with transformers' BertForPreTraining, ELECTRA's shared embeddings."""

from __future__ import annotations

import pytest
import torch

from lmforge.models.bert import Bert, BertConfig, Electra

transformers = pytest.importorskip("transformers")


def _hf_state(ours: Bert) -> dict[str, torch.Tensor]:
    """Our weights under BertForPreTraining's names (q/k/v split from our fused rows [q; k; v])."""
    sd, out = ours.state_dict(), {}
    out["bert.embeddings.word_embeddings.weight"] = sd["embed.tok_emb.weight"]
    out["bert.embeddings.position_embeddings.weight"] = sd["embed.pos_emb.weight"]
    out["bert.embeddings.token_type_embeddings.weight"] = sd["embed.seg_emb.weight"]
    out["bert.embeddings.LayerNorm.weight"] = sd["embed.norm.weight"]
    out["bert.embeddings.LayerNorm.bias"] = sd["embed.norm.bias"]
    for i in range(ours.cfg.n_layer):
        p, h = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        for part in ("weight", "bias"):
            q, k, v = sd[p + f"attn.qkv.{part}"].chunk(3, dim=0)
            out[h + f"attention.self.query.{part}"] = q
            out[h + f"attention.self.key.{part}"] = k
            out[h + f"attention.self.value.{part}"] = v
            out[h + f"attention.output.dense.{part}"] = sd[p + f"attn.proj.{part}"]
            out[h + f"attention.output.LayerNorm.{part}"] = sd[p + f"norm1.{part}"]
            out[h + f"intermediate.dense.{part}"] = sd[p + f"fc.{part}"]
            out[h + f"output.dense.{part}"] = sd[p + f"proj.{part}"]
            out[h + f"output.LayerNorm.{part}"] = sd[p + f"norm2.{part}"]
        out["bert.pooler.dense.weight"], out["bert.pooler.dense.bias"] = sd["pooler.weight"], sd["pooler.bias"]
    out["cls.predictions.transform.dense.weight"] = sd["mlm_head.dense.weight"]
    out["cls.predictions.transform.dense.bias"] = sd["mlm_head.dense.bias"]
    out["cls.predictions.transform.LayerNorm.weight"] = sd["mlm_head.norm.weight"]
    out["cls.predictions.transform.LayerNorm.bias"] = sd["mlm_head.norm.bias"]
    out["cls.predictions.bias"] = sd["mlm_head.bias"]
    out["cls.predictions.decoder.weight"] = sd["embed.tok_emb.weight"]
    out["cls.predictions.decoder.bias"] = sd["mlm_head.bias"]
    out["cls.seq_relationship.weight"], out["cls.seq_relationship.bias"] = sd["nsp_head.weight"], sd["nsp_head.bias"]
    return out


def test_bert_forward_matches_transformers_bert_for_pretraining():
    cfg = BertConfig(vocab_size=97, max_seq_len=24, n_layer=2, n_head=4, d_model=32, d_ff=64, dropout=0.0)
    torch.manual_seed(0)
    ours = Bert(cfg)
    ours.init_weights()
    with torch.no_grad():  # non-trivial biases and norms, so a swapped or missing parameter shows
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_cfg = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=24, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )  # fmt: skip
    hf = transformers.BertForPreTraining(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(_hf_state(ours), strict=False)
    assert not unexpected and all("position_ids" in k or "token_type_ids" in k for k in missing)
    ours.eval()

    idx = torch.randint(0, 97, (3, 20))
    segments = (torch.arange(20) >= 9).long().expand(3, 20)
    pad = torch.ones(3, 20, dtype=torch.bool)
    pad[1, 15:] = False  # one padded sequence: masked keys must not change the real positions
    with torch.no_grad():
        hidden = ours(idx, segments, pad)
        mlm, nsp = ours.mlm_logits(hidden), ours.nsp_logits(hidden)
        ref = hf(input_ids=idx, token_type_ids=segments, attention_mask=pad.long())
    # tolerance: float32 with a different summation order (fused qkv, SDPA vs eager softmax); observed 4e-7
    torch.testing.assert_close(mlm[pad], ref.prediction_logits[pad], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(nsp, ref.seq_relationship_logits, atol=5e-5, rtol=1e-4)


def test_electra_shares_embeddings_and_scales_the_generator():
    cfg = BertConfig(family="electra", vocab_size=50, max_seq_len=16, n_layer=2, n_head=4, d_model=32,
                     dropout=0.0, generator_ratio=0.5)  # fmt: skip
    torch.manual_seed(0)
    m = Electra(cfg)
    m.init_weights()
    assert cfg.generator.d_model == 16 and cfg.generator.n_head == 2 and cfg.generator.ff_dim == 64
    names = [n for n, _ in m.named_parameters()]
    assert sum("tok_emb" in n for n in names) == 1  # one token table for both networks
    idx = torch.randint(0, 50, (2, 10))
    gen_logits = m.mlm_logits(m.generator_hidden(idx))  # (B, T, V) through the shared output matrix
    disc = m(idx)
    assert gen_logits.shape == (2, 10, 50) and disc.shape == (2, 10)
    (gen_logits.sum() + disc.sum()).backward()
    assert m.embed.tok_emb.weight.grad is not None and m.generator.in_proj.weight.grad is not None
    # generator and discriminator both read the shared embedding: each alone gives it a gradient
    m.zero_grad()
    m(idx).sum().backward()
    assert m.embed.tok_emb.weight.grad.abs().sum() > 0 and m.gen_head.dense.weight.grad is None


@pytest.mark.parametrize("family", ["bert", "electra"])
def test_flops_per_token_counts_the_mlm_head_on_masked_tokens_only(family):
    """The FLOPs of one pretraining step (forward + backward), counted by torch's FlopCounterMode, equal
    `flops_per_token(T, predicted=share masked)` (dropout > 0 runs SDPA's math path, whose matmuls the counter
    sees). Counting the MLM head's vocabulary projection for every token doubled the figure here and overstated
    bert-base's MFU by 23%."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cfg = BertConfig(
        family=family, vocab_size=2000, max_seq_len=64, n_layer=2, n_head=4, d_model=64, d_ff=256, dropout=0.1
    )
    model = (Bert if family == "bert" else Electra)(cfg)
    model.init_weights()
    idx, select = torch.randint(0, 2000, (8, 64)), torch.rand(8, 64) < 0.15
    with FlopCounterMode(display=False) as counter:
        out = model(idx, select=select, **({"pairs": True} if family == "bert" else {}))
        (out[0].sum() + out[-1].sum()).backward()
    measured = counter.get_total_flops() / idx.numel()
    share = select.float().mean().item()
    assert model.flops_per_token(64, predicted=share) == pytest.approx(measured, rel=0.01)
