"""Imported at start-up by the processes of the tests' multi-process jobs (their PYTHONPATH leads
here): it stops a job that jax.device_put's a host value onto devices of several processes. jax
then gathers the value whole from every process to check that they agree (multihost_utils.
assert_equal): on a pod every host would receive every host's copy of, say, the text encoder, and
a gather is compiled per shape. pixelflow_jax.sharding.global_arrays places such values without it."""

from jax.experimental import multihost_utils

_assert_equal = multihost_utils.assert_equal


def assert_equal_unless_device_put(in_tree, fail_message: str = ""):
    if "passed to device_put" in fail_message:
        raise AssertionError("jax.device_put of a host value onto devices of several processes gathers it whole "
                             "from every process; place it with pixelflow_jax.sharding.global_arrays")
    return _assert_equal(in_tree, fail_message)


multihost_utils.assert_equal = assert_equal_unless_device_put
