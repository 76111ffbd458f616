"""Toy tasks: verifiers against brute force and hand-worked answers."""

from __future__ import annotations

import itertools

import pytest
import torch

from entrokit import InputError
from entrokit.rl.toy import Countdown, DigitSum, KeyDoorGrid, MixedArithmetic, Permutation

L = torch.long


def test_digit_sum_counts_and_reward():
    task = DigitSum(4)
    assert task.num_prompts == 37 and task.vocab_size == 10 and task.bos == 10
    assert int(task.num_solutions.sum()) == 10**4
    assert int(task.num_solutions[18]) == 670 and int(task.num_solutions[0]) == 1  # anchors note, section 4
    brute = torch.zeros(37, dtype=L)
    for digits in itertools.product(range(10), repeat=4):
        brute[sum(digits)] += 1
    assert torch.equal(task.num_solutions, brute)
    r = task.reward(torch.tensor([10, 10, 0, 36]), torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5], [0, 0, 0, 0], [9, 9, 9, 9]]))
    assert r.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_digit_sum_noise_tokens_are_never_correct():
    task = DigitSum(2, noise_tokens=1000)
    assert task.vocab_size == 1010
    # 10 + 0 = 10 would be the sum of the raw ids; a noise token is still wrong
    assert task.reward(torch.tensor([10, 1]), torch.tensor([[10, 0], [1, 0]])).tolist() == [0.0, 1.0]


def test_countdown_hand_expressions_and_mask():
    task = Countdown(num_prompts=4, n_numbers=3, seed=3)
    nums, t = task.numbers[0].tolist(), int(task.targets[0])
    plus, minus, times, end = 3, 4, 5, 6
    found = [seq for seq in itertools.product(range(7), repeat=5) if task._evaluate(list(seq), nums) == t]
    assert found, "every prompt is built from a valid expression"
    r = task.reward(torch.zeros(len(found), dtype=L), torch.tensor(found))
    assert r.eq(1).all()
    # a hand case: numbers (a, b, c): "0 1 + end x" is a + b; reuse of a number is refused
    task.numbers[1] = torch.tensor([2, 3, 4])
    task.targets[1] = 5
    acts = torch.tensor([[0, 1, plus, end, times], [0, 0, plus, end, end], [0, 1, minus, end, end], [0, 1, end, end, end]])
    assert task.reward(torch.ones(4, dtype=L), acts).tolist() == [1.0, 0.0, 0.0, 0.0]
    task.targets[1] = -1
    assert task.reward(torch.ones(1, dtype=L), acts[2:3]).tolist() == [1.0]
    assert task.valid_mask(acts[:1]).tolist() == [[True, True, True, True, False]]


def test_countdown_num_solutions_counts_distinct_prefixes():
    task = Countdown(num_prompts=2, n_numbers=2, seed=1)  # length 3, vocab 6
    for i in range(2):
        nums, t = task.numbers[i].tolist(), int(task.targets[i])
        keys = {task._canonical(list(s)) for s in itertools.product(range(6), repeat=3)
                if task._evaluate(list(s), nums) == t}
        assert int(task.num_solutions[i]) == len(keys) >= 1


def test_permutation_against_brute_force():
    task = Permutation(num_prompts=6, n_items=5, n_constraints=2, seed=0)
    perms = list(itertools.permutations(range(5)))
    for i in range(6):
        cons = task.constraints[i].tolist()
        ok = [all(p.index(a) < p.index(b) for a, b in cons) for p in perms]
        r = task.reward(torch.full((len(perms),), i, dtype=L), torch.tensor(perms))
        assert r.bool().tolist() == ok
        assert int(task.num_solutions[i]) == sum(ok)
        assert sum(ok) in (20, 30, 40)  # two precedences: a chain (1/6 of orders), disjoint (1/4), a fork (1/3)
    # not a permutation: refused even if the constraints hold
    assert task.reward(torch.tensor([0]), torch.tensor([[0, 0, 0, 0, 0]])).tolist() == [0.0]


def test_mixed_arithmetic_pass_rates():
    task = MixedArithmetic(num_prompts=10, moduli=(2, 50), seed=0)
    grid = torch.tensor([[x // 10, x % 10] for x in range(100)])
    for i in range(10):
        r = task.reward(torch.full((100,), i, dtype=L), grid)
        assert int(r.sum()) == int(task.num_solutions[i])
        assert abs(float(task.pass_rate_at_init[i]) - 1 / int(task.moduli[i])) <= 0.01
        x = int(r.nonzero()[0])
        assert (x - int(task.a[i]) - int(task.b[i])) % int(task.moduli[i]) == 0


def test_key_door_scripted_episodes():
    env = KeyDoorGrid(size=3, max_turns=12, num_layouts=1, seed=0)
    env.key[0], env.door[0] = 2, 8  # key at (0, 2), door at (2, 2)
    up, down, left, right, pick, open_ = range(6)
    plan = [right, right, pick, down, down, open_]
    state, total = env.reset(torch.tensor([0, 0])), torch.zeros(2)
    wrong = [right, right, down, down, open_, open_]  # never picks the key
    for t in range(6):
        state, r = env.step(state, torch.tensor([plan[t], wrong[t]]))
        total += r
        assert (r[0] == 1) == (t == 5)  # sparse: only the final, successful turn is rewarded
    assert total.tolist() == [1.0, 0.0] and state["done"].tolist() == [True, False]
    state, r = env.step(state, torch.tensor([open_, up]))  # a finished episode stays done, no more reward
    assert r.tolist() == [0.0, 0.0]
    obs = env.observe(env.reset(torch.tensor([0])))
    assert obs.tolist() == [0]


def test_key_door_sample_prompts():
    env = KeyDoorGrid(size=4, max_turns=12, num_layouts=3, seed=0)
    ids = env.sample_prompts(600, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (600,) and ids.dtype == torch.long
    assert set(ids.tolist()) == {0, 1, 2}  # every layout is drawn, none outside
    assert torch.equal(ids, env.sample_prompts(600, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(InputError, match="n"):
        env.sample_prompts(0)


@pytest.mark.parametrize("make, match", [
    (lambda: DigitSum(0), "digits"),
    (lambda: DigitSum(4, noise_tokens=-1), "noise_tokens"),
    (lambda: Permutation(n_items=3, n_constraints=4), "n_constraints"),
    (lambda: MixedArithmetic(moduli=(0,)), "moduli"),
    (lambda: KeyDoorGrid(size=8, max_turns=3), "max_turns"),
])
def test_bad_task_options(make, match):
    with pytest.raises((InputError, TypeError), match=match):
        make()


def test_bad_batches():
    task = DigitSum(4)
    with pytest.raises(InputError, match="4 tokens"):
        task.reward(torch.tensor([1]), torch.tensor([[1, 2, 3]]))
    with pytest.raises(InputError, match=r"\[0, 10\)"):
        task.reward(torch.tensor([1]), torch.tensor([[1, 2, 3, 10]]))
    with pytest.raises(InputError, match=r"prompt_ids must lie"):
        task.reward(torch.tensor([37]), torch.tensor([[1, 2, 3, 4]]))
    with pytest.raises(TypeError, match="integer ids"):
        task.reward(torch.tensor([1.0]), torch.tensor([[1, 2, 3, 4]]))
