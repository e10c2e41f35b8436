"""Names shared with upstream Kubernetes: annotations, phases, event reasons.

They are the exact strings kube-controller-manager's PV controller uses
(``k8s.io/component-helpers/storage/volume`` and ``pkg/controller/volume/events``), so
that kubectl, kube-scheduler and external provisioners keep working with volplane.
"""

from __future__ import annotations

from typing import Final

# --- annotations on claims and volumes -------------------------------------------------

# On a claim: the claim has been bound once. Its presence switches syncClaim from the
# "unbound" to the "bound" state machine. The value does not matter.
ANN_BIND_COMPLETED: Final = "pv.kubernetes.io/bind-completed"
# On a PV or a claim: the binding was made by the controller, not pre-bound by a user.
ANN_BOUND_BY_CONTROLLER: Final = "pv.kubernetes.io/bound-by-controller"
# On a PV: name of the provisioner (or in-tree plugin) that created it.
ANN_PROVISIONED_BY: Final = "pv.kubernetes.io/provisioned-by"
# On a claim: node chosen by kube-scheduler for a WaitForFirstConsumer claim; the
# scheduler's signal that provisioning may start.
ANN_SELECTED_NODE: Final = "volume.kubernetes.io/selected-node"
# On a claim: the provisioner expected to create its volume (GA and deprecated beta name).
ANN_STORAGE_PROVISIONER: Final = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_STORAGE_PROVISIONER: Final = "volume.beta.kubernetes.io/storage-provisioner"
# On a PV or claim: the deprecated way to name a StorageClass. Upstream reads it *before*
# spec.storageClassName.
ANN_BETA_STORAGE_CLASS: Final = "volume.beta.kubernetes.io/storage-class"
# On a PV or claim: CSI migration is active and the CSI driver named here owns the object;
# the PV controller stands down (no reclaim by us).
ANN_MIGRATED_TO: Final = "pv.kubernetes.io/migrated-to"
# On a PV: capacity before an offline filesystem resize; used as claim status capacity.
ANN_PRE_RESIZE_CAPACITY: Final = "volume.alpha.kubernetes.io/pre-resize-capacity"
# On a StorageClass: this class is the cluster default ("true"), GA and beta names.
ANN_IS_DEFAULT_CLASS: Final = "storageclass.kubernetes.io/is-default-class"
ANN_BETA_IS_DEFAULT_CLASS: Final = "storageclass.beta.kubernetes.io/is-default-class"

# --- provisioners ----------------------------------------------------------------------

# StorageClass provisioner meaning "no dynamic provisioning" (local volumes etc.).
NO_PROVISIONER: Final = "kubernetes.io/no-provisioner"
# Our own provisioner and CSI driver name.
POOL_PROVISIONER: Final = "pool.volplane.io"
# Provisioner names with this prefix are in-tree volume plugins; volplane has none.
IN_TREE_PREFIX: Final = "kubernetes.io/"
# In-tree plugins whose volumes CSI migration hands to a CSI driver (k8s.io/csi-translation-lib
# v0.36 plugins/*.go; csimigration.PluginManager.IsMigrationEnabledForPlugin: all seven
# are on in 1.36): in-tree plugin name -> CSI driver name.
MIGRATED_PLUGINS: Final = {
    "kubernetes.io/aws-ebs": "ebs.csi.aws.com",
    "kubernetes.io/gce-pd": "pd.csi.storage.gke.io",
    "kubernetes.io/azure-disk": "disk.csi.azure.com",
    "kubernetes.io/azure-file": "file.csi.azure.com",
    "kubernetes.io/cinder": "cinder.csi.openstack.org",
    "kubernetes.io/vsphere-volume": "csi.vsphere.vmware.com",
    "kubernetes.io/portworx-volume": "pxd.portworx.com",
}

# --- finalizers on PVs (component-helpers storage/volume) -------------------------------

# Added by the PV controller to dynamically provisioned in-tree PVs with Delete policy;
# removed once the in-tree deleter deleted the volume (or the policy / migration changed).
FINALIZER_IN_TREE_DELETION: Final = "kubernetes.io/pv-controller"
# external-provisioner's deletion protection; the PV controller only removes it from
# in-tree (non-migrated) PVs (a CSI migration rollback).
FINALIZER_EXTERNAL_DELETION: Final = "external-provisioner.volume.kubernetes.io/finalizer"

# --- phases ----------------------------------------------------------------------------

VOLUME_PENDING: Final = "Pending"
VOLUME_AVAILABLE: Final = "Available"
VOLUME_BOUND: Final = "Bound"
VOLUME_RELEASED: Final = "Released"
VOLUME_FAILED: Final = "Failed"

CLAIM_PENDING: Final = "Pending"
CLAIM_BOUND: Final = "Bound"
CLAIM_LOST: Final = "Lost"

# --- misc spec values ------------------------------------------------------------------

FILESYSTEM: Final = "Filesystem"
BLOCK: Final = "Block"
WAIT_FOR_FIRST_CONSUMER: Final = "WaitForFirstConsumer"
IMMEDIATE: Final = "Immediate"
RECLAIM_RETAIN: Final = "Retain"
RECLAIM_DELETE: Final = "Delete"
RECLAIM_RECYCLE: Final = "Recycle"

# --- event types and reasons (pkg/controller/volume/events + pv_controller literals) ----

NORMAL: Final = "Normal"
WARNING: Final = "Warning"

FAILED_BINDING: Final = "FailedBinding"
VOLUME_MISMATCH: Final = "VolumeMismatch"
VOLUME_FAILED_RECYCLE: Final = "VolumeFailedRecycle"
VOLUME_RECYCLED: Final = "VolumeRecycled"
RECYCLER_POD: Final = "RecyclerPod"
VOLUME_DELETE: Final = "VolumeDelete"
VOLUME_FAILED_DELETE: Final = "VolumeFailedDelete"
EXTERNAL_PROVISIONING: Final = "ExternalProvisioning"
PROVISIONING_FAILED: Final = "ProvisioningFailed"
PROVISIONING_CLEANUP_FAILED: Final = "ProvisioningCleanupFailed"
PROVISIONING_SUCCEEDED: Final = "ProvisioningSucceeded"
WAIT_FOR_FIRST_CONSUMER_REASON: Final = "WaitForFirstConsumer"
WAIT_FOR_POD_SCHEDULED: Final = "WaitForPodScheduled"
EXTERNAL_EXPANDING: Final = "ExternalExpanding"
# These three are string literals in pv_controller.go rather than events.go constants.
CLAIM_LOST_REASON: Final = "ClaimLost"
CLAIM_MISBOUND: Final = "ClaimMisbound"
VOLUME_UNKNOWN_RECLAIM_POLICY: Final = "VolumeUnknownReclaimPolicy"
