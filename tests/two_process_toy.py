"""One process of a multi-process ToyAlgorithm run (launch/local_multiprocess.sh sets the
cluster): `python tests/two_process_toy.py RUN_DIR KEY=VALUE...` trains `toy_config(RUN_DIR,
**overrides)` with `toy.train_steps`; process 0 prints each step's metrics as one JSON line
(prefixed `metrics: `) and the process of each device along each mesh axis (`mesh: `, the
other axes at index 0)."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxalign
from jaxalign import distributed  # noqa: E402

distributed.initialize()  # before anything touches the devices

import jax  # noqa: E402
from toy import toy_config, train_steps  # noqa: E402


def main() -> None:
    cfg = toy_config(Path(sys.argv[1]), **dict(arg.split("=", 1) for arg in sys.argv[2:]))
    state, history = train_steps(cfg)
    if jax.process_index() == 0:
        mesh = jax.tree.leaves(state["params"])[0].sharding.mesh
        processes = {}
        for i, axis in enumerate(mesh.axis_names):
            along = tuple(slice(None) if j == i else 0 for j in range(mesh.devices.ndim))
            processes[axis] = [d.process_index for d in mesh.devices[along]]
        print("mesh: " + json.dumps(processes), flush=True)
        for metrics in history:
            record = {k: np.asarray(v).tolist() for k, v in metrics.items()}
            print("metrics: " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
