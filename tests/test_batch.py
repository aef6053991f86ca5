"""Packed micro-batches: positions, token budgets, mini-batches of whole groups, and packed logprobs equal to
a separate forward of each sample."""

import torch

from cispo.algo.batch import Sample, micro_batches, split_groups
from cispo.config import TinyModelConfig
from cispo.model.policy import micro_batch_logprobs
from cispo.model.tiny_model import make_tiny_model


def _sample(prompt, response, group, loss_len=None):
    n = len(response) if loss_len is None else loss_len
    return Sample.leading(prompt, response, n, torch.zeros(n), 1.0, group)


def test_logit_positions_and_targets_by_hand():
    samples = [_sample([1, 2], [3, 4, 5], 0), _sample([6], [7, 8], 1, loss_len=1)]
    (mb,) = micro_batches(samples, [0, 1], 100, "token_batch")
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    # token 3 is predicted at position 1 (the last prompt token), ...; sample 1 keeps only its first token
    assert mb.logit_pos.tolist() == [1, 2, 3, 5]
    assert mb.targets.tolist() == [3, 4, 5, 7]
    assert mb.coef.tolist() == [0.25] * 4


def test_token_budget_and_groups():
    samples = [_sample([1] * 3, [2] * 4, g) for g in (0, 0, 1, 1, 2)]
    assert [mb.sample_ids for mb in micro_batches(samples, [0, 1, 2, 3, 4], 14, None)] == [[0, 1], [2, 3], [4]]
    assert [mb.sample_ids for mb in micro_batches(samples, [0, 1], 3, None)] == [[0], [1]]  # too long: alone
    assert split_groups(samples, 2) == [[0, 1, 4], [2, 3]]
    assert split_groups(samples, 10) == [[0, 1], [2, 3], [4]]  # never more parts than groups


def test_packed_logprobs_equal_separate_forwards(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(TinyModelConfig(), tmp_path))
    g = torch.Generator().manual_seed(0)
    samples = [
        _sample(torch.randint(3, 300, (5 + k,), generator=g).tolist(), torch.randint(3, 300, (2 + 2 * k,), generator=g).tolist(), k)
        for k in range(4)
    ]
    mbs = micro_batches(samples, [0, 1, 2, 3], 30, None)
    assert any(len(mb.sample_ids) > 1 for mb in mbs)  # something is really packed
    with torch.no_grad():
        packed = torch.cat([micro_batch_logprobs(model, mb, temperature=1.0, fp32_head=False).logp for mb in mbs])
        separate = []
        for s in samples:
            logits = model(torch.tensor([s.prompt_ids + s.response_ids])).logits[0].log_softmax(-1)
            start = len(s.prompt_ids) - 1
            separate.append(logits[start : start + len(s.response_ids)].gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0])
    torch.testing.assert_close(packed, torch.cat(separate), atol=1e-5, rtol=0)
