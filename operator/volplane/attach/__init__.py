"""The Attach/Detach controller and volplane's own attacher for `pool.volplane.io`.

``state`` is the pure decision layer (desired and actual state of world, the
reconciler's decisions, attachment names, the device-slot ledger); ``controller``
carries the decisions out through VolumeAttachments and Node status;
``pool_attacher`` plays the external-attacher for the pool driver.
"""
