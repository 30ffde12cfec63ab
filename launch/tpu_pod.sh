#!/usr/bin/env bash
# Run jaxalign on every worker of an existing TPU VM slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- jaxalign train CONFIG [--set ...]
#
# 1. copies this checkout to every worker (~/jaxalign) and installs it with the TPU extra;
# 2. runs the same command on all workers (one process per host; JAX finds the other hosts from
#    the TPU metadata, so jax.distributed needs no settings);
# 3. writes one log per worker to logs/tpu_pod/<TPU_NAME>/worker_<i>.log and stops on the first
#    failure (gcloud's ssh exits non-zero when any worker does).
# Requires the gcloud CLI, authenticated, with the alpha/beta components not needed.
set -euo pipefail

[ $# -ge 3 ] || { sed -n '2,12p' "$0"; exit 2; }
tpu=$1; zone=$2; shift 2
project_args=()
if [ "$1" != "--" ]; then project_args=(--project "$1"); shift; fi
[ "$1" = "--" ] && shift
command=("$@")

repo=$(cd "$(dirname "$0")/.." && pwd)
logs=logs/tpu_pod/$tpu
mkdir -p "$logs"
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_args[@]}" --worker=all \
    --command "$1"
}

echo "== copying $repo to every worker of $tpu"
tar -C "$repo" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/jaxalign_src.tgz .
gcloud compute tpus tpu-vm scp /tmp/jaxalign_src.tgz "$tpu":/tmp/ --zone "$zone" \
  "${project_args[@]}" --worker=all
ssh_all "mkdir -p ~/jaxalign && tar -xzf /tmp/jaxalign_src.tgz -C ~/jaxalign && \
  cd ~/jaxalign && python3 -m pip install -q -e '.[tpu,gcs]'"

echo "== running on all workers: ${command[*]}"
quoted=$(printf '%q ' "${command[@]}")
# Each worker prefixes its lines with its index; split them into per-worker logs here.
ssh_all "cd ~/jaxalign && w=\$(curl -s -H Metadata-Flavor:Google \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number); \
  $quoted 2>&1 | sed -u \"s/^/[worker \$w] /\"" \
  | tee >(awk -v d="$logs" '{ if (match($0, /^\[worker ([0-9]+)\]/, m)) print > (d "/worker_" m[1] ".log") }')
