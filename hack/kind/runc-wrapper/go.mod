module volplane.io/hack/kind/runc-wrapper

go 1.26
