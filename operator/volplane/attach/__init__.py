"""The Attach/Detach controller: VolumeAttachments for every attachable CSI volume.

Generic: it knows no driver (volplane's own attacher lives with its driver in
``pools/``). The pure layer: ``names`` (upstream's attachment and volume names),
``desired`` (the desired state of world, from pods), ``actual`` (the actual state,
from VolumeAttachments), ``reconcile`` (detaches, then attaches), ``reports`` (what and
when to write in each node's ``status.volumesAttached``). ``controller`` carries the
decisions out.
"""
