"""The compute-islands process driver: `koinon launch`, worker processes, torchrun.

Real worker processes run the DiLoCo protocol of `koinon.topology.diloco` (the same
`IslandsEngine` the one-process simulation runs) and exchange codec bytes over
torch.distributed (gloo); they survive a worker's death and accept joiners (`membership`).
"""
