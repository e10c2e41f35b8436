"""volplane's node side: the CSI node plugin and the node agent (`volplane node`).

- ``service.py``   CSI Identity + Node services (gRPC), thin: validate, lock, call ``ops``
- ``ops.py``       the node operations (stage, publish, expand, stats) over ``system.py``
- ``volumes.py``   pure decisions: request validation, what a stage/publish must do
- ``mounts.py``    pure parsers: /proc/self/mountinfo, ``losetup -J``, ``blkid -o export``
- ``system.py``    the only place that runs losetup, mkfs, mount, resize tools
- ``backing.py``   pure: a pool's backing, a volume's file, the agent's plan
- ``agent.py``     the node agent: creates, grows and deletes backing files, reports
                   the real capacity of each pool's backing into its status
- ``registration.py``  the kubelet plugin-registration service (node-driver-registrar's job)
- ``main.py``      ``volplane node``: wires the above together

See docs/data-path.md.
"""
