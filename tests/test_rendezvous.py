"""raychat.rendezvous on a real local Ray: the single-node process group's store listens on 127.0.0.1 only."""
import json

import pytest

pytestmark = pytest.mark.slow


def test_store_listens_on_loopback_only(ray_local, tmp_path):
    """2 gloo workers with LoopbackTorchConfig: the all-reduce works, MASTER_ADDR is 127.0.0.1, gloo uses `lo`,
    and the one socket listening on MASTER_PORT is bound to 127.0.0.1 (0100007F), not to every interface (`*`,
    what the default TorchConfig's store does)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raychat.rendezvous import LoopbackTorchConfig

    def check(config):  # a closure: shipped to the workers by value
        import os

        import ray.train
        import torch
        import torch.distributed as dist

        def listeners(port):  # local addresses (hex, as /proc/net/tcp{,6} write them) listening on `port`
            found = []
            for table in ("/proc/net/tcp", "/proc/net/tcp6"):
                with open(table) as f:
                    for line in f.readlines()[1:]:
                        local, state = line.split()[1], line.split()[3]
                        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                            found.append(local.rsplit(":", 1)[0])
            return found

        t = torch.ones(1)
        dist.all_reduce(t)
        seen = {"sum": t.item(), "master_addr": os.environ["MASTER_ADDR"], "gloo": os.environ.get("GLOO_SOCKET_IFNAME"),
                "listeners": listeners(int(os.environ["MASTER_PORT"]))}
        # A file, not a report: Train V2's Result carries only checkpoint reports.
        with open(os.path.join(config["out"], f"rank{ray.train.get_context().get_world_rank()}.json"), "w") as f:
            json.dump(seen, f)

    TorchTrainer(check, train_loop_config={"out": str(tmp_path)}, scaling_config=ScalingConfig(num_workers=2),
                 torch_config=LoopbackTorchConfig(timeout_s=60),
                 run_config=RunConfig(name="loopback", storage_path=str(tmp_path / "runs"))).fit()
    seen = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [s["sum"] for s in seen] == [2.0, 2.0]
    assert all(s["master_addr"] == "127.0.0.1" and s["gloo"] == "lo" for s in seen)
    assert seen[0]["listeners"] == ["0100007F"], f"the store listens on {seen[0]['listeners']}"
