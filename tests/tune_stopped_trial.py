"""A Tune trial that runs a Ray Train run and is stopped by Tune mid-training, on a cluster that
`damo.data.extract.connect_ray` starts: `python tests/tune_stopped_trial.py RUN_DIR`.

Prints one JSON line: the placement groups still held and the CPUs free once the sweep is over
(waiting up to 30 s for Ray Train's PlacementGroupCleaner and for the CPUs to come back). Run
it while another Ray cluster is up on this machine, which is where the cleaner used to lose
track of its cluster.
"""

from __future__ import annotations

import json
import sys
import time

import ray
from ray import tune

from damo.config import load_config
from damo.data.extract import connect_ray


def trial(config: dict) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def train_loop(_):
        for step in range(10_000):  # far more than Tune lets it run
            ray.train.report({"step": step})
            time.sleep(0.2)

    TorchTrainer(
        train_loop,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(
            name="inner", storage_path=config["root"], callbacks=[TuneReportCallback()]
        ),
    ).fit()


def main(root: str) -> None:
    connect_ray(load_config("tiny", ["ray.num_cpus=2", "ray.object_store_memory_mb=128"]), False)
    tune.Tuner(
        tune.with_resources(trial, {"cpu": 0.5}),
        param_space={"root": root},
        run_config=tune.RunConfig(storage_path=root, stop={"training_iteration": 3}, verbose=0),
    ).fit()
    # A removed placement group's CPUs reach `available_resources` a moment later (a CI run
    # once read 1.5 of 2 right after the group went), so wait for both, with one deadline.
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + 30
    while True:
        held = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        free = ray.available_resources().get("CPU", 0.0)
        if (not held and free >= total) or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(json.dumps({"placement_groups_held": len(held), "cpus_free": free}))
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
