"""Datasets that need no download, partitioners, and the federated view of a dataset."""

from koinon.data import shakespeare as _shakespeare  # noqa: F401  (registers the dataset)
from koinon.data.datasets import DATASETS, Dataset
from koinon.data.federated import FederatedData, partition_dataset
from koinon.data.partition import PARTITIONERS

__all__ = ["DATASETS", "PARTITIONERS", "Dataset", "FederatedData", "partition_dataset"]
