"""koinon: train models together without pooling the data or the compute.

Build a federation in a few lines with a plain `nn.Module` and plain tensors:

    import koinon as kn
    data = kn.partition_dataset(kn.Dataset.from_tensors(x, y, x_test, y_test), "dirichlet",
                                num_clients=100, seed=0, options={"alpha": 0.5})
    fed = kn.Federation(model, data, local=kn.LocalTraining(lr=0.05, epochs=5),
                        clients_per_round=10, runtime="vectorized")
    for result in fed.fit(rounds=30):
        print(result.round, result.test_accuracy)
"""

__version__ = "0.1.0"

from koinon import aggregate as _aggregate  # noqa: E402,F401  (registers aggregators)
from koinon import compress as _compress  # noqa: E402,F401  (registers codecs)
from koinon import records  # noqa: E402
from koinon.clients import CLIENT_ALGORITHMS, FedProx, LocalSGD, LocalTraining, Scaffold  # noqa: E402
from koinon.data import DATASETS, PARTITIONERS, Dataset, FederatedData, partition_dataset  # noqa: E402
from koinon.errors import CodecError, ConfigError, KoinonError  # noqa: E402
from koinon.experiment import Config, load_config, resume_experiment, run_experiment  # noqa: E402
from koinon.models import MODELS, build_model  # noqa: E402
from koinon.params import Layout  # noqa: E402
from koinon.topology import Federation, Gossip, RoundResult  # noqa: E402
from koinon.topology.evaluation import Evaluation  # noqa: E402


def __getattr__(name: str):
    # Compute-island training is imported on first use, so `import koinon` stays lean.
    if name in ("DiLoCo", "IslandsSpec", "build_parts"):
        import koinon.topology.diloco

        return getattr(koinon.topology.diloco, name)
    raise AttributeError(f"module 'koinon' has no attribute {name!r}")


__all__ = [
    "CLIENT_ALGORITHMS", "DATASETS", "DiLoCo", "IslandsSpec", "MODELS", "PARTITIONERS", "CodecError",
    "Config", "ConfigError", "Evaluation", "build_parts", "records",
    "Dataset", "FedProx", "Federation", "Gossip", "FederatedData", "KoinonError", "Layout", "LocalSGD",
    "LocalTraining", "RoundResult", "Scaffold", "build_model", "load_config", "partition_dataset",
    "resume_experiment", "run_experiment",
]
