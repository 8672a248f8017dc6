#!/usr/bin/env bash
# Debian system packages the tests need: a real SLURM (slurm-wlm 22.05) + munge, and chromium for the
# MLflow UI browser test (Python playwright drives /usr/bin/chromium via executable_path; no `playwright install`),
# iproute2 + util-linux (ip netns, nsenter, unshare) for the 2-node SLURM in network namespaces (.ci/slurm2.sh).
# Idempotent: does nothing when everything is already installed. Run as root.
set -euo pipefail
PKGS=(slurmctld slurmd slurm-client munge chromium iproute2 util-linux)
t0=$(date +%s)
if [ "$(id -u)" -ne 0 ]; then echo "system-deps.sh: must run as root" >&2; exit 1; fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system-deps: all installed (${PKGS[*]})"
else
  echo "system-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # -qq keeps the log short; errors still go to stderr and fail the script (set -e).
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    2> >(grep -v 'apt-utils is not installed' >&2)
fi
echo "system-deps: done in $(( $(date +%s) - t0 )) s"
