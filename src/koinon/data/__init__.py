"""Datasets that need no download, partitioners, and the federated view of a dataset."""

from koinon.data import shakespeare as _shakespeare  # noqa: F401  (registers the dataset)
from koinon.data.checks import check_dataset, check_model
from koinon.data.datasets import DATASETS, Dataset
from koinon.data.federated import FederatedData, partition_dataset, partition_options
from koinon.data.partition import PARTITIONERS

__all__ = ["DATASETS", "PARTITIONERS", "Dataset", "FederatedData", "check_dataset", "check_model",
           "partition_dataset", "partition_options"]
