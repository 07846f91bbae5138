"""Configs, the experiment runner, checkpoints and reports."""

from koinon.config import Config, load_config
from koinon.experiment.runner import build_federation, resume_experiment, run_experiment

__all__ = ["Config", "build_federation", "load_config", "resume_experiment", "run_experiment"]
