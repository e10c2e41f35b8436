"""Repository-wide pytest options (here, at the rootdir, so that they are registered
whichever test directory pytest is pointed at)."""


def pytest_addoption(parser):
    group = parser.getgroup("volplane e2e")
    group.addoption(
        "--kind",
        action="store_true",
        default=False,
        help="run tests/e2e against a kind cluster (hack/kind-config.yaml, name volplane-e2e) "
        "instead of the local upstream control plane (hack/cluster.py); "
        "VOLPLANE_E2E_KUBECONFIG overrides both",
    )
