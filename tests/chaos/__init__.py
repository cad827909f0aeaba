"""Real-network chaos testing for quorumd: network namespaces, a seeded nemesis, a lease
workload, a recorded history and the checkers that judge it.

Modules: ``netns`` (namespaces, bridge, nftables faults), ``nscluster`` (quorumd processes in
the namespaces, formed with the real join flow), ``nemesis`` (seeded faults), ``workload``
(concurrent lease clients), ``history`` (the recorded operations), ``linearizability`` (a
WGL/Porcupine-style checker), ``checkers`` (safety, durability and convergence checks) and
``run`` (one run end to end; ``python -m tests.chaos``).
"""
