#!/usr/bin/env bash
# Start SCRIPT once per node listed in HOSTFILE (OpenMPI), e.g. on the first host of the hostfile:
#   bash mpirun.sh hostfile train-multi-node.sh [solver_train.py flags...]
# Every copy gets OMPI_COMM_WORLD_RANK/SIZE (its node rank and the node count), MASTER_ADDR (the first host
# of the hostfile; also as _MASTER_ADDR, which Llama-RLHF's scripts read) and MASTER_PORT; train-multi-node.sh
# turns them into one torchrun per node.
# The repository (and the Python environment) must sit at the same path on every node.
#
# Environment (all optional):
#   MASTER_ADDR   address of node rank 0 as the other nodes reach it (default: first host of HOSTFILE)
#   MASTER_PORT   torchrun's rendezvous port on that host (default 29500)
#   NET_IFACE     network interface for MPI's own traffic, NCCL and gloo (e.g. eth0, ib0; default: any)
#   SSH_PORT      ssh port of the other nodes (default: ssh's own default)
#   MPIRUN        the mpirun binary (default mpirun)
#   MPIRUN_ARGS   extra mpirun options, split on spaces (e.g. "--oversubscribe --mca btl ^openib")
#   EXPORT_VARS   names of further environment variables to pass to every node, split on spaces
# PATH, LD_LIBRARY_PATH, PYTHONPATH, PYTHON, NPROC_PER_NODE, MAX_RESTARTS, OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES
# and every NCCL_*, GLOO_*, TORCH_*, HF_* and LLAMA_RLHF_* variable that is set are passed on as well.
# The exit status is the script's (the first non-zero one among the nodes).
set -euo pipefail

print_usage() {
  echo "usage: bash mpirun.sh HOSTFILE SCRIPT [ARGS...]"
  echo "  HOSTFILE: OpenMPI hostfile, one 'ADDRESS slots=1' line per node (see the hostfile in this repo)"
  echo "  SCRIPT:   bash script run once per node (e.g. train-multi-node.sh); ARGS are passed to it"
  echo "  environment: MASTER_ADDR MASTER_PORT NET_IFACE SSH_PORT MPIRUN MPIRUN_ARGS EXPORT_VARS (see mpirun.sh)"
}

usage() {
  print_usage >&2
  echo "error: $*" >&2
  exit 2
}

case "${1:-}" in
  -h | --help) print_usage; exit 0 ;;
esac

[ "$#" -ge 2 ] || usage "need a HOSTFILE and a SCRIPT"
hostfile="$1"
script="$2"
shift 2
[ -f "$hostfile" ] || usage "hostfile not found: $hostfile"
[ -f "$script" ] || usage "script not found: $script"

# Hosts and slots (launcher processes per host, 1 per node; slots=K starts K node ranks on that machine).
first_host=""
nhosts=0
nslots=0
while read -r host rest || [ -n "$host" ]; do
  host="${host%%#*}"
  [ -n "$host" ] || continue
  slots=1
  read -r -a fields <<<"$rest"
  for field in "${fields[@]}"; do
    case "$field" in
      "#"*) break ;;
      slots=*) slots="${field#slots=}" ;;
    esac
  done
  case "$slots" in
    '' | *[!0-9]* | 0) usage "$hostfile: bad slot count for $host: '$slots'" ;;
  esac
  if [ -z "$first_host" ]; then first_host="$host"; fi
  nhosts=$((nhosts + 1))
  nslots=$((nslots + slots))
done <"$hostfile"
[ "$nhosts" -gt 0 ] || usage "hostfile lists no hosts: $hostfile"

export MASTER_ADDR="${MASTER_ADDR:-$first_host}"
export MASTER_PORT="${MASTER_PORT:-29500}"
# Llama-RLHF's train-multi-node.sh reads the master address from _MASTER_ADDR: the same value, so it runs unchanged.
export _MASTER_ADDR="$MASTER_ADDR"
script_path="$(cd "$(dirname "$script")" && pwd)/$(basename "$script")"

args=(--hostfile "$hostfile" -np "$nslots" --map-by slot --bind-to none --wdir "$PWD")
# torchrun shares the node out among its workers itself: binding the launcher to one core would pin them all.
if [ "$(id -u)" = 0 ]; then args+=(--allow-run-as-root); fi
if [ -n "${NET_IFACE:-}" ]; then
  args+=(--mca btl_tcp_if_include "$NET_IFACE" --mca oob_tcp_if_include "$NET_IFACE")
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$NET_IFACE}"
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NET_IFACE}"
fi
if [ -n "${SSH_PORT:-}" ]; then args+=(--mca plm_rsh_args "-p $SSH_PORT"); fi

names=(PATH LD_LIBRARY_PATH PYTHONPATH PYTHON MASTER_ADDR _MASTER_ADDR MASTER_PORT NPROC_PER_NODE MAX_RESTARTS
  OMP_NUM_THREADS CUDA_VISIBLE_DEVICES)
while read -r name; do
  case "$name" in NCCL_* | GLOO_* | TORCH_* | HF_* | LLAMA_RLHF_*) names+=("$name") ;; esac
done < <(compgen -e)
read -r -a extra_names <<<"${EXPORT_VARS:-}"
names+=("${extra_names[@]}")
for name in "${names[@]}"; do
  if [ -n "${!name+set}" ]; then args+=(-x "$name"); fi
done

read -r -a extra_args <<<"${MPIRUN_ARGS:-}"
echo "mpirun.sh: $nslots node rank(s) on $nhosts host(s) from $hostfile, master $MASTER_ADDR:$MASTER_PORT" >&2
exec "${MPIRUN:-mpirun}" "${args[@]}" "${extra_args[@]}" bash "$script_path" "$@"
