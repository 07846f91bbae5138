"""The experts and distillation topologies end to end: config checks, run folders, real bytes,
opting out with `koinon predict`, heterogeneous models, resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from koinon.cli import main
from koinon.compress import CODECS
from koinon.config import Config
from koinon.errors import ConfigError
from koinon.experiment import run_experiment
from koinon.experiment.runner import build_federation, resume_experiment
from koinon.params import Layout
from koinon.topology.experts import load_experts, opt_out_report
from koinon.topology.experts.common import tensor_layout


def config(topology: dict, **sections) -> Config:
    raw = {
        "seed": 0,
        "data": {"name": "digits", "partition": "iid", "num_clients": 4},
        "model": {"name": "mlp", "hidden": [16]},
        "client": {"epochs": 1, "lr": 0.05, "momentum": 0.9},
        "server": {"rounds": 2, "eval_every": 2, "clients_per_round": 4},
        "topology": {"pretrain_epochs": 3, "domains": ["none", "rot90", "invert", "permute"], **topology},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return Config.from_dict(raw)


@pytest.mark.parametrize("topology,sections,match", [
    ({"name": "experts", "routr": "domain"}, {}, "unknown key topology.routr"),
    ({"name": "experts", "router": "best"}, {}, "topology.router = 'best'"),
    ({"name": "experts", "router": "learned"}, {}, "public_expert = false"),
    ({"name": "experts", "domains": ["none"]}, {}, "1 domains for 4 owners"),
    ({"name": "experts", "domains": ["none", "x", "none", "none"]}, {}, "unknown domain shift 'x'"),
    ({"name": "experts", "expert_models": [{}]}, {}, "expert_models has 1 entries"),
    ({"name": "experts", "expert_models": [{"hidden": [0]}, {}, {}, {}]}, {}, "topology.expert_models\\[0\\]"),
    ({"name": "experts", "temperature": "hot"}, {}, "topology.temperature = 'hot': expected float"),
    ({"name": "experts"}, {"aggregator": {"name": "median"}}, "do not apply"),
    ({"name": "distillation", "loss": "mse"}, {}, "topology.loss = 'mse': allowed: kl, bdkd, taid, knfu"),
    ({"name": "distillation", "party_models": [{"name": "mlp"}]}, {}, "party_models has 1 entries"),
    ({"name": "distillation", "public_fraction": 1.5}, {}, "public_fraction = 1.5"),
    ({"name": "distillation"}, {"codec": {"name": "nope"}}, "codec"),
])
def test_bad_keys_are_one_line_config_errors(topology: dict, sections: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        build_federation(config(topology, **sections))
    assert "\n" not in str(info.value)


def test_experts_of_other_widths_train_route_and_opt_out(tmp_path, capsys) -> None:
    widths = [{"hidden": [8]}, {"hidden": [32]}, {}, {"hidden": [16, 16]}]
    cfg = config({"name": "experts", "expert_models": widths, "pretrain_epochs": 10},
                 client={"epochs": 4})
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2] and lines[0]["test_accuracy"] is None
    assert len(lines[1]["domain_accuracy"]) == 4 and summary["final_accuracy"] > 0.6

    run = load_experts(tmp_path / "run")
    m = run.mixture
    assert [e[1].out_features for e in m.experts[:3]] == [8, 32, 16] and len(m.experts[3]) == 6
    # every expert trained away from its start, and the router sends inputs to every owner
    x = run.dataset.x_test
    w = m.weights(x)
    assert (w.argmax(dim=1).bincount(minlength=5)[1:] > 0).all()
    assert torch.allclose(w.sum(dim=1), torch.ones(len(x)), atol=1e-5)
    # opting owner 1 out: the mixture without it, with no retraining
    report = opt_out_report(run, [1])
    assert report["all"]["accuracy"] == pytest.approx(summary["final_accuracy"])
    assert report["without"]["domain_accuracy"][1] < report["all"]["domain_accuracy"][1]
    log_p = run.predict(x[:5], exclude=[1])
    assert torch.allclose(log_p.exp().sum(dim=1), torch.ones(5), atol=1e-5)

    assert main(["predict", str(tmp_path / "run"), "--exclude", "1"]) == 0
    out = capsys.readouterr().out
    assert "owners excluded: 1" in out and "(excluded owner's domain)" in out
    sade = run.metrics(sade=True)  # SADE's weights per domain, set from unlabeled test inputs
    assert len(sade["domain_accuracy"]) == 4 and 0.0 < sade["accuracy"] <= 1.0
    w = run.sade(run.dataset.x_test[:50], exclude=[2])
    assert w[m.slot(2)] == 0 and w.sum().item() == pytest.approx(1.0, abs=1e-5)
    # Meta-DMoE's test-time step: one public-sized student distilled from the mixture on a
    # domain's unlabeled inputs agrees with the mixture there
    x1 = x[torch.from_numpy(run.dataset.test_groups[1])]
    module, layout, params = run.student(x1, epochs=30)
    assert layout.numel == Layout.from_module(m.public).numel
    from torch.func import functional_call

    agree = (functional_call(module, layout.views(params), (x1,)).argmax(1) == run.predict(x1).argmax(1))
    assert agree.float().mean() > 0.9
    assert main(["predict", str(tmp_path / "run"), "--sade"]) == 0
    assert "SADE weights per domain" in capsys.readouterr().out
    assert main(["predict", str(tmp_path / "run"), "--exclude", "9"]) == 2
    assert "owner 9 does not exist" in capsys.readouterr().err
    import numpy as np

    np.save(tmp_path / "x.npy", x[:7].numpy())
    assert main(["predict", str(tmp_path / "run"), "--input", str(tmp_path / "x.npy"),
                 "--output", str(tmp_path / "y.npy"), "--exclude", "0"]) == 0
    assert np.load(tmp_path / "y.npy").tolist() == run.predict(x[:7], exclude=[0]).argmax(1).tolist()


def test_experts_bytes_are_the_payloads() -> None:
    cfg = config({"name": "experts"})
    topo = build_federation(cfg)
    r1 = topo.run_round(evaluate=False)
    public_numel = Layout.from_module(topo.mixture.public).numel
    # round 1: the public model down to 4 owners, each owner's 16-float embedding up (float32)
    assert r1.downlink_bytes == 4 * 4 * public_numel and r1.uplink_bytes == 4 * 4 * 16
    r2 = topo.run_round(evaluate=True)  # the experts are shipped when the mixture is assembled
    assert r2.uplink_bytes == sum(4 * lay.numel for lay in topo.expert_layouts) and r2.downlink_bytes == 0
    assert topo.uplink_total == r1.uplink_bytes + r2.uplink_bytes


def test_lora_experts_ship_only_their_adapters() -> None:
    topo = build_federation(config({"name": "experts", "expert": "lora", "lora_rank": 2, "pretrain_epochs": 10},
                                   client={"epochs": 3}))
    public = [p.clone() for p in topo.mixture.public.parameters()]
    ds = topo.data.dataset
    public_acc = (topo.mixture.public(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    topo.run_round(evaluate=False)
    r2 = topo.run_round(evaluate=True)
    adapter = 2 * (64 + 16) + 2 * (16 + 10)  # rank 2 on the 64-16 and 16-10 layers
    assert r2.uplink_bytes == 4 * 4 * adapter
    for expert in topo.mixture.experts:  # the frozen base stays the public model
        assert torch.equal(expert[1].weight, public[0]) and torch.equal(expert[3].weight, public[2])
        assert expert[1].lora_b.abs().sum() > 0
    assert topo.evaluate()[0] > public_acc + 0.05  # the adapters learned the owners' domains
    with pytest.raises(ConfigError, match="lora"):
        build_federation(config({"name": "experts", "expert": "lora", "sizes": [{"hidden": [8]}]}))


def test_the_latent_interface_trains_on_public_data_only() -> None:
    topo = build_federation(config({"name": "experts", "interface": "thoughts", "interface_epochs": 2, "latent": 8}))
    r1 = topo.run_round(evaluate=True)
    interface = topo.mixture.interface
    assert interface is not None and interface.out.weight.abs().sum() > 0  # trained away from zero
    assert r1.uplink_bytes == 4 * 4 * 16 + sum(4 * lay.numel for lay in topo.expert_layouts)  # no extra bytes
    assert all(p.requires_grad for e in topo.mixture.experts for p in e.parameters())  # flags restored


def test_hdee_gives_harder_domains_larger_experts() -> None:
    cfg = config({"name": "experts", "sizes": [{"hidden": [8]}, {"hidden": [64]}]})
    topo = build_federation(cfg)
    from koinon.topology.experts.experts import difficulty

    hard = difficulty(topo.mixture.public, topo.data)
    widths = [e[1].out_features for e in topo.mixture.experts]
    order = sorted(range(4), key=lambda i: hard[i])
    assert [widths[i] for i in order] == [8, 8, 64, 64]
    assert cfg.topology.options["expert_models"] == [{"hidden": [w]} for w in widths]


@pytest.mark.parametrize("name,extra", [("experts", {"router": "learned", "public_expert": False}),
                                        ("distillation", {"loss": "taid", "proxy_size": 50, "taid_rounds": 3})])
def test_resume_is_bit_identical(tmp_path, name: str, extra: dict) -> None:
    straight = run_experiment(config({"name": name, **extra}, server={"rounds": 3, "eval_every": 1}),
                              tmp_path / "a", progress=False)
    run_experiment(config({"name": name, **extra}, server={"rounds": 2, "eval_every": 1}), tmp_path / "b",
                   progress=False)
    resumed = resume_experiment(tmp_path / "b", ["server.rounds=3"], progress=False)
    assert resumed["model_sha256"] == straight["model_sha256"]
    assert resumed["uplink_bytes_total"] == straight["uplink_bytes_total"]


def test_distillation_mixes_architectures_and_counts_logit_bytes() -> None:
    parties = [{"name": "mlp", "hidden": [16]}, {"name": "cnn", "channels": 4}, {"name": "logreg"},
               {"name": "mlp", "hidden": [32, 16]}]
    cfg = config({"name": "distillation", "party_models": parties, "proxy_size": 40, "domains": [],
                  "pretrain_epochs": 10}, codec={"name": "int8"}, downlink={"name": "int8"})
    topo = build_federation(cfg)
    result = topo.run_round()
    payload, _ = CODECS.build("int8", {}, "codec", layout=tensor_layout("logits", (40, 10))).encode(
        torch.randn(400), {}, torch.Generator())
    assert result.uplink_bytes == 4 * len(payload) and result.downlink_bytes == 4 * len(payload)
    assert len(result.party_accuracy) == 4 and min(result.party_accuracy) > 0.5
    assert result.uplink_bytes < Layout.from_module(topo.parties[0]).numel * 4  # logits, not weights


@pytest.mark.parametrize("loss", ["kl", "bdkd", "taid", "knfu"])
def test_identical_parties_are_a_fixed_point_and_distillation_brings_parties_together(loss: str) -> None:
    cfg = config({"name": "distillation", "loss": loss, "proxy_size": 60, "pretrain_epochs": 0,
                  "distill_epochs": 3, "distill_lr": 0.1})
    topo = build_federation(cfg)
    x = topo.data.dataset.x_train[topo._proxy(1)]

    def disagreement() -> float:
        log_p = torch.stack([F.log_softmax(topo.predict(i, x), dim=-1) for i in range(4)])
        return float(sum((log_p[i].exp() * (log_p[i] - log_p[j])).sum(-1).mean()
                         for i in range(4) for j in range(4)) / 12)

    # parties initialized apart agree more and more on the proxy set through the exchange alone
    before = disagreement()
    for r in range(1, 6):
        topo.exchange(r)
    assert disagreement() < 0.2 * before
    # identical parties: the target is what they already predict, so distillation leaves them be
    for i in range(1, 4):
        topo.party_params[i] = topo.party_params[0].clone()
    start = [p.clone() for p in topo.party_params]
    topo.exchange(6)
    for p, q in zip(topo.party_params, start):
        assert torch.allclose(p, q, atol=1e-5)
    assert math.isfinite(disagreement()) and disagreement() < 1e-8
