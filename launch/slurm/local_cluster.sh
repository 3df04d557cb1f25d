#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for trying and testing
# launch/slurm/train.sbatch (Debian/Ubuntu, run as root):
#
#   bash launch/slurm/local_cluster.sh && srun -n 2 hostname
#
# Installs slurm-wlm and munge (if missing), creates a munge key (if missing),
# starts munged, writes /etc/slurm/slurm.conf for this host (one node, one
# partition `debug`), starts slurmctld and slurmd, and waits until the node is
# idle. Idempotent: running it again with everything up changes nothing (the
# config is rewritten only if it differs, and then the daemons are restarted).
# Exits non-zero with one `local_cluster: ...` line if a step fails.
set -uo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
WAIT_SECONDS=${LOCAL_CLUSTER_WAIT:-60}

die() {
  echo "local_cluster: $*" >&2
  exit 1
}

[[ $(id -u) -eq 0 ]] ||
  die "must run as root (it installs packages and starts daemons)"

# --- packages ---------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
   ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed"
  # Keep the maintainer scripts from starting the daemons (there is no
  # slurm.conf yet; this script starts them itself): a policy-rc.d that
  # denies, unless the system has one (containers usually do).
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" &&
      own_policy=1
  fi
  apt-get install -y -qq -o Dpkg::Options::=--force-confold \
      slurm-wlm munge >/tmp/local_cluster_apt.log 2>&1
  installed=$?
  [[ $own_policy -eq 1 ]] && rm -f "$policy"
  [[ $installed -eq 0 ]] || die "apt-get install slurm-wlm munge failed" \
      "(see /tmp/local_cluster_apt.log)"
fi
id munge >/dev/null 2>&1 ||
  die "the munge user does not exist after installing munge"

# --- munge ------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 ||
      die "mungekey could not create /etc/munge/munge.key"
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none ||
      die "could not create /etc/munge/munge.key"
  fi
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2
  runuser -u munge -- /usr/sbin/munged ||
    die "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 20); do munge_ok && break; sleep 0.5; done
  munge_ok || die "munge credentials do not round-trip (munge -n | unmunge)"
fi

# --- slurm.conf ---------------------------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
REAL_MEMORY=$(( MEM_MB < 8000 ? MEM_MB : 8000 ))
getent hosts "$HOST" >/dev/null ||
  die "host name $HOST does not resolve; add it to /etc/hosts"

install -d -m 0755 "$CONF_DIR" "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
NEW_CONF=$(cat <<EOF
# Written by launch/slurm/local_cluster.sh: a single-node cluster on $HOST.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups in containers: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that was down comes back by itself; requeued jobs run again.
ReturnToService=2
JobRequeue=1
# Seconds between SIGTERM and SIGKILL when a job is cancelled or preempted.
KillWait=30
MpiDefault=none
SlurmdParameters=config_overrides
NodeName=$HOST CPUs=$CPUS RealMemory=$REAL_MEMORY State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
)
restart=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$NEW_CONF" ]]; then
  printf '%s\n' "$NEW_CONF" >"$CONF" || die "cannot write $CONF"
  restart=1
fi

# --- daemons ----------------------------------------------------------------
alive() { ps -p "$1" -o stat= 2>/dev/null | grep -qv '^Z'; }  # not a zombie
running() { ps -C "$1" -o stat= 2>/dev/null | grep -qv '^Z'; }
stop() {  # stop daemon $1 (started by an earlier run of this script)
  local pid
  pid=$(cat "/run/$1.pid" 2>/dev/null) || return 0
  alive "$pid" || return 0
  kill "$pid" 2>/dev/null
  for _ in $(seq 40); do alive "$pid" || return 0; sleep 0.5; done
  die "$1 (pid $pid) did not stop within 20 s"
}
if [[ $restart -eq 1 ]]; then
  stop slurmd
  stop slurmctld
fi
if ! running slurmctld; then
  slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
fi
if ! running slurmd; then
  slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
fi

# --- wait for the node --------------------------------------------------------
state=""
for _ in $(seq $((WAIT_SECONDS * 2))); do
  state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -n1)
  case $state in
    idle|mixed|allocated) break ;;
    down*|drain*)  # e.g. left down by an earlier run: bring it back
      scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 ;;
  esac
  sleep 0.5
done
case $state in
  idle|mixed|allocated) ;;
  *) die "node $HOST is '${state:-not reported}' after ${WAIT_SECONDS}s," \
         "not idle (see $LOG_DIR/slurmctld.log and slurmd.log)" ;;
esac
echo "local_cluster: node $HOST ($CPUS CPUs, ${REAL_MEMORY} MB) is $state" \
  "in partition debug"
