"""Topologies are registered by `topology.name`; graphs (`topology.graph`) are a registry apart."""

import pytest

from koinon.cli import main
from koinon.config import Config
from koinon.errors import ConfigError
from koinon.experiment.runner import build_federation
from koinon.topology import GRAPHS, TOPOLOGIES, Federation, Gossip
from koinon.topology.diloco import DiLoCo


def test_every_topology_is_registered_and_graphs_are_not_topologies():
    assert TOPOLOGIES.names() == ["diloco", "distillation", "experts", "federated", "gossip"]
    assert "ring" in GRAPHS and not set(GRAPHS.names()) & set(TOPOLOGIES.names())


@pytest.mark.parametrize("name, kind", [("federated", Federation), ("gossip", Gossip), ("diloco", DiLoCo)])
def test_the_builder_of_a_name_builds_that_topology(name, kind):
    cfg = Config().with_overrides({"topology.name": name, "data.num_clients": 10,
                                   "server.clients_per_round": 5})
    topology = TOPOLOGIES.get(name)(cfg)
    try:
        assert isinstance(topology, kind)
        assert type(build_federation(cfg)) is kind
    finally:
        topology.close()


def test_an_unknown_topology_is_a_one_line_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError) as info:
        build_federation(Config().with_overrides({"topology.name": "mesh"}))
    assert str(info.value) == ("topology.name = 'mesh': unknown topology; allowed: diloco, distillation, "
                               "experts, federated, gossip")
    config = tmp_path / "c.toml"
    config.write_text('[topology]\nname = "ring"\n')  # a graph is not a topology
    assert main(["run", str(config), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "topology.name = 'ring': unknown topology" in err
    assert not (tmp_path / "never").exists()


def test_an_unknown_graph_names_the_graph_registry():
    cfg = Config().with_overrides({"topology.name": "gossip", "topology.graph": "hypercube"})
    with pytest.raises(ConfigError, match="topology.graph = 'hypercube': unknown graph; allowed: "):
        build_federation(cfg)
