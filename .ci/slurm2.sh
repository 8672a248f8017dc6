#!/usr/bin/env bash
# A real 2-node SLURM (Debian slurm-wlm 22.05) on this one machine, for the multi-node tests. Run as root.
#   .ci/slurm2.sh start          namespaces, config, slurmctld + 2 slurmd; returns once both nodes are idle
#   .ci/slurm2.sh stop           shut the daemons down, kill what is left in the namespaces, delete them and the files
#   .ci/slurm2.sh exec CMD...    run CMD as a client of this cluster (in the head node's namespace, SLURM_CONF set)
#   .ci/slurm2.sh status         sinfo + squeue of this cluster
#   .ci/slurm2.sh logs           tails of the daemon logs
# Packages: those of .ci/system-deps.sh (slurmctld slurmd slurm-client), plus `ip` (iproute2, priority important)
# and nsenter/unshare (util-linux); nothing is installed here. `start` and `stop` are idempotent: a cluster that is
# up is left alone; a half-built one is torn down and rebuilt.
#
# How it is built (why each piece is there):
# - Two network namespaces, $NS0 and $NS1, joined by one veth pair whose ends are both named $IFACE: $NS0 has
#   10.213.0.1/24, $NS1 10.213.0.2/24 (only addresses inside these namespaces; the root namespace gets no address,
#   route or interface). Each has `lo` up.
# - Each node also gets its own UTS namespace (`unshare --uts`), whose hostname is its NodeName, and its own
#   /etc/hosts: /etc/netns/<ns>/hosts (node names -> namespace addresses, the DNS of a real cluster), bind-mounted
#   on /etc/hosts in the daemons' mount namespace (which their jobs inherit) and by `ip netns exec` for clients.
#   So, as on a real cluster, gethostname() is the node name and resolves to the node's address: slurmctld
#   recognises itself as SlurmctldHost, submitit's MASTER_ADDR (the first node of SLURM_JOB_NODELIST) resolves to
#   10.213.0.1 in every task, and gloo binds the namespace's interface by resolving its own hostname, so
#   GLOO_SOCKET_IFNAME is not needed. (Checked: processes with the machine's shared hostname, which resolves to
#   127.0.0.1, make gloo fall back to loopback and connectFullMesh fails across nodes, "remote=[127.0.0.1]"; with
#   GLOO_SOCKET_IFNAME=$IFACE, one name on both nodes, they connect.)
# - Daemons start through nsenter --net + unshare --mount --uts, not `ip netns exec`: that remounts /sys, which hides
#   /sys/fs/cgroup, and slurmd does not start without it.
# - slurmctld and the first slurmd run in $NS0 (a head node that also computes), the second slurmd in $NS1: Debian's
#   slurmd is not a multiple-slurmd build, so one slurmd per namespace, each with its own NodeName/NodeAddr and its
#   own spool/pid/log paths (%n in slurm.conf).
# - A separate cluster: ClusterName=$CLUSTER, slurm.conf under $BASE passed by SLURM_CONF (the daemons and every
#   client read it), own ports (ctld $CTLD_PORT, slurmd $SLURMD_PORT), own state/spool/log/pid files. It shares
#   nothing with .ci/slurm.sh's single-node cluster on localhost (/etc/slurm/slurm.conf), which keeps running.
# - AuthType=auth/none + CredType=cred/none: no munge, so stopping the localhost cluster (which stops munged) cannot
#   break this one. Root only; test use.
# - Clients: slurmctld listens on 10.213.0.1, which only exists inside $NS0, so sbatch/squeue/scontrol/scancel and a
#   submitting `python -m magvit2.train -m ... hydra/launcher=slurm` run there: `.ci/slurm2.sh exec CMD` =
#   `ip netns exec $NS0 env SLURM_CONF=$BASE/slurm.conf CMD`. Jobs see the same filesystem (the namespaces share
#   it), so the venv's python and the test's tmp dirs work unchanged.
set -euo pipefail

BASE=${SLURM2_DIR:-/tmp/magvit2-slurm2}
CONF=$BASE/slurm.conf
CLUSTER=magvit2two
NS0=mv2n0
NS1=mv2n1
ADDR0=10.213.0.1
ADDR1=10.213.0.2
IFACE=mv2eth  # the veth end's name inside each namespace
CTLD_PORT=6917
SLURMD_PORT=6918
TIMEOUT_S=${SLURM_START_TIMEOUT:-60}

die() { echo "slurm2.sh: $*" >&2; exit 1; }

in_ns() { local ns=$1; shift; ip netns exec "$ns" env SLURM_CONF="$CONF" "$@"; }
client() { in_ns "$NS0" "$@"; }

# Start daemons as node $1: its network namespace, plus a new UTS namespace (hostname = node name) and a mount
# namespace with the node's /etc/hosts. The daemons fork away and keep the namespaces.
on_node() {
  nsenter --net="/run/netns/$1" unshare --mount --uts --propagation slave \
    env SLURM_CONF="$CONF" sh -c "mount --bind /etc/netns/$1/hosts /etc/hosts && hostname $1 && $2"
}

pid_alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }
ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

idle_nodes() { client sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /^(idle|mixed|allocated|completing)$/' | wc -l; }

# slurmctld state is fresh on every start, but a slurmd must also have registered since it was started.
registered() {
  local n t
  for n in "$NS0" "$NS1"; do
    t=$(client scontrol show node "$n" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
    [ -n "$t" ] && [ "$t" != None ] && [ "$(date -d "$t" +%s 2>/dev/null || echo 0)" -ge "$1" ] || return 1
  done
}

logs() {
  for f in "$BASE"/log/*.log; do
    [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  return 0
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( ($(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo) - 2048) / 2 ))  # each node: half the machine
  cat >"$CONF" <<EOF
# Written by .ci/slurm2.sh: 2-node test cluster, one node per network namespace.
ClusterName=$CLUSTER
SlurmctldHost=$NS0($ADDR0)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( mem / cpus ))
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
PreemptType=preempt/none
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
# Both nodes share the machine's cores: each offers all of them (tests ask for 1 CPU per task).
NodeName=$NS0 NodeAddr=$ADDR0 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
NodeName=$NS1 NodeAddr=$ADDR1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NS0,$NS1 Default=YES MaxTime=INFINITE State=UP
EOF
}

make_netns() {
  ip netns add "$NS0"
  ip netns add "$NS1"
  ip link add "$NS0-e" type veth peer name "$NS1-e"
  ip link set "$NS0-e" netns "$NS0"
  ip link set "$NS1-e" netns "$NS1"
  ip -n "$NS0" addr add "$ADDR0/24" dev "$NS0-e"
  ip -n "$NS1" addr add "$ADDR1/24" dev "$NS1-e"
  local ns
  for ns in "$NS0" "$NS1"; do
    ip -n "$ns" link set "$ns-e" name "$IFACE"  # one name on every node, as eth0/ib0 on a real cluster
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$IFACE" up
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$ADDR0" "$NS0" "$ADDR1" "$NS1" >"/etc/netns/$ns/hosts"
  done
}

up() {
  ns_exists "$NS0" && ns_exists "$NS1" && pid_alive "$BASE/run/slurmctld.pid" \
    && pid_alive "$BASE/run/slurmd-$NS0.pid" && pid_alive "$BASE/run/slurmd-$NS1.pid" && [ "$(idle_nodes)" -eq 2 ]
}

start() {
  [ "$(id -u)" -eq 0 ] || die "start must run as root"
  command -v slurmctld >/dev/null || die "slurmctld not installed: run .ci/system-deps.sh first"
  command -v ip >/dev/null || die "ip (iproute2) not installed"
  if up; then echo "slurm2.sh: already up"; return 0; fi
  local t0=$SECONDS
  stop >/dev/null  # whatever is left of an earlier, half-built cluster
  mkdir -p "$BASE"/{state,log,run} "$BASE/spool/$NS0" "$BASE/spool/$NS1"
  write_conf
  make_netns
  local slurmd_t0
  slurmd_t0=$(date +%s)
  on_node "$NS0" "/usr/sbin/slurmctld && /usr/sbin/slurmd -N $NS0" || { logs; die "slurmctld/slurmd on $NS0 failed"; }
  on_node "$NS1" "/usr/sbin/slurmd -N $NS1" || { logs; die "slurmd on $NS1 failed to start"; }
  local deadline=$(( SECONDS + TIMEOUT_S ))
  until [ "$(idle_nodes)" -eq 2 ] && registered "$slurmd_t0"; do
    if [ $SECONDS -ge $deadline ]; then
      echo "slurm2.sh: 2 nodes not idle after ${TIMEOUT_S} s" >&2
      client sinfo -N -l >&2 || true; client sinfo -R >&2 || true
      logs; exit 1
    fi
    sleep 0.2
  done
  echo "slurm2.sh: up in $(( SECONDS - t0 )) s ($NS0=$ADDR0 with slurmctld, $NS1=$ADDR1; SLURM_CONF=$CONF)"
}

stop() {
  [ "$(id -u)" -eq 0 ] || die "stop must run as root"
  if ns_exists "$NS0" && pid_alive "$BASE/run/slurmctld.pid"; then
    client scontrol shutdown >/dev/null 2>&1 || true  # slurmctld and every slurmd
    local deadline=$(( SECONDS + 15 ))
    while { pid_alive "$BASE/run/slurmctld.pid" || pid_alive "$BASE/run/slurmd-$NS0.pid" \
            || pid_alive "$BASE/run/slurmd-$NS1.pid"; } && [ $SECONDS -lt $deadline ]; do
      sleep 0.2
    done
  fi
  local ns pid f
  for f in "$BASE"/run/*.pid; do
    [ -f "$f" ] && pid_alive "$f" && kill -9 "$(cat "$f")" 2>/dev/null || true
  done
  for ns in "$NS0" "$NS1"; do
    if ns_exists "$ns"; then
      # Whatever still runs in the namespace (job steps, slurmstepd) is this cluster's: end it by pid.
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns" || true  # deletes the veth pair with it
    fi
    rm -rf "/etc/netns/$ns"
  done
  rmdir /etc/netns 2>/dev/null || true
  rm -rf "$BASE"
  echo "slurm2.sh: stopped"
}

status() {
  client sinfo -N || die "slurmctld not reachable (start it with .ci/slurm2.sh start)"
  client squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  logs) logs ;;
  exec) shift; [ $# -gt 0 ] || die "usage: $0 exec CMD..."; exec ip netns exec "$NS0" env SLURM_CONF="$CONF" "$@" ;;
  *) echo "usage: $0 start|stop|status|logs|exec CMD..." >&2; exit 2 ;;
esac
