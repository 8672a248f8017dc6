#!/usr/bin/env bash
# A real single-node SLURM (Debian slurm-wlm 22.05) on localhost for tests and CI. Run as root.
#   .ci/slurm.sh start    write /etc/slurm/slurm.conf, start munged + slurmctld + slurmd, wait for an idle node
#   .ci/slurm.sh stop     scontrol shutdown, stop munged
#   .ci/slurm.sh status   sinfo + squeue
# Packages come from .ci/system-deps.sh. `start` is idempotent: a cluster that is already up is left alone.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
RUNDIR=/run/slurm
TIMEOUT_S=${SLURM_START_TIMEOUT:-60}

die() { echo "slurm.sh: $*" >&2; exit 1; }

log_tails() {
  for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" /var/log/munge/munged.log; do
    [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  return 0
}

# Node states in which the node takes jobs; "mixed"/"allocated" mean it is already up and busy.
node_state() { sinfo -h -o %T 2>/dev/null | head -n1 || true; }
node_ok() { case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac; }

pid_alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

# slurmctld restores the node's last state from StateSaveLocation, so "idle" alone does not prove that the
# slurmd started at epoch second $1 has registered; its SlurmdStartTime does.
slurmd_registered() {
  local t
  t=$(scontrol show node localhost 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
  [ -n "$t" ] && [ "$t" != None ] && [ "$(date -d "$t" +%s 2>/dev/null || echo 0)" -ge "$1" ]
}

start_munge() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
  fi
  if ! pid_alive /run/munge/munged.pid; then
    su -s /bin/sh munge -c /usr/sbin/munged || return 1
  fi
  munge -n </dev/null | unmunge >/dev/null 2>&1
}

write_conf() {  # $1 = auth plugin (munge|none)
  local cpus mem
  cpus=$(nproc)
  # Leave 2 GiB to the OS; slurmd drains a node that reports less memory than configured.
  mem=$(( $(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo) - 2048 ))
  mkdir -p /etc/slurm
  cat >"$CONF" <<EOF
# Written by .ci/slurm.sh: single-node test cluster on localhost.
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/$1
CredType=cred/$1
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s); step credentials are
# checked within milliseconds on one host, so a short lifetime is safe here. 5 is the least slurm accepts.
AuthInfo=cred_expire=5
MpiDefault=none
# No cgroups: works inside containers and VMs without a delegated cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Default loops run every 30/60 s: a requeued job would wait that long after becoming eligible again.
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that gives no --mem takes the whole node and jobs run one at a time.
DefMemPerCPU=$(( mem / cpus ))
# The node is described below (one core per CPU); report that instead of the probed topology,
# so hyperthreaded hosts (2 threads = 1 core) still offer nproc schedulable cores.
SlurmdParameters=config_overrides
ReturnToService=2
# Batch jobs may be requeued (scontrol requeue, submitit's checkpoint/preemption).
JobRequeue=1
PreemptType=preempt/none
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
# Finished jobs stay visible to scontrol/squeue for 5 min (there is no accounting database).
MinJobAge=300
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  [ "$(id -u)" -eq 0 ] || die "start must run as root"
  command -v slurmctld >/dev/null || die "slurmctld not installed: run .ci/system-deps.sh first"
  if pid_alive "$RUNDIR/slurmctld.pid" && pid_alive "$RUNDIR/slurmd.pid" && node_ok; then
    echo "slurm.sh: already up ($(node_state))"; return 0
  fi
  local t0=$SECONDS auth=munge
  mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOGDIR" "$RUNDIR"
  chown slurm:slurm /var/spool/slurmctld "$LOGDIR" "$RUNDIR"
  if ! start_munge; then
    echo "slurm.sh: munge does not work, falling back to AuthType=auth/none" >&2
    auth=none
  fi
  # Rewriting the config under running daemons would desynchronise them: only when they are down.
  pid_alive "$RUNDIR/slurmctld.pid" || pid_alive "$RUNDIR/slurmd.pid" || write_conf "$auth"
  pid_alive "$RUNDIR/slurmctld.pid" || /usr/sbin/slurmctld || { log_tails; die "slurmctld failed to start"; }
  local slurmd_t0=0
  if ! pid_alive "$RUNDIR/slurmd.pid"; then
    slurmd_t0=$(date +%s)
    /usr/sbin/slurmd -N localhost || { log_tails; die "slurmd failed to start"; }
  fi
  local deadline=$(( SECONDS + TIMEOUT_S ))
  until node_ok && slurmd_registered "$slurmd_t0"; do
    case "$(node_state)" in  # a node left down/drained by an earlier run: give it back to the scheduler
      down*|drain*|drained*) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
    esac
    if [ $SECONDS -ge $deadline ]; then
      echo "slurm.sh: node not idle after ${TIMEOUT_S} s (state: '$(node_state)')" >&2
      sinfo -R 2>&1 >&2 || true
      log_tails; exit 1
    fi
    sleep 0.2
  done
  echo "slurm.sh: up in $(( SECONDS - t0 )) s (auth/$auth, $(nproc) CPUs, node $(node_state))"
}

stop() {
  if pid_alive "$RUNDIR/slurmctld.pid"; then
    # Stops slurmctld and every slurmd it knows of.
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  local deadline=$(( SECONDS + 30 ))
  while { pid_alive "$RUNDIR/slurmctld.pid" || pid_alive "$RUNDIR/slurmd.pid"; } && [ $SECONDS -lt $deadline ]; do
    sleep 0.2
  done
  for f in "$RUNDIR/slurmd.pid" "$RUNDIR/slurmctld.pid" /run/munge/munged.pid; do
    if pid_alive "$f"; then kill "$(cat "$f")" 2>/dev/null || true; fi
  done
  deadline=$(( SECONDS + 10 ))
  while pid_alive /run/munge/munged.pid && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  echo "slurm.sh: stopped"
}

status() {
  sinfo || die "slurmctld not reachable (start it with .ci/slurm.sh start)"
  squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
