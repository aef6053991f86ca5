"""Packed attention with shared prompts (cispo/model/attention.py): the rows read from position ids, attention equal to
each sequence attending to itself alone, and the tiny model's logprobs and gradients the same whether a group's
prompt is packed once or with every response."""

from __future__ import annotations

import pytest
import torch

from cispo.model import attention
from cispo.model.attention import packed_attention, rows_of
from cispo.algo.batch import Sample, micro_batches
from cispo.config import ModelConfig, TinyModelConfig
from cispo.model.policy import load_policy, micro_batch_logprobs, shares_prompts
from cispo.model.tiny_model import make_tiny_model


def test_rows_from_position_ids_by_hand():
    # a root of 5 (prompt 3 + response 2), two branches of its 3-token prompt, a lone root, a root of 1
    pos = [0, 1, 2, 3, 4, 3, 4, 5, 3, 0, 1, 0]
    assert rows_of(pos) == [(range(0, 5), 5), ([0, 1, 2, 5, 6, 7], 3), ([0, 1, 2, 8], 1), (range(9, 11), 2),
                            (range(11, 12), 1)]
    with pytest.raises(ValueError, match="beyond the 2 tokens"):
        rows_of([0, 1, 5, 6])  # a branch needs its root's first 5 tokens, the root has 2


def reference(q, k, v, pos):
    """Each sequence whole (its prompt's tokens from the root), one SDPA call each: [1, S, H, D]."""
    out = torch.zeros_like(q)
    for keys, own in rows_of(pos):
        idx = torch.tensor(list(keys))
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx],
                                                             is_causal=True, enable_gqa=True)
        out[:, :, idx[len(idx) - own:]] = o[:, :, len(idx) - own:]
    return out.transpose(1, 2)


@pytest.mark.parametrize("alone", [2048, 8])  # 8: the longer rows run alone, on views
def test_attention_equals_each_sequence_alone(monkeypatch, alone):
    monkeypatch.setattr(attention, "ALONE_TOKENS", alone)
    g = torch.Generator().manual_seed(0)
    pos = []
    for prompt, responses in ((6, [4, 3, 5]), (7, [0]), (4, [8, 1, 30]), (2, [2])):  # a root's response may be empty
        pos += range(prompt + responses[0])
        for n in responses[1:]:
            pos += range(prompt, prompt + n)
    S = len(pos)
    q = torch.randn(1, 4, S, 16, generator=g, requires_grad=True)  # GQA: 4 query heads, 2 key/value heads
    k, v = (torch.randn(1, 2, S, 16, generator=g, requires_grad=True) for _ in range(2))
    out, _ = packed_attention(None, q, k, v, None, position_ids=torch.tensor([pos]))
    ref = reference(q, k, v, pos)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    grad = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad((out * grad).sum(), [q, k, v]), torch.autograd.grad((ref * grad).sum(), [q, k, v])):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)


def test_buckets_batch_similar_lengths_and_keep_long_rows_alone(monkeypatch):
    monkeypatch.setattr(attention, "ALONE_TOKENS", 100)
    rows = [(range(lo, hi), hi - lo) for lo, hi in ((0, 10), (10, 20), (20, 31), (31, 231), (231, 251))]
    got = attention.buckets(rows, torch.device("cpu"))
    # 10, 10, 11 pad to 11 (3 x 121 <= 1.5 x 321); 20 would make 4 x 400 > 1.5 x 721; 200 runs alone as a view
    assert [None if b.keys is None else tuple(b.keys.shape) for b in got] == [(3, 11), None, (1, 20)]
    assert got[1].span == range(31, 231)
    assert sorted(torch.cat([b.out_dst for b in got]).tolist()) == list(range(251))  # every token written once


def _groups(vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(3)
    samples = []
    for group in range(4):
        prompt = torch.randint(3, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(4):
            n = int(torch.randint(1, 20, (1,), generator=g))
            response = torch.randint(3, vocab, (n,), generator=g).tolist()
            samples.append(Sample.leading(prompt, response, n, torch.zeros(n), float(torch.randn(1, generator=g)), group))
    return samples


def test_shared_prompts_give_the_same_logprobs_and_gradients(tmp_path):
    model, _ = load_policy(str(make_tiny_model(TinyModelConfig(), tmp_path)), ModelConfig())
    assert shares_prompts(model)
    samples = _groups(model.config.vocab_size)
    idx = list(range(len(samples)))

    def run(share: bool):
        model.zero_grad()
        mbs = micro_batches(samples, idx, 120, "token_group", share_prompts=share)
        logps, tokens = [], 0
        for mb in mbs:
            tl = micro_batch_logprobs(model, mb, temperature=1.0, fp32_head=False)
            (tl.logp * mb.adv * mb.coef).sum().backward()
            logps.append(tl.logp.detach())
            tokens += mb.num_tokens
        return torch.cat(logps), [p.grad.clone() for p in model.parameters()], tokens, len(mbs)

    whole, shared = run(False), run(True)
    prompts = sum(len(s.prompt_ids) for s in samples)
    assert shared[2] < whole[2] == prompts + sum(len(s.response_ids) for s in samples)  # fewer tokens computed
    assert shared[3] < whole[3]  # so more samples fit a micro-batch
    torch.testing.assert_close(shared[0], whole[0], atol=1e-5, rtol=0)
    for a, b in zip(shared[1], whole[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_only_the_packed_attention_shares_prompts(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(TinyModelConfig(), tmp_path)
    assert not shares_prompts(AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa"))
    minimax, _ = load_policy(str(make_tiny_model(TinyModelConfig(arch="minimax", num_layers=2), tmp_path)),
                             ModelConfig())
    assert not shares_prompts(minimax)  # recurrent layers and MoE routing need one sequence per restart
