#!/usr/bin/env bash
# Installs the real cert-manager (Helm chart from the jetstack repository, CRDs included) and
# the CA ClusterIssuer `lockstep-e2e-ca` of e2e/cert-manager/ca-issuer.yaml, for the e2e test
# `cert_manager` with LOCKSTEP_E2E_CERT_MANAGER=real (e2e/run.sh calls it then; the kind
# workflow sets it). Needs helm and a cluster that can pull cert-manager's images.
#
# --set enableCertificateOwnerRef=true: issued Secrets are owned by their Certificate, so they
# go with the RSM (which owns the Certificates); docs/security.md, "cert-manager".
set -euo pipefail
cd "$(dirname "$0")/.."
version="${CERT_MANAGER_VERSION:-v1.16.2}"
helm repo add jetstack https://charts.jetstack.io --force-update >/dev/null
helm upgrade --install cert-manager jetstack/cert-manager \
  --namespace cert-manager --create-namespace --version "$version" \
  --set crds.enabled=true --set enableCertificateOwnerRef=true --wait --timeout 5m
# The webhook may need a moment after the Deployment is ready before it admits objects.
for _ in $(seq 1 30); do
  if kubectl apply --server-side -f e2e/cert-manager/ca-issuer.yaml; then break; fi
  sleep 5
done
kubectl wait --for=condition=Ready clusterissuer/lockstep-e2e-ca --timeout=120s
