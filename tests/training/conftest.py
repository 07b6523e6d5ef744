"""The two device profiles the end-to-end trainer tests run under (``docs/testing.md``)."""
import pytest

from spnet_dist.device_profile import PROFILE_ENV

# "cpu": this machine's own answers. "cuda-on-cpu": the answers a CUDA rank gets (channels_last
# batches, masked teacher, capacity evaluation, NHWC loader output, ...) computed on the CPU.
PROFILES = {"cpu": None, "cuda-on-cpu": "cuda"}


@pytest.fixture(params=list(PROFILES))
def device_profile(request, monkeypatch) -> str:
    """Run the test under each profile; launched ranks inherit the variable."""
    value = PROFILES[request.param]
    if value is None:
        monkeypatch.delenv(PROFILE_ENV, raising=False)
    else:
        monkeypatch.setenv(PROFILE_ENV, value)
    return request.param
