"""raychat.local_ray's one decision, "raychat's own Ray or a cluster", and the sessions' `auto` values."""
import dataclasses

import pytest

from raychat import local_ray
from raychat.config import TrainConfig
from raychat.session import LocalSession, RayTrainSession


@pytest.fixture
def no_ray(monkeypatch):
    """This process as a driver with no Ray connected yet, outside any embedded Ray."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAYCHAT_EMBEDDED_RAY", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return monkeypatch


def test_embedded_unless_a_cluster_is_named(no_ray):
    assert local_ray.is_embedded()  # a driver that will start raychat's own Ray
    no_ray.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not local_ray.is_embedded()  # `ray job submit` names the cluster
    no_ray.setenv("RAYCHAT_EMBEDDED_RAY", "1")
    assert local_ray.is_embedded()  # a process of the embedded Ray (a Tune trial) whatever else is set


def test_a_ray_someone_else_started_is_a_cluster(no_ray):
    import ray
    from ray.runtime_context import RuntimeContext

    no_ray.setattr(ray, "is_initialized", lambda: True)
    no_ray.setattr(RuntimeContext, "gcs_address", property(lambda self: "127.0.0.1:1234"))
    assert not local_ray.is_embedded()
    no_ray.setattr(local_ray, "_STARTED", ["127.0.0.1:1234"])
    assert local_ray.is_embedded()  # the one this process started


def test_torch_config_binds_loopback_only_on_the_embedded_ray(no_ray):
    from raychat.rendezvous import DeviceTorchConfig, LoopbackTorchConfig

    embedded = local_ray.torch_config(timeout_s=60)
    assert isinstance(embedded, LoopbackTorchConfig) and embedded.timeout_s == 60
    no_ray.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert type(local_ray.torch_config(timeout_s=60)) is DeviceTorchConfig  # Ray Train's rendezvous


def test_sessions_resolve_auto_values():
    cfg = TrainConfig()  # --cpus-per-worker 0, --data-backend auto
    local = LocalSession().resolve(cfg)
    assert local.cpus_per_worker >= 1 and local.data_backend == "inline"  # one process takes every CPU
    ray_session = object.__new__(RayTrainSession)  # no Train context needed for resolve
    with pytest.raises(RuntimeError, match=r"unresolved: the driver .*local_ray\.resolve_auto"):
        ray_session.resolve(cfg)
    resolved = dataclasses.replace(cfg, cpus_per_worker=2.0, data_backend="ray")
    assert ray_session.resolve(resolved) is resolved
