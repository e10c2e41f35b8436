"""The PersistentVolume controller: claim/volume binding, provisioning hand-off, reclaim.

``constants`` holds the upstream annotation names and event reasons, ``index`` the
in-memory volume index and the matching rules, ``decide`` the pure claim and volume
state machines. None of these modules performs I/O.
"""
