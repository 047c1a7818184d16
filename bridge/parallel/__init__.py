"""Process groups, autograd-aware collectives and pipeline passes for one rank of a `ParallelLayout`."""
from bridge.parallel.state import ParallelState, init_distributed

__all__ = ["ParallelState", "init_distributed"]
