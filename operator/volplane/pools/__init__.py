"""volplane's own storage backend: StoragePools and the pool provisioner.

``ledger`` holds the pure part (which nodes a pool reaches, class parameters, pool
choice, the capacity ledger, the status and CSIStorageCapacity objects to publish);
``provisioner`` is the controller that carries those decisions out through the API.
"""
