import pytest
import torch

from koinon.errors import ConfigError
from koinon.topology.diloco import IslandsSpec, LocalExchange
from koinon.topology.diloco.build import build_codec_for, spec_from_options
from koinon.topology.diloco.engine import average_payloads
from koinon.topology.diloco.outer import co2_step, outer_optimizer


def test_diloco_h1_with_plain_sgd_outer_step_is_synchronous_data_parallel(make_engine):
    # mean_i(theta - lr * g_i) = theta - lr * mean_i(g_i): one inner SGD step, then the plain
    # average (outer SGD, lr 1, no momentum) is exactly a data-parallel SGD step.
    common = dict(workers=3, inner_optimizer="sgd", inner_lr=0.1, grad_clip=0.0, batch_size=8)
    diloco = make_engine(IslandsSpec(mode="diloco", inner_steps=1, outer_optimizer="sgd",
                                     outer_lr=1.0, outer_momentum=0.0, **common))
    sync = make_engine(IslandsSpec(mode="sync", inner_steps=1, **common))
    diloco.run_steps(12, LocalExchange())
    sync.run_steps(12, LocalExchange())
    assert diloco.sync_index == sync.sync_index == 12
    torch.testing.assert_close(diloco.theta, sync.theta, rtol=1e-5, atol=1e-6)
    assert not torch.equal(diloco.theta, make_engine(IslandsSpec(workers=3)).theta)  # it moved


def test_outer_step_is_torch_nesterov_sgd_on_the_averaged_pseudo_gradient():
    # DiLoCo's outer optimizer (Nesterov, lr 0.7, momentum 0.9) is the server optimizer, stepped
    # with Delta = -average: torch.optim.SGD(nesterov=True) with grad = average.
    opt = outer_optimizer(IslandsSpec())
    theta = torch.randn(10)
    reference = theta.clone().requires_grad_(True)
    torch_opt = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    state = opt.init(theta)
    for k in range(4):
        g = torch.randn(10, generator=torch.Generator().manual_seed(k))
        theta = opt.step(theta, -g, state)
        reference.grad = g.clone()
        torch_opt.step()
    torch.testing.assert_close(theta, reference.detach())


def test_int8_all_reduce_error_is_within_the_codec_bound():
    # per worker |x - decode(encode(x))| <= absmax / (2 * 127); the average of the decoded
    # rows is therefore within the mean of those bounds of the true mean.
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 300, generator=gen) * torch.tensor([0.01, 1.0, 3.0, 0.5, 10.0])[:, None]
    codec = build_codec_for("int8", {}, 300)
    payloads = {w: codec.encode(rows[w], {}, gen)[0] for w in range(5)}
    avg = average_payloads(codec, payloads)
    bound = (rows.abs().amax(dim=1) / (2 * 127)).mean()
    err = (avg - rows.mean(dim=0)).abs().max()
    assert 0 < err <= bound + 1e-7
    assert sum(map(len, payloads.values())) < rows.numel() * 4 / 3.9  # really about 1 byte each


def test_int4_all_reduce_error_is_within_the_codec_bound():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(4, 256, generator=gen)
    codec = build_codec_for("int4", {}, 256)
    payloads = {w: codec.encode(rows[w], {}, gen)[0] for w in range(4)}
    avg = average_payloads(codec, payloads)
    blocks = rows.view(4, -1, 64).abs().amax(dim=2) / (2 * 7)  # per block of 64
    bound = blocks.repeat_interleave(64, dim=1).mean(dim=0)
    assert ((avg - rows.mean(dim=0)).abs() <= bound + 1e-6).all()


def test_empty_payloads_are_joiners_and_do_not_count():
    codec = build_codec_for("identity", {}, 3)
    a = codec.encode(torch.tensor([1.0, 2.0, 3.0]), {}, torch.Generator())[0]
    b = codec.encode(torch.tensor([3.0, 2.0, 1.0]), {}, torch.Generator())[0]
    assert average_payloads(codec, {0: a, 5: b"", 2: b}).tolist() == [2.0, 2.0, 2.0]


def test_streaming_syncs_each_fragment_once_per_h_steps(make_engine):
    eng = make_engine(IslandsSpec(workers=2, inner_steps=4, fragments=2, overlap=1, alpha=0.5,
                                  fragment_pattern="sequential"))
    before = eng.theta.clone()
    eng.run_steps(2, LocalExchange())  # first sync event: fragment 0 only
    changed = eng.theta != before
    assert changed[eng.fragments[0]].all() and not changed[eng.fragments[1]].any()
    assert eng.merges == [(3, 0)]  # merged tau = 1 step later
    eng.run_steps(2, LocalExchange())
    assert eng.sync_index == 2 and (eng.theta != before).all()


def test_co2_applies_the_average_one_round_late_and_clips_momentum(make_engine):
    spec = IslandsSpec(mode="co2", workers=3, inner_steps=4, outer_lr=1.0, outer_momentum=0.5,
                       co2_clip=0.05, co2_penalty=1.0)
    eng = make_engine(spec)
    theta0 = eng.theta.clone()
    eng.run_steps(4, LocalExchange())
    assert torch.equal(eng.theta, theta0) and eng.co2_pending is not None  # still in flight
    eng.run_steps(4, LocalExchange())
    assert not torch.equal(eng.theta, theta0)
    assert eng.outer_state["momentum"].norm() <= 0.05 + 1e-6
    # each worker keeps its own in-flight progress: local = theta + (own last-round movement)
    assert not torch.equal(eng.local[0], eng.local[1])


def test_co2_step_penalty_and_clip_by_hand():
    theta, m = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    co2_step(theta, m, torch.tensor([3.0, 4.0]), penalty=2.0, lr=1.0, beta=0.5, clip=1.0)
    torch.testing.assert_close(m, torch.tensor([0.6, 0.8]))  # (1.5, 2) clipped to norm 1
    torch.testing.assert_close(theta, torch.tensor([0.4, 0.2]))


def test_vectorized_and_looped_gradients_agree(make_engine):
    a = make_engine(IslandsSpec(workers=3, inner_steps=3, vectorized=True))
    b = make_engine(IslandsSpec(workers=3, inner_steps=3, vectorized=False))
    a.run_steps(6, LocalExchange())
    b.run_steps(6, LocalExchange())
    torch.testing.assert_close(a.theta, b.theta, rtol=1e-4, atol=1e-5)


def test_state_dict_resumes_bit_for_bit(make_engine):
    spec = IslandsSpec(workers=2, inner_steps=4, fragments=2, overlap=1, alpha=0.3)
    full = make_engine(spec, codec="int8")
    full.run_steps(10, LocalExchange())
    half = make_engine(spec, codec="int8")
    half.run_steps(5, LocalExchange())
    resumed = make_engine(spec, codec="int8")
    resumed.load_state_dict(half.state_dict())
    resumed.run_steps(5, LocalExchange())
    assert torch.equal(resumed.theta, full.theta) and torch.equal(resumed.local, full.local)


def test_joiner_gets_the_shared_state_and_the_same_update(make_engine):
    spec = IslandsSpec(workers=2, inner_steps=3)
    live = make_engine(spec, workers=[0, 1])
    live.run_steps(6, LocalExchange())
    joiner = make_engine(spec, workers=[2])

    class Relay:  # the live peers' payloads arrive; the joiner loads state from them
        def gather(self, sync_index, payloads, engine):
            engine.load_shared_state(state)
            return {**sent, **payloads}

        def after_sync(self, engine):
            pass

    class Capture(LocalExchange):
        def gather(self, sync_index, payloads, engine):
            sent.update(payloads)
            state.update(engine.shared_state())
            return super().gather(sync_index, payloads, engine)

    sent: dict = {}
    state: dict = {}
    live.run_steps(3, Capture())
    joiner.sync(Relay(), joining=True)
    assert torch.equal(joiner.theta, live.theta) and joiner.step == live.step == 9


@pytest.mark.parametrize("options, key", [
    ({"workers": 0}, "diloco.workers"),
    ({"inner_steps": 0}, "diloco.inner_steps"),
    ({"mode": "ring"}, "diloco.mode"),
    ({"inner_steps": 10, "fragments": 3}, "diloco.fragments"),
    ({"inner_steps": 10, "fragments": 2, "overlap": 5}, "diloco.overlap"),
    ({"mode": "co2", "fragments": 2, "inner_steps": 4}, "diloco.fragments"),
    ({"outer_momentum": 1.0}, "diloco.outer_momentum"),
    ({"alpha": 2.0}, "diloco.alpha"),
    ({"workers": "4"}, "diloco.workers"),
    ({"inner_step": 3}, "diloco.inner_step"),
    ({"lr_schedule": "linear"}, "diloco.lr_schedule"),
    ({"lr_schedule": "cosine"}, "diloco.total_steps"),
    ({"lr_warmup": -1}, "diloco.lr_warmup"),
    ({"lr_min_ratio": 1.5}, "diloco.lr_min_ratio"),
])
def test_bad_settings_are_one_line_config_errors(options, key):
    with pytest.raises(ConfigError) as info:
        spec_from_options(options)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_inner_lr_schedule_linear_warmup_then_cosine_to_the_floor():
    spec = IslandsSpec(inner_lr=0.01, lr_schedule="cosine", lr_warmup=10, total_steps=110,
                       lr_min_ratio=0.1)
    assert spec.lr_at(0) == pytest.approx(0.001)
    assert spec.lr_at(9) == pytest.approx(0.01)
    assert spec.lr_at(10) == pytest.approx(0.01)
    assert spec.lr_at(60) == pytest.approx(0.0055)  # half way: the midpoint of 0.01 and 0.001
    assert spec.lr_at(110) == pytest.approx(0.001)
    assert spec.lr_at(500) == pytest.approx(0.001)
    lrs = [spec.lr_at(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    constant = IslandsSpec(inner_lr=0.01, lr_warmup=4)
    assert [constant.lr_at(t) for t in (0, 3, 4, 1000)] == pytest.approx([0.0025, 0.01, 0.01, 0.01])


def test_schedule_is_per_global_step_and_the_same_for_sync_and_diloco(make_engine):
    # The H = 1 equivalence still holds under a schedule: both modes take step t at lr_at(t).
    common = dict(workers=3, inner_optimizer="sgd", inner_lr=0.1, grad_clip=0.0, batch_size=8,
                  lr_schedule="cosine", lr_warmup=3, total_steps=12)
    diloco = make_engine(IslandsSpec(mode="diloco", inner_steps=1, outer_optimizer="sgd",
                                     outer_lr=1.0, outer_momentum=0.0, **common))
    sync = make_engine(IslandsSpec(mode="sync", inner_steps=1, **common))
    flat = make_engine(IslandsSpec(mode="sync", inner_steps=1, **{**common, "lr_schedule":
                                                                  "constant", "lr_warmup": 0}))
    for engine in (diloco, sync, flat):
        engine.run_steps(12, LocalExchange())
    torch.testing.assert_close(diloco.theta, sync.theta, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sync.theta, flat.theta)  # the schedule changed the steps taken


def test_cosine_total_steps_defaults_to_the_run_length():
    from koinon.config import Config
    from koinon.topology.diloco.build import build_parts

    cfg = Config.from_dict({
        "data": {"name": "shakespeare", "partition": "natural", "num_clients": 2, "seq_len": 16,
                 "plays": 2},
        "model": {"name": "char_transformer", "dim": 8, "layers": 1, "heads": 2},
        "server": {"rounds": 7}, "topology": {"name": "diloco"},
        "diloco": {"workers": 2, "inner_steps": 5, "lr_schedule": "cosine"},
    })
    assert build_parts(cfg).spec.total_steps == 35


def test_device_setting_is_checked_in_one_line():
    with pytest.raises(ConfigError, match="diloco.device = 'gpu': allowed: cpu, cuda, cuda:N, auto"):
        IslandsSpec(device="gpu").check()
    IslandsSpec(device="auto").check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["diloco", "co2", "sync"])
def test_engine_on_cuda_equals_cpu(mode, make_engine):
    spec = IslandsSpec(mode=mode, workers=3, inner_steps=4, batch_size=8)
    cpu = make_engine(spec, codec="int8")
    gpu = make_engine(spec, codec="int8", device=torch.device("cuda"))
    for engine in (cpu, gpu):
        engine.run_steps(12, LocalExchange())
    assert gpu.theta.device.type == "cuda"
    torch.testing.assert_close(gpu.params, cpu.params, rtol=1e-4, atol=1e-5)


def test_engine_state_stays_on_the_host_side_of_checkpoints(make_engine):
    # Checkpoints and the shared state a joiner receives are host tensors whatever the device.
    engine = make_engine(IslandsSpec(workers=2, inner_steps=2, batch_size=4), device=torch.device("cpu"))
    engine.run_steps(4, LocalExchange())
    state = engine.state_dict()
    assert all(v.device.type == "cpu" for v in state.values())
    again = make_engine(IslandsSpec(workers=2, inner_steps=2, batch_size=4))
    again.load_state_dict(state)
    assert torch.equal(again.params, engine.params)
