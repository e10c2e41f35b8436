"""volplane's storage backend: StoragePools, the pool driver ``pool.volplane.io``.

Pure: ``parameters`` (StorageClass parameters), ``placement`` (which nodes a pool
reaches, which pool a claim gets), ``ledger`` (the capacity ledger), ``capacity``
(pool status and CSIStorageCapacity objects to publish), ``slots`` (the device-slot
ledger of attachments), ``records`` (the objects the driver writes and their names).

Effects, one job per module: ``provisioner`` (the controller "pool-provisioner" and the
PV controller's volume plugin: provision, delete, recycle), ``expander``,
``publisher`` (status and capacity), ``gc`` (orphaned allocation records),
``attacher`` (the controller "pool-attacher": the external-attacher of the driver).
``context`` holds what the provisioner's jobs share.
"""
