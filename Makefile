# volplane — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
KUBECONFIG_LOCAL := $(CURDIR)/.local/kubeconfig

.PHONY: setup tools venv csi-stubs node-test controlplane cluster cluster-down cluster-status crds \
	run test unit e2e lint types contracts check bench chaos image kind kind-down kind-status \
	e2e-kind e2e-upstream e2e-upstream-build

setup: venv controlplane tools

# Debian packages, installed where missing (root + apt only; elsewhere a note):
# prometheus for the observability e2e test; docker.io (dockerd), debootstrap and
# libseccomp-dev (runc's build) for the kind target.
DEBS := prometheus:prometheus dockerd:docker.io debootstrap:debootstrap \
	/usr/include/seccomp.h:libseccomp-dev
tools:
	@missing=""; for d in $(DEBS); do c=$${d%%:*}; p=$${d#*:}; \
	  if [ "$${c#/}" != "$$c" ]; then [ -e "$$c" ] || missing="$$missing $$p"; \
	  else command -v $$c >/dev/null || missing="$$missing $$p"; fi; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $$missing >/dev/null; \
	  else echo "note: missing$$missing (not root with apt): the tests that need them skip"; fi; \
	fi

venv: $(VENV)/.installed csi-stubs
$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -e '.[test,codegen]'
	touch $@

# gRPC stubs of the CSI spec and the kubelet's plugin registration API, compiled from
# their published Go modules (gitignored; a no-op when current).
csi-stubs: $(VENV)/.installed
	$(VPY) hack/gen-csi.py

# Builds kube-apiserver, kube-controller-manager, kube-scheduler, etcd and kwok
# from upstream Go modules into ~/.cache/volplane (a no-op when cached).
controlplane:
	hack/build-controlplane.sh

cluster: setup
	$(VPY) hack/cluster.py up

cluster-down: venv
	$(VPY) hack/cluster.py down

cluster-status: venv
	$(VPY) hack/cluster.py status

crds: cluster
	kubectl --kubeconfig $(KUBECONFIG_LOCAL) apply --server-side -k crds/

# The operator in the foreground against the local cluster, with a demo workload.
# KIND=1: the same demo on the kind cluster (`make kind`), where volplane runs as its
# Deployment and the StatefulSet's pods write real bytes; follows the operator's log.
KIND_KUBECONFIG := $(CURDIR)/.local/kind/kubeconfig
ifeq ($(KIND),1)
run: kind
	kubectl --kubeconfig $(KIND_KUBECONFIG) apply --server-side -f hack/demo.yaml
	@echo "demo applied; watch: kubectl --kubeconfig .local/kind/kubeconfig get storagepool,pv,pvc,volumeattachments,pods -A"
	@echo "the pods' own data: kubectl --kubeconfig .local/kind/kubeconfig exec -n volplane-demo web-0 -- cat /data/log"
	kubectl --kubeconfig $(KIND_KUBECONFIG) -n volplane-system logs -f deployment/volplane
else
run: crds
	kubectl --kubeconfig $(KUBECONFIG_LOCAL) apply --server-side -f hack/demo.yaml
	@echo "demo applied; watch: kubectl --kubeconfig .local/kubeconfig get storagepool,pv,pvc,volumeattachments,pods -A"
	@echo "why is a claim pending: .venv/bin/volplane explain pvc volplane-demo/too-big --kubeconfig .local/kubeconfig"
	$(VENV)/bin/volplane run --kubeconfig $(KUBECONFIG_LOCAL) --log-format console
endif

unit: venv
	$(VPY) -m pytest tests/unit -q

# The CSI node plugin against real loop devices, mkfs and mount (root only; skipped otherwise).
node-test: venv
	$(VPY) -m pytest tests/node -q

# The e2e suite starts (or reuses) the local control plane itself; set
# VOLPLANE_E2E_KUBECONFIG to use another cluster, or pass PYTEST_ARGS=--kind.
e2e: setup
	$(VPY) -m pytest tests/e2e $(PYTEST_ARGS)

# unit and node-plugin tests, then the local control-plane e2e while the kind cluster is
# built and started in the background (niced: the build yields to the tests), then the
# e2e suite on kind. Both e2e suites run even if the first fails; either failing fails.
test: unit node-test
	@$(VPY) hack/kind/kind.py engine >/dev/null 2>&1 || true
	@mkdir -p .local && echo "kind: images and cluster in the background (log: .local/kind-up.log)"
	@nice -n 10 $(VPY) hack/kind/kind.py up > .local/kind-up.log 2>&1 & kind_pid=$$!; \
	  $(MAKE) --no-print-directory e2e; e2e_rc=$$?; \
	  wait $$kind_pid; echo "kind: background build finished (exit $$?):"; \
	  tail -n 3 .local/kind-up.log; \
	  $(MAKE) --no-print-directory e2e-kind; kind_rc=$$?; \
	  echo "e2e: local control plane exit $$e2e_rc, kind exit $$kind_rc"; \
	  exit $$(( e2e_rc || kind_rc ))

lint: venv
	$(VENV)/bin/ruff check operator tests hack

# mypy --strict on the pure decision modules ([tool.mypy] in pyproject.toml).
types: venv
	$(VENV)/bin/mypy

# The layer contracts ([tool.importlinter] in pyproject.toml).
contracts: venv
	$(VENV)/bin/lint-imports

# Everything that needs no cluster: lint, types, contracts, unit tests.
check: lint types contracts unit

bench: setup
	$(VPY) hack/bench/run.py $(if $(QUICK),--quick,)

# A seeded churn run against the local control plane with the leader SIGKILLed every
# 1-10 s, two replicas, a conflicting writer and API server pauses; then `volplane check`
# (hack/chaos/chaos.py, docs/reliability.md). Not part of `make test` (>= 10 minutes).
CHAOS_SEED ?= 1
CHAOS_MINUTES ?= 10
chaos: setup
	$(VPY) hack/chaos/chaos.py --seed $(CHAOS_SEED) --minutes $(CHAOS_MINUTES)

# volplane's image (operator + CSI node plugin), built with no pull and no network
# (hack/kind/kind.py: debootstrap root + Debian's python3 + the venv's pinned wheels).
image: setup csi-stubs
	$(VPY) hack/kind/kind.py image

# A kind cluster (control plane + 3 workers) from a node image assembled offline,
# volplane installed from manifests/; prints the kubeconfig (.local/kind/kubeconfig).
kind: setup
	$(VPY) hack/kind/kind.py up

kind-down: venv
	$(VPY) hack/kind/kind.py down

kind-status: venv
	$(VPY) hack/kind/kind.py status

# The e2e suite against the kind cluster (made or reused by the suite itself).
e2e-kind: setup
	$(VPY) -m pytest tests/e2e --kind $(PYTEST_ARGS)

# Upstream's External Storage e2e suites (k8s.io/kubernetes test/e2e at the pinned version)
# against pool.volplane.io on the kind cluster; writes docs/upstream-e2e.md.
# E2E_PROCS (default 2) ginkgo processes; FOCUS/SKIP narrow a run (then the doc is kept).
e2e-upstream: setup
	$(VPY) hack/e2e-upstream/e2e.py run $(if $(E2E_PROCS),--procs $(E2E_PROCS),) \
	  $(if $(FOCUS),--focus '$(FOCUS)' --no-report,) $(if $(SKIP),--skip '$(SKIP)',)

# Only e2e.test, the ginkgo CLI and the test images (cached by version).
e2e-upstream-build: setup
	$(VPY) hack/e2e-upstream/e2e.py build
	$(VPY) hack/e2e-upstream/e2e.py images
