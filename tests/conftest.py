"""Test set-up: 8 simulated CPU devices (set before JAX initialises) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# XLA's CPU compiles take seconds per phase step; tests that rebuild the same program (resume,
# sharding, end-to-end) share them through a persistent cache, one per pytest run (shared by
# its xdist workers).
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), f"pdmd_jax_xla_{_RUN}") if _RUN
                  else tempfile.mkdtemp(prefix="pdmd_jax_xla_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# The suite is compile-bound (tiny networks, many programs): XLA without its heavy passes compiles
# ~40% faster and runs the same math (tests compare programs compiled the same way, or against
# references with float32 tolerances). Tests that execute more than they compile opt back in
# with @pytest.mark.xla_optimized.
jax.config.update("jax_disable_most_optimizations", True)


def pytest_collection_modifyitems(items):
  """@pytest.mark.long tests (the default suite's end-to-end runs) are scheduled first, so the
  two xdist workers do not end on one of them while the other idles."""
  items.sort(key=lambda item: item.get_closest_marker("long") is None)   # stable: order kept


@pytest.fixture(autouse=True)
def _xla_optimized(request):
  """@pytest.mark.xla_optimized: this test compiles with XLA's full optimisations."""
  if request.node.get_closest_marker("xla_optimized") is None:
    yield
    return
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", True)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gmm_config():
  """The tiny (runlocal) Gaussian-mixture config; tests adjust leaves."""
  from pdmd_jax import configs  # pylint: disable=import-outside-toplevel
  return lambda arg=None: configs.load("configs/gmm.py" + (f":{arg}" if arg else ""))

