"""volplane: the PersistentVolume and Attach/Detach controllers, on Kopf, with StoragePools."""

__version__ = "0.3.0"
