"""How Ray Train's workers form their torch.distributed process group.

Two changes to Ray Train's own setup (ray/train/torch/config.py `_TorchBackend.on_start`):

- An NCCL group is created with its device (`init_process_group(device_id=...)`, as the reference and
  torchrun scripts do; Ray passes none): the communicator is formed at once, so a broken NCCL fails at start
  and not at the first collective, and collectives such as barrier know their GPU. `DeviceTorchConfig`.
- A single-node run's store listens on 127.0.0.1 only. Ray Train sets MASTER_ADDR to rank 0's node IP, and
  rank 0's TCPStore server listens on every interface whatever MASTER_ADDR says (torch binds `::`/`0.0.0.0`;
  `ss -ltn` shows `*:PORT`), so on a laptop or a shared VM anyone on the network could reach it. With the
  embedded local Ray every worker is on this machine, so `LoopbackTorchConfig` serves the store from a
  socket rank 0 binds to 127.0.0.1 (TCPStore's `master_listen_fd`; the process group's own store is then a
  multi-tenant client of that server, same port) and puts gloo's pairs on the loopback interface. On a
  cluster the rendezvous stays Ray's: see docs/CLUSTER.md for the ports it uses.
"""
import os
import socket
from datetime import timedelta

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

_SERVER = []  # rank 0: the listening socket and the store server, alive as long as the worker process


def init_process_group(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    """On a worker, with MASTER_ADDR/MASTER_PORT set: Ray Train's process group setup, except that an NCCL
    group is bound to this worker's GPU (raychat.device.init_nccl_group)."""
    if backend == "nccl":
        from ray.train.torch import get_device

        from raychat.device import init_nccl_group

        # Ray Train's device, not cuda:LOCAL_RANK: Ray shares CUDA_VISIBLE_DEVICES between a node's workers.
        init_nccl_group(world_rank, world_size, timeout_s, get_device())
    else:
        _setup_torch_process_group(backend=backend, world_rank=world_rank, world_size=world_size,
                                   init_method="env://", timeout_s=timeout_s)


def _backend_name(worker_group, backend_config) -> str:
    gpus = worker_group.get_resources_per_worker().get("GPU", 0)
    return backend_config.backend or ("nccl" if gpus else "gloo")


def _set_master(addr: str, port: int) -> None:
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))


class _DeviceTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        from ray.train._internal.utils import get_address_and_port

        addr, port = worker_group.execute_single(0, get_address_and_port)  # rank 0's node, as Ray's setup
        worker_group.execute(_set_master, addr=addr, port=port)
        self._init_group(worker_group, _backend_name(worker_group, backend_config), backend_config.timeout_s)

    @staticmethod
    def _init_group(worker_group, backend: str, timeout_s: int) -> None:
        worker_group.execute(_set_torch_distributed_env_vars)  # RANK, LOCAL_RANK, WORLD_SIZE, ... as torchrun
        ray.get([worker_group.execute_single_async(i, init_process_group, backend=backend, world_rank=i,
                                                   world_size=len(worker_group), timeout_s=timeout_s)
                 for i in range(len(worker_group))])


class DeviceTorchConfig(TorchConfig):
    """TorchConfig whose NCCL group is created with each worker's GPU (rendezvous on rank 0's node, env://)."""

    @property
    def backend_cls(self):
        return _DeviceTorchBackend


def _serve_store_on_loopback(world_size: int, timeout_s: int) -> int:
    import torch.distributed as dist

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(world_size * 4)
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, world_size, True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.fileno())
    _SERVER.extend([sock, store])
    return port


def _set_loopback_env(port: int) -> None:
    _set_master("127.0.0.1", port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"


class _LoopbackTorchBackend(_DeviceTorchBackend):
    def on_start(self, worker_group, backend_config):
        port = worker_group.execute_single(0, _serve_store_on_loopback, len(worker_group), backend_config.timeout_s)
        worker_group.execute(_set_loopback_env, port=port)
        self._init_group(worker_group, _backend_name(worker_group, backend_config), backend_config.timeout_s)


class LoopbackTorchConfig(DeviceTorchConfig):
    """DeviceTorchConfig for a run whose workers all live on this machine (the embedded local Ray): the store
    on 127.0.0.1 only."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
