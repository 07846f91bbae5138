"""What a run leaves behind: the run folder and its writers (metrics, checkpoints, model,
summary, plot), and the round loop that fills it. Below `topology/` and `experiment/`, so the
Python API (`Federation.fit(out=...)`) and `koinon run` write the same files with one code."""

from koinon.records.folder import (
    RUN_FILES,
    Callback,
    TensorBoard,
    model_sha256,
    run_rounds,
    save_model,
)

__all__ = ["RUN_FILES", "Callback", "TensorBoard", "model_sha256", "run_rounds", "save_model"]
