#!/usr/bin/env bash
# Run jobs on a FLARE POC deployment of this machine: prepare it (mTLS certificates, the allow-list and any
# privacy scopes in each site's local/), start it, submit each job in turn through the FLARE API, wait for it,
# download its results, and stop every service, also when a step fails (a job that does not complete stops the
# ones after it).
#
#   bash poc/run_poc.sh [JOB_FOLDER ...]          (default jobs/pfedsam)
#
# Settings: POC_WORKSPACE (default /tmp/pfedsam_poc), POC_SITES (default 3), POC_RESULTS (default poc_results),
# POC_PRIVACY: space-separated SITE=FILE pairs, e.g. "site-3=poc/privacy.json"; POC_STATE_DIR: a folder where every
# site keeps its local partition across jobs (POC_STATE_DIR/<site>), so a later job continues the federation.
set -euo pipefail
job_dirs=("${@:-jobs/pfedsam}")
workspace=${POC_WORKSPACE:-/tmp/pfedsam_poc}
site_options=()  # what `pfedsam poc prepare` configures at the sites
for pair in ${POC_PRIVACY:-}; do site_options+=(--privacy "$pair"); done
if [ -n "${POC_STATE_DIR:-}" ]; then site_options+=(--state-dir "$POC_STATE_DIR"); fi

pfedsam poc prepare --workspace "$workspace" --sites "${POC_SITES:-3}" ${site_options[@]+"${site_options[@]}"}
trap 'pfedsam poc stop --workspace "$workspace"' EXIT
pfedsam poc start --workspace "$workspace"
for job in "${job_dirs[@]}"; do
  pfedsam submit "$job" --poc-workspace "$workspace" --results "${POC_RESULTS:-poc_results}"
done
