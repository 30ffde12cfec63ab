#!/usr/bin/env bash
# Run N jaxalign processes on this machine, each with simulated CPU devices, joined through a
# coordinator on localhost - the way the multi-host tests do it.
#
#   launch/local_multiprocess.sh N [--devices-per-process D] -- jaxalign train CONFIG [--set ...]
#
# Logs go to RUN_LOGS (default: logs/local_multiprocess/process_<i>.log). The script stops every
# process as soon as one fails and exits with that process's status.
set -euo pipefail

usage() { sed -n '2,9p' "$0"; exit 2; }
[ $# -ge 1 ] || usage
num=$1; shift
per_process=4
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --devices-per-process) per_process=$2; shift 2 ;;
    *) usage ;;
  esac
done
[ "${1:-}" = "--" ] && shift
[ $# -ge 1 ] || usage

logs=${RUN_LOGS:-logs/local_multiprocess}
mkdir -p "$logs"
port=${JAXALIGN_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

for ((i = 0; i < num; i++)); do
  JAX_PLATFORMS=cpu \
  JAXALIGN_COORDINATOR="127.0.0.1:$port" JAXALIGN_NUM_PROCESSES=$num JAXALIGN_PROCESS_ID=$i \
  JAXALIGN_CPU_DEVICES=$per_process \
    "$@" >"$logs/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $num processes x $per_process devices (coordinator 127.0.0.1:$port); logs in $logs/"

status=0
remaining=$num
while [ $remaining -gt 0 ]; do
  if wait -n; then
    remaining=$((remaining - 1))
  else
    status=$?
    echo "a process failed with status $status; stopping the others" >&2
    break
  fi
done
[ $status -eq 0 ] && trap - EXIT
tail -n 3 "$logs/process_0.log"
exit $status
