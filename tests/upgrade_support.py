"""Clusters of real daemons where each node may run a different build (see baseline_support).

``VersionedCluster`` is ``tests.cluster.Cluster`` with one interpreter per node: ``use(node_id,
python)`` makes the node's next start run that interpreter's installed ``quorumd``. The baseline
build runs ``python -m quorumd.node.cli run --config FILE`` like this one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from tests.cluster import Cluster, Node


class VersionedCluster(Cluster):
    def __init__(self, directory: Path, n: int = 3, *, python: Path | None = None, **kwargs: Any) -> None:
        super().__init__(directory, n, **kwargs)
        self.default_python = python or Path(sys.executable)
        self.pythons: dict[int, Path] = {}

    def use(self, node_id: int, python: Path) -> None:
        self.pythons[node_id] = python

    def python_of(self, node_id: int) -> Path:
        return self.pythons.get(node_id, self.default_python)

    def start(self, node: Node) -> None:
        env = {**os.environ, **self.env}
        env.pop("PYTHONPATH", None)  # the interpreter's own installed quorumd, nothing else
        argv = [
            str(self.python_of(node.node_id)),
            "-m",
            "quorumd.node.cli",
            "run",
            "--config",
            str(node.config_path),
        ]
        # not the source tree as working directory: its folders must not shadow the install
        self.launch(node, argv, env=env, cwd=self.directory)
