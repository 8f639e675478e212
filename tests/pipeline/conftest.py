"""The cluster tests' fixture (see :mod:`tests.pipeline.cluster_harness`)."""

from tests.pipeline.cluster_harness import processes  # noqa: F401  (a fixture)
