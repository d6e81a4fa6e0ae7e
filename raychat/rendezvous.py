"""The torch.distributed rendezvous of a single-node run, on 127.0.0.1 only.

Ray Train (ray/train/torch/config.py `_TorchBackend.on_start`) sets MASTER_ADDR to rank 0's node IP, and
rank 0's TCPStore server listens on every interface whatever MASTER_ADDR says (torch binds `::`/`0.0.0.0`;
`ss -ltn` shows `*:PORT`), so on a laptop or a shared VM anyone on the network can reach the store. With the
embedded local Ray every worker is on this machine, so `LoopbackTorchConfig` does the same setup with the store
served from a socket rank 0 binds to 127.0.0.1 (TCPStore's `master_listen_fd`; the process group's own store
is then a multi-tenant client of that server, same port) and gloo's pairs on the loopback interface. On a
cluster the default TorchConfig stays: see docs/CLUSTER.md for the ports it uses.
"""
import os
import socket
from datetime import timedelta

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

_SERVER = []  # rank 0: the listening socket and the store server, alive as long as the worker process


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
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus else "gloo")
        port = worker_group.execute_single(0, _serve_store_on_loopback, len(worker_group), backend_config.timeout_s)
        worker_group.execute(_set_loopback_env, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend, world_rank=i,
                                                   world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


class LoopbackTorchConfig(TorchConfig):
    """TorchConfig for a run whose workers all live on this machine (the embedded local Ray)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
