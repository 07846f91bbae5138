"""Topologies without one shared model: `experts` (owners' experts behind a router, opt-out at
inference) and `distillation` (parties exchange predictions on a public proxy set).

Imported when a config names one of them (`koinon.topology.build`), so `import koinon` stays
lean. `load_experts(run)` rebuilds a finished experts run's mixture for inference;
`opt_out_report` measures what opting owners out costs on each domain.
"""

from koinon.topology.experts.distillation import Distillation, build_distillation
from koinon.topology.experts.experts import Experts, build_experts
from koinon.topology.experts.options import DistillOptions, ExpertsOptions
from koinon.topology.experts.predict import ExpertsRun, load_experts, opt_out_report

__all__ = ["Distillation", "DistillOptions", "Experts", "ExpertsOptions", "ExpertsRun", "build_distillation",
           "build_experts", "load_experts", "opt_out_report"]
