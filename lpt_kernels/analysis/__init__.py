"""Analyses that compose checkpoints, layouts and kernels: update profiles (`diff`), overlaps, cosines."""
from lpt_kernels.analysis.profile import Profile, ProfileError, diff

__all__ = ["diff", "Profile", "ProfileError"]
