"""Samplers that learn from the server's feedback: UCB's regret, power-of-choice, curriculum."""

import numpy as np
import pytest
import torch
from torch import nn

import koinon as kn
from koinon.server import SAMPLERS, Feedback
from koinon.server.feedback import UCB, Curriculum, PowerOfChoice


def _regret(sampler, means: np.ndarray, horizon: int, seed: int = 0) -> np.ndarray:
    """Cumulative regret of `sampler` picking one arm a step on Bernoulli arms."""
    rng = np.random.default_rng(seed)
    arms = np.arange(len(means))
    regret = np.zeros(horizon)
    total = 0.0
    for t in range(horizon):
        (arm,) = sampler.sample(arms, np.ones(len(arms)), 1, rng)
        total += means.max() - means[arm]
        regret[t] = total
        sampler.reward(arm, float(rng.random() < means[arm]))
    return regret


def test_ucb_regret_on_a_bandit_grows_sublinearly():
    means = np.array([0.2, 0.35, 0.5, 0.55, 0.8])
    horizon = 4000
    ucb = np.mean([_regret(UCB(c=1.0), means, horizon, seed) for seed in range(3)], axis=0)
    # Linear regret would quadruple from 1000 to 4000 steps; UCB1's is logarithmic.
    assert ucb[-1] / ucb[999] < 2.0
    assert ucb[-1] < 0.1 * horizon * np.mean(means.max() - means)  # far below uniform's

    class Uniform(UCB):
        def sample(self, available, sizes, k, rng):
            return [int(rng.choice(available))]

    uniform = _regret(Uniform(), means, horizon)
    assert uniform[-1] / uniform[999] > 3.5  # the check can fail: a non-learning sampler's is linear


def test_ucb_over_sources_prefers_the_source_with_higher_loss():
    sources = [0] * 8 + [1] * 4  # clients 0-7 from source 0, 8-11 from source 1
    ucb = UCB(c=0.1, sources=sources)
    rng = np.random.default_rng(0)
    clients = np.arange(12)
    picks = []
    for r in range(30):
        cohort = ucb.sample(clients, np.ones(12), 3, rng)
        picks += cohort
        ucb.observe(Feedback(r, cohort, [2.0 if c >= 8 else 0.2 for c in cohort], [None] * 3))
    late = picks[30:]
    assert np.mean([c >= 8 for c in late]) > 0.8  # uniform would pick source 1 a third of the time
    assert len(set(picks)) > 3  # several clients of a source, not one


def test_power_of_choice_keeps_the_highest_losses_among_candidates():
    poc = PowerOfChoice(d=12)  # every client a candidate
    rng = np.random.default_rng(0)
    clients = np.arange(12)
    first = poc.sample(clients, np.full(12, 10), 4, rng)
    assert len(first) == 4
    poc.observe(Feedback(0, list(range(12)), [float(c) for c in range(12)], [None] * 12))
    assert poc.sample(clients, np.full(12, 10), 4, rng) == [8, 9, 10, 11]


def test_curriculum_draws_from_the_easiest_clients_first_and_widens():
    cur = Curriculum(start=0.25, pace=4)
    rng = np.random.default_rng(0)
    clients = np.arange(12)
    cur.sample(clients, np.ones(12), 3, rng)  # no feedback yet: uniform
    cur.observe(Feedback(0, list(range(12)), [float(c) for c in range(12)], [None] * 12))
    easy = cur.sample(clients, np.ones(12), 3, rng)  # fraction 0.25 + 0.75 / 4 -> 6 easiest
    assert max(easy) < 6
    # The pace counts server steps (observations), not sample() calls: sampling again and again
    # in one step (an attack's second draw, an asynchronous dispatch) keeps the 6 easiest.
    for _ in range(10):
        assert max(cur.sample(clients, np.ones(12), 3, rng)) < 6
    assert cur.rounds == 1
    cur.observe(Feedback(3, list(range(12)), [float(c) for c in range(12)], [None] * 12))
    assert cur.rounds == 4  # fraction 1: the whole population
    drawn = {c for _ in range(10) for c in cur.sample(clients, np.ones(12), 3, rng)}
    assert max(drawn) >= 6
    hard = Curriculum(start=0.25, pace=100, order="hard")
    hard.observe(Feedback(0, list(range(12)), [float(c) for c in range(12)], [None] * 12))
    # After step 0's feedback, step 1 draws from ceil((0.25 + 0.75 / 100) * 12) = 4 hardest.
    assert min(hard.sample(clients, np.ones(12), 3, rng)) >= 8


def test_the_server_feeds_back_losses_after_every_round():
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=12)
    data = kn.partition_dataset(ds, "iid", 12, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    seen = []

    class Watching(PowerOfChoice):
        def observe(self, feedback):
            seen.append(feedback)
            super().observe(feedback)

    fed = kn.Federation(model, data, local=kn.LocalTraining(steps=2), clients_per_round=4, sampler=Watching())
    records = fed.fit(3)
    assert [f.client_ids for f in seen] == [r.accepted for r in records]
    assert all(len(f.losses) == 4 and all(np.isfinite(f.losses)) for f in seen)
    assert set(SAMPLERS.names()) >= {"uniform", "proportional", "power_of_choice", "ucb", "curriculum"}
    with pytest.raises(ValueError, match="order"):
        Curriculum(order="sideways")


def test_availability_sampler_picks_clients_that_finish_before_going_offline():
    from koinon.server.feedback import Availability

    s = Availability()
    rng = np.random.default_rng(0)
    clients = np.arange(6)
    s.observe(Feedback(0, list(range(6)), [1.0] * 6, [2.0, 2.0, 2.0, 5.0, 5.0, None]))
    s.remaining({0: 10.0, 1: 1.0, 2: 3.0, 3: 4.0, 4: 6.0, 5: 0.5})
    # Fit: 0 (10 >= 2), 2 (3 >= 2), 4 (6 >= 5), 5 (never heard from); not 1 (1 < 2), 3 (4 < 5).
    for _ in range(10):
        assert set(s.sample(clients, np.ones(6), 3, rng)) <= {0, 2, 4, 5}
    # Asking for more than fit: the rest are those online longest (3 at 4 s, before 1 at 1 s).
    assert s.sample(clients, np.ones(6), 5, rng) == [0, 2, 3, 4, 5]


@pytest.mark.parametrize("sampler", ["power_of_choice", "ucb", "curriculum"])
def test_a_learning_sampler_resumes_where_it_stood(sampler):
    def federation():
        ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=12)
        data = kn.partition_dataset(ds, "dirichlet", 12, seed=0, options={"alpha": 0.5})
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        return kn.Federation(model, data, local=kn.LocalTraining(steps=2), clients_per_round=3, sampler=sampler)

    whole = federation()
    whole.fit(6)
    half = federation()
    half.fit(3)
    again = federation()
    again.load_state_dict(half.state_dict())
    again.fit(3)
    assert torch.equal(again.params, whole.params)


def test_sampler_options_come_from_the_config(tmp_path):
    from koinon.config import Config
    from koinon.errors import ConfigError
    from koinon.experiment.runner import build_federation

    over = {"data.num_clients": 12, "server.clients_per_round": 3, "client.steps": 2, "server.sampler": "ucb",
            "server.sampler_options": {"c": 0.3, "sources": [0] * 6 + [1] * 6}}
    cfg = Config().with_overrides(over)
    fed = build_federation(cfg)
    assert isinstance(fed.server.sampler, UCB) and fed.server.sampler.c == 0.3
    assert fed.server.sampler.arm(7) == 1
    assert cfg.server.sampler_options["window"] == 0  # defaults recorded in the resolved config
    assert "sampler_options" not in Config().to_toml()  # unset: written as before
    with pytest.raises(ConfigError, match="server.sampler_options.cc: not an option of sampler 'ucb'"):
        build_federation(Config().with_overrides({**over, "server.sampler_options": {"cc": 1.0}}))
    with pytest.raises(ConfigError, match="server.sampler_options = 3: expected dict"):
        Config().with_overrides({"server.sampler_options": 3})
