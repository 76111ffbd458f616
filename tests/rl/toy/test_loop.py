"""The reference GRPO loop: advantage, clipping and masking against hand computations, and a
short training run that must learn."""

from __future__ import annotations

import math

import pytest
import torch

from entrokit import InputError
from entrokit.rl.toy import (
    Batch,
    Countdown,
    DigitSum,
    GRUPolicy,
    KeyDoorGrid,
    evaluate,
    group_advantages,
    grpo_objective,
    pass_at_k,
    sample,
    token_logprobs,
    train_grpo,
)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(r, eps=0.0)
    # group 1: mean 1/2, unbiased std sqrt(4 * 1/4 / 3) = 1/sqrt(3)  ->  +-sqrt(3)/2
    s = math.sqrt(3) / 2
    assert torch.allclose(adv[0], torch.tensor([s, -s, -s, s]))
    # group 3: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2
    assert torch.allclose(adv[2], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    # a group with equal rewards carries no signal
    assert torch.equal(group_advantages(r)[1], torch.zeros(4))
    with pytest.raises(InputError, match="group >= 2"):
        group_advantages(torch.ones(3, 1))


def _batch(logp, old_logp, adv, mask):
    z = torch.zeros(logp.shape + (2,))
    return Batch(z, logp, old_logp, adv, mask, torch.zeros_like(logp), torch.zeros(logp.shape[0], dtype=torch.long),
                 torch.zeros(logp.shape[0]), 0, 0)


def test_grpo_objective_clipping_and_masking_by_hand():
    # two responses of three tokens; the last token of response 0 is masked out
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.1, 3.0], [0.5, 0.9, 1.0]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, stats = grpo_objective(clip=0.2)(_batch(logp, old, adv, mask))
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=+1: r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped); r=1.1 -> -1.1; (masked r=3.0 ignored)
    #   A=-1: r=0.5 -> max(0.5, 0.8) = 0.8 (clipped); r=0.9 -> 0.9; r=1.0 -> 1.0
    hand = (-1.2 - 1.1 + 0.8 + 0.9 + 1.0) / 5
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    loss.backward()
    # d/dlogp of -A r = -A r on unclipped valid tokens, 0 on clipped or masked ones
    g = logp.grad * 5
    expected = torch.tensor([[0.0, -1.1, 0.0], [0.0, 0.9, 1.0]])
    assert torch.allclose(g, expected, atol=1e-6)


def test_token_logprobs_and_countdown_mask_in_the_loop():
    logits = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(lp, torch.log(torch.tensor([[0.75, 0.5]])))
    task = Countdown(num_prompts=3, seed=0)
    pol = GRUPolicy(task.num_prompts, task.vocab_size + 1, task.vocab_size, 16, seed=0)
    ro = sample(pol, task, torch.arange(3).repeat(20), generator=torch.Generator().manual_seed(0))
    # the mask is exactly "at or before the first end token"
    for row, m in zip(ro.actions.tolist(), ro.mask.tolist()):
        first_end = row.index(task.end) if task.end in row else len(row)
        assert m == [t <= first_end for t in range(len(row))]


def test_sample_is_reproducible_and_teacher_forcing_matches_sampling():
    task = DigitSum(3)
    pol = GRUPolicy(task.num_prompts, task.vocab_size + 1, task.vocab_size, 32, seed=1)
    p = torch.arange(task.num_prompts)
    a = sample(pol, task, p, generator=torch.Generator().manual_seed(5))
    b = sample(pol, task, p, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.actions, b.actions)
    assert torch.equal(a.rewards, task.reward(p, a.actions))
    assert torch.equal(a.inputs[:, 1:], a.actions[:, :-1]) and (a.inputs[:, 0] == task.bos).all()


def test_pass_at_k_against_the_binomial_formula():
    n, k = 10, 3
    c = torch.arange(n + 1)
    ref = torch.tensor([1 - math.comb(n - ci, k) / math.comb(n, k) for ci in range(n + 1)], dtype=torch.float64)
    assert torch.allclose(pass_at_k(n, c, k), ref)
    assert torch.allclose(pass_at_k(n, c, 1), c.double() / n)
    with pytest.raises(InputError, match="k <= n"):
        pass_at_k(4, c, 5)


def test_training_learns_digit_sum_and_loses_entropy():
    task = DigitSum(2)
    pol = GRUPolicy(task.num_prompts, task.vocab_size + 1, task.vocab_size, 32, seed=0)
    g = torch.Generator().manual_seed(0)
    before = evaluate(pol, task, samples=32, k=8, generator=g)
    hist = train_grpo(pol, task, steps=30, prompts_per_step=16, group_size=8, ppo_epochs=2, lr=1e-2, generator=g)
    after = evaluate(pol, task, samples=32, k=8, generator=g)
    assert after["pass@1"] > before["pass@1"] + 0.2
    assert hist["entropy"][-1] < hist["entropy"][0]
    assert 0 < after["distinct"] <= int(task.num_solutions.sum())
    assert after["coverage"] == pytest.approx(after["distinct"] / 100)


def test_key_door_rollout_masks_finished_turns():
    env = KeyDoorGrid(size=3, max_turns=10, num_layouts=2, seed=0)
    pol = GRUPolicy(env.num_prompts, env.num_observations, env.vocab_size, 16, seed=0)
    ro = sample(pol, env, torch.tensor([0, 1] * 64), generator=torch.Generator().manual_seed(0))
    assert ro.actions.shape == (128, 10)
    # live turns form a prefix; an episode is rewarded iff it ended before the time-out
    lengths = ro.mask.sum(1)
    assert torch.equal(ro.mask, torch.arange(10)[None] < lengths[:, None])
    ended = ro.rewards > 0
    assert (lengths[~ended] == 10).all()
    g = torch.Generator().manual_seed(1)
    m = evaluate(pol, env, samples=16, k=4, generator=g)
    assert 0 <= m["pass@1"] <= 1
    # coverage on the gridworld: the share of layouts solved at least once in the 16 episodes,
    # recomputed from the same episodes (same generator state)
    g.manual_seed(1)
    ro = sample(pol, env, torch.arange(env.num_prompts).repeat_interleave(16), generator=g)
    solved = (ro.rewards.view(env.num_prompts, 16) > 0).any(1)
    assert m["coverage"] == pytest.approx(solved.double().mean().item())


def test_evaluate_noise_mass_by_hand():
    task = DigitSum(2, noise_tokens=30)
    pol = GRUPolicy(task.num_prompts, task.vocab_size + 1, task.vocab_size, 8, seed=0)
    with torch.no_grad():  # a policy that ignores its input: uniform logits, then noise at log(1/3)
        for p in pol.head.parameters():
            p.zero_()
        pol.head.bias[10:] = math.log(1 / 3)
    m = evaluate(pol, task, samples=8, k=2, generator=torch.Generator().manual_seed(0))
    # 30 noise tokens of weight 1/3 against 10 digits of weight 1: noise mass 10 / 20
    assert m["noise_mass"] == pytest.approx(0.5, abs=1e-6)
    assert m["entropy"] == pytest.approx(-(10 * 0.05 * math.log(0.05) + 30 * (0.5 / 30) * math.log(0.5 / 30)), abs=1e-5)


def test_a_controller_steers_the_bonus_inside_the_loop():
    from entrokit.rl import SignController, clipped_surrogate, entropy_bonus

    task = DigitSum(2)
    pol = GRUPolicy(task.num_prompts, task.vocab_size + 1, task.vocab_size, 16, seed=0)
    # target above log(10) = 2.30, the largest entropy a digit can have: the coefficient rises every step
    ctrl = SignController(target=3.0, delta=0.01, coef_max=1.0)
    seen = []

    def objective(b):
        pg, s = clipped_surrogate(b.logp, b.old_logp, b.advantages, b.mask)
        eb, e = entropy_bonus(b.entropy, b.mask, ctrl.value)
        if b.epoch == 0:
            seen.append(float(e["entropy"]))
            ctrl.step(e["entropy"])
        return pg + eb, s

    hist = train_grpo(pol, task, objective, steps=3, prompts_per_step=4, group_size=4, ppo_epochs=2,
                      generator=torch.Generator().manual_seed(0))
    assert ctrl.value == pytest.approx(0.03)
    assert seen == pytest.approx(hist["entropy"])  # the loop logs the statistic the controller reads


def test_training_learns_the_key_door_grid():
    # sparse terminal reward: the random policy never opens a door in 64 episodes per layout
    env = KeyDoorGrid(size=3, max_turns=12, num_layouts=2, seed=0)
    pol = GRUPolicy(env.num_prompts, env.num_observations, env.vocab_size, 32, seed=0)
    g = torch.Generator().manual_seed(0)
    before = evaluate(pol, env, samples=64, k=8, generator=g)
    hist = train_grpo(pol, env, steps=30, prompts_per_step=4, group_size=16, ppo_epochs=2, lr=1e-2, generator=g)
    after = evaluate(pol, env, samples=64, k=8, generator=g)
    assert len(hist["reward"]) == 30
    assert after["pass@1"] > before["pass@1"] + 0.3
    assert after["entropy"] < before["entropy"]


def test_bonus_objective_is_the_surrogate_minus_the_entropy_term():
    from entrokit.rl import clipped_surrogate, entropy_bonus
    from entrokit.rl.toy import bonus_objective, grpo_objective
    from entrokit.rl.toy.loop import Batch

    g = torch.Generator().manual_seed(5)
    mask = torch.rand(4, 6, generator=g) > 0.2
    logp = -torch.rand(4, 6, generator=g)
    b = Batch(logits=torch.zeros(4, 6, 3), logp=logp, old_logp=logp + 0.1 * torch.randn(4, 6, generator=g),
              advantages=torch.randn(4, generator=g), mask=mask, entropy=torch.rand(4, 6, generator=g),
              prompt_ids=torch.arange(4), rewards=torch.zeros(4), step=0, epoch=0)
    loss, _ = bonus_objective(0.05)(b)
    pg, _ = grpo_objective()(b)
    h = (b.entropy * mask).sum() / mask.sum()  # token-mean entropy, by hand
    torch.testing.assert_close(loss, pg - 0.05 * h)
    eb, _ = entropy_bonus(b.entropy, b.mask, 0.05)
    torch.testing.assert_close(loss, clipped_surrogate(b.logp, b.old_logp, b.advantages, b.mask)[0] + eb)
