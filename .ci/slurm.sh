#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the integration tests and for trying the SLURM launcher by hand.
#
#   bash .ci/slurm.sh start    # install (Debian packages, first time only), configure, start; waits for an idle node
#   bash .ci/slurm.sh status   # sinfo + squeue
#   bash .ci/slurm.sh stop     # stop slurmd, slurmctld, munged
#
# Needs: Debian (or Ubuntu), root, apt. Does not need systemd: the daemons are started directly. See docs/slurm.md.
# Environment: SLURM_START_TIMEOUT_S (default 60) bounds the wait for the node to become idle.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # daemons and runuser live in sbin, which a non-login root shell may lack

readonly CONF_DIR=/etc/slurm
readonly CONF="$CONF_DIR/slurm.conf"
readonly LOG_DIR=/var/log/slurm
readonly CTLD_SPOOL=/var/spool/slurmctld
readonly SLURMD_SPOOL=/var/spool/slurmd
readonly CTLD_PID=/run/slurmctld.pid
readonly SLURMD_PID=/run/slurmd.pid
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_RUN=/run/munge
readonly MUNGE_PID="$MUNGE_RUN/munged.pid"
readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly SLURMCTLD=/usr/sbin/slurmctld SLURMD=/usr/sbin/slurmd MUNGED=/usr/sbin/munged   # Debian's paths
readonly START_TIMEOUT_S="${SLURM_START_TIMEOUT_S:-60}"
readonly MEMORY_MARGIN_MB=1024   # left to the OS and the daemons; RealMemory above the real total drains the node
CONFIG_CHANGED=0                 # set by write_config

say() { echo "slurm: $*"; }
die() { echo "slurm: ERROR: $*" >&2; exit 1; }

node_name() { hostname -s; }

# pid from a pid file when that process is alive and runs the named program; empty otherwise.
live_pid() {
  local pidfile=$1 program=$2 pid
  [[ -r $pidfile ]] || return 0
  pid=$(tr -dc '0-9' <"$pidfile")
  [[ -n $pid && -r /proc/$pid/comm ]] || return 0
  [[ $(cat "/proc/$pid/comm") == "$program" ]] && echo "$pid"
  return 0
}

require_root() {
  [[ $(id -u) -eq 0 ]] || die "run as root (installs packages and starts system daemons); try: sudo bash $0 $1"
}

install_packages() {
  local missing=()
  [[ -x $SLURMCTLD ]] || missing+=(slurmctld)
  [[ -x $SLURMD ]] || missing+=(slurmd)
  [[ -x /usr/bin/sbatch ]] || missing+=(slurm-client)
  [[ -x $MUNGED ]] || missing+=(munge)
  if [[ ${#missing[@]} -eq 0 ]]; then
    say "packages present ($("$SLURMD" -V))"
    return
  fi
  command -v apt-get >/dev/null || die "apt-get not found: install ${PACKAGES[*]} with this system's package manager"
  say "installing ${PACKAGES[*]} (apt-get)"
  # Keep the packages' maintainer scripts from starting daemons with their default (empty) configuration:
  # policy-rc.d exit code 101 = "action forbidden" (Debian policy, invoke-rc.d). Removed again if we created it.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
  fi
  local rc=0
  {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq -o Acquire::Retries=3 &&
      apt-get install -y -qq -o Acquire::Retries=3 -o Dpkg::Use-Pty=0 --no-install-recommends "${PACKAGES[@]}"
  } >/tmp/slurm-apt.log 2>&1 || rc=$?
  [[ $created_policy -eq 1 ]] && rm -f "$policy"
  if [[ $rc -ne 0 ]]; then
    tail -n 30 /tmp/slurm-apt.log >&2
    die "apt-get install ${PACKAGES[*]} failed (rc=$rc, full log: /tmp/slurm-apt.log)"
  fi
  say "installed $("$SLURMD" -V)"
}

ensure_hostname_resolves() {
  local node
  node=$(node_name)
  if ! getent hosts "$node" >/dev/null; then
    echo "127.0.0.1 $node" >>/etc/hosts
    say "added '127.0.0.1 $node' to /etc/hosts"
  fi
}

start_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
  if [[ ! -s $MUNGE_KEY ]]; then
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    say "created munge key $MUNGE_KEY"
  fi
  chown munge:munge "$MUNGE_KEY"
  chmod 0400 "$MUNGE_KEY"
  if [[ -n $(live_pid "$MUNGE_PID" munged) ]] && munge -n | unmunge >/dev/null 2>&1; then
    say "munged running"
    return
  fi
  say "starting munged"
  runuser -u munge -- "$MUNGED" --pid-file="$MUNGE_PID"
  local _
  for _ in $(seq 1 50); do
    munge -n | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  tail -n 20 /var/log/munge/munged.log >&2 || true
  die "munged does not answer (munge -n | unmunge fails)"
}

# Total memory in MiB, as slurmd counts it (MemTotal).
total_memory_mb() { awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo; }

write_config() {
  local node cpus total_mb real_mb def_mem_per_cpu
  node=$(node_name)
  cpus=$(nproc)
  total_mb=$(total_memory_mb)
  real_mb=$((total_mb > 2 * MEMORY_MARGIN_MB ? total_mb - MEMORY_MARGIN_MB : total_mb / 2))
  def_mem_per_cpu=$((real_mb / cpus))
  install -d -m 0755 "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
  local new
  new=$(mktemp)
  cat >"$new" <<EOF
# Written by .ci/slurm.sh: a single-node test cluster. Rewritten on every start.
ClusterName=ci
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true

# No cgroups: process tracking through /proc, no task binding (works in containers and VMs).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none

# Scheduling: every CPU is a consumable unit, so N one-CPU jobs run side by side.
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (defaults: 60 s main loop, 30 s backfill) so requeued jobs restart promptly.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$def_mem_per_cpu
# Trust the node line below over hardware detection (VMs and containers report odd topologies).
SlurmdParameters=config_overrides

# Preemption / requeue: jobs may be requeued (scontrol requeue, submitit's checkpoint path).
JobRequeue=1
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or hits its time limit.
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60

NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  if [[ -f $CONF ]] && cmp -s "$new" "$CONF"; then
    rm -f "$new"
    CONFIG_CHANGED=0
    say "config unchanged ($CONF: $node, $cpus CPUs, $real_mb MB)"
    return
  fi
  install -m 0644 "$new" "$CONF"
  rm -f "$new"
  CONFIG_CHANGED=1
  say "wrote $CONF ($node, $cpus CPUs, $real_mb MB)"
}

stop_daemon() {
  local pidfile=$1 program=$2 pid _
  pid=$(live_pid "$pidfile" "$program")
  [[ -n $pid ]] || return 0
  kill "$pid"
  for _ in $(seq 1 100); do
    [[ -d /proc/$pid ]] || break
    sleep 0.1
  done
  [[ -d /proc/$pid ]] && kill -9 "$pid"
  rm -f "$pidfile"
  say "stopped $program (pid $pid)"
}

show_logs() {
  local f
  for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
    [[ -r $f ]] || continue
    echo "---- tail $f" >&2
    tail -n 25 "$f" >&2
  done
}

# Node state as sinfo prints it (%t: idle, mix, alloc, down*, drain, ...); empty when slurmctld does not answer.
node_state() { timeout 5 sinfo -h -n "$(node_name)" -o %t 2>/dev/null | head -n 1 || true; }

wait_for_idle_node() {
  local deadline=$((SECONDS + START_TIMEOUT_S)) state="" resumed=0
  while ((SECONDS < deadline)); do
    state=$(node_state)
    case $state in
      idle | mix | alloc | comp) return 0 ;;
      drain* | down | down~ | fail | inval)
        # e.g. left drained by an earlier run: slurmd is up (no '*'), so ask slurmctld to take it back once.
        if ((resumed == 0)); then
          say "node is '$state', resuming it"
          scontrol update NodeName="$(node_name)" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi
        ;;
    esac
    sleep 0.5
  done
  show_logs
  timeout 5 scontrol show node "$(node_name)" >&2 2>&1 || true
  die "node $(node_name) not idle after ${START_TIMEOUT_S} s (state: '${state:-slurmctld not answering}'); logs above"
}

start() {
  require_root start
  local t0=$SECONDS
  install_packages
  ensure_hostname_resolves
  start_munge
  write_config
  if ((CONFIG_CHANGED)); then
    # New or changed node/partition definitions need a restart, not a reconfigure.
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
  fi
  if [[ -z $(live_pid "$CTLD_PID" slurmctld) ]]; then
    say "starting slurmctld"
    "$SLURMCTLD" || { show_logs; die "slurmctld failed to start"; }
  else
    say "slurmctld running"
  fi
  if [[ -z $(live_pid "$SLURMD_PID" slurmd) ]]; then
    say "starting slurmd"
    "$SLURMD" || { show_logs; die "slurmd failed to start"; }
  else
    say "slurmd running"
  fi
  wait_for_idle_node
  say "ready in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D node(s) %t %c CPUs %m MB' | head -n 1)"
}

stop() {
  require_root stop
  stop_daemon "$SLURMD_PID" slurmd
  stop_daemon "$CTLD_PID" slurmctld
  stop_daemon "$MUNGE_PID" munged
  say "stopped"
}

status() {
  command -v sinfo >/dev/null || die "SLURM is not installed (run: bash $0 start)"
  timeout 10 sinfo || die "slurmctld does not answer (run: bash $0 start)"
  timeout 10 squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
