"""bimdist: block-wise masked image modeling (BIM) as a distributed, asynchronous stage pipeline."""

__version__ = "0.1.0"
