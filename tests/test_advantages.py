import pytest
import torch

from cispo.algo.advantages import group_advantages


def test_group_normalisation_by_hand_population_std():
    # rewards 1, 0, 0, 1: mean 0.5, population std 0.5 -> advantages +-1 (the unbiased std would give +-0.866)
    out = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    torch.testing.assert_close(out.adv, torch.tensor([[1.0, -1.0, -1.0, 1.0]]))
    assert out.zero_variance.tolist() == [False]


def test_equal_rewards_and_group_of_one_give_zero_not_nan():
    out = group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.isfinite(out.adv).all()
    assert out.adv[:2].abs().sum() == 0
    assert out.zero_variance.tolist() == [True, True, False]
    no_eps = group_advantages(torch.tensor([[2.0, 2.0]]), eps=0.0)  # 0 / 0 must not leak out as NaN
    assert no_eps.adv.tolist() == [[0.0, 0.0]]
    single = group_advantages(torch.tensor([[3.0], [5.0]]))
    assert single.adv.abs().sum() == 0 and single.zero_variance.all()


def test_no_std_norm_is_mean_centring():
    out = group_advantages(torch.tensor([[2.0, 0.0, 1.0]]), std_norm=False)
    torch.testing.assert_close(out.adv, torch.tensor([[1.0, -1.0, 0.0]]))


def test_batch_level_std():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [4.0, 0.0]])
    out = group_advantages(rewards, level="batch", eps=0.0)
    centred = rewards - rewards.mean(1, keepdim=True)
    expected = centred / rewards.std(correction=0)  # one std for the whole batch (ScaleRL)
    torch.testing.assert_close(out.adv, expected)
    with pytest.raises(ValueError, match="adv_norm"):
        group_advantages(rewards, level="prompt")
