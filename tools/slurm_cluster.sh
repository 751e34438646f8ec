#!/bin/bash
# A real multi-node (default two) Slurm test cluster on this one machine (Debian 12, slurm-wlm 22.05), for CI and docs.
#
#   tools/slurm_cluster.sh start DIR     install packages if missing, start munge, MariaDB + slurmdbd
#                                        (sacct), slurmctld and slurmd "nodes" n1, n2 (NODES) on loopback;
#                                        returns once all nodes are idle. Prints `export SLURM_CONF=...`.
#   tools/slurm_cluster.sh stop DIR      cancel our jobs, stop every daemon we started, by PID.
#   tools/slurm_cluster.sh env DIR       print `export SLURM_CONF=DIR/etc/slurm.conf`.
#
# Needs root (daemons run as root or munge/mysql, like on a real cluster) but no systemd: every daemon is
# started in the foreground (-D) in the background, its PID is written to DIR/pids, and `stop` kills
# exactly those PIDs in reverse order. Nothing is written outside DIR except the apt install and, when no
# munged answers yet, /etc/munge/munge.key and a munged on /run/munge (its PID in DIR/pids: `stop` ends it,
# also for another cluster started after this one, which then loses authentication).
# Environment:
#   PORT_BASE  (default 17800): slurmctld PORT_BASE+17, slurmdbd +19, slurmd n1, n2, ... +21, +22, ..., MariaDB +6,
#              so several clusters (or a site's real one) can share the machine.
#   WITH_DBD   (default 1): 0 skips MariaDB + slurmdbd (sacct then reports accounting as disabled).
#   CRED_EXPIRE (default 5, the minimum): seconds a requeued job waits before it may start again
#              (Slurm's default is 120).
#   NODE_CPUS  (default 1): CPUs each node advertises.
#   NODES      (default 2): number of slurmd "nodes" n1..nN (ports PORT_BASE+21 ...).
set -euo pipefail

APT_PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

die() { echo "slurm_cluster: $*" >&2; exit 2; }

install_packages() {
  local missing=0
  for b in slurmctld slurmd sbatch munged slurmdbd mariadbd; do command -v "$b" >/dev/null || missing=1; done
  [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/munged ] && [ -x /usr/sbin/slurmdbd ] && [ -x /usr/sbin/mariadbd ] \
    && [ "$missing" = 0 ] && return 0
  # exit status 3: Slurm is missing and cannot be installed here (the tests skip on that, and only that)
  command -v apt-get >/dev/null || { echo "slurm_cluster: Slurm is not installed and apt-get is not available" >&2; exit 3; }
  echo "slurm_cluster: installing $APT_PACKAGES" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $APT_PACKAGES; } >&2 \
    || { echo "slurm_cluster: apt-get could not install $APT_PACKAGES" >&2; exit 3; }
}

wait_for() {  # $1 = seconds, rest = command that must succeed
  local secs=$1; shift
  for _ in $(seq $((secs * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  return 1
}

nodes_idle() {
  local states
  states=$(timeout 3 sinfo -h -N -o %T 2>/dev/null) || return 1
  [ -n "$states" ] && [ -z "$(echo "$states" | grep -v '^idle$')" ]
}

start() {
  local W=$1
  [ "$(id -u)" = 0 ] || die "must run as root (starts slurmctld/slurmd/munged)"
  [ -e "$W/pids" ] && die "$W/pids exists: a cluster seems to be running there; run '$0 stop $W' first"
  install_packages
  local PB=${PORT_BASE:-17800} DBD=${WITH_DBD:-1} CE=${CRED_EXPIRE:-5} NC=${NODE_CPUS:-1} NN=${NODES:-2}
  [[ "$NN" =~ ^[1-9]$ ]] || die "NODES must be 1-9, got '$NN'"
  [[ "$CE" =~ ^[0-9]+$ ]] && [ "$CE" -ge 5 ] || die "CRED_EXPIRE must be at least 5 (slurmctld ignores less), got '$CE'"
  rm -rf "$W"; mkdir -p "$W"/{etc,state,spool,log,db}
  W=$(cd "$W" && pwd)
  : > "$W/pids"
  trap 'echo "slurm_cluster: start failed, stopping what was started" >&2; stop "$W"' EXIT
  echo "$PB" > "$W/port_base"

  # munge: reuse a munged already answering on the standard socket (one key per machine), else start one
  local MS=/run/munge/munge.socket.2
  if ! (munge -n | unmunge) >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || { /usr/sbin/mungekey --create; chown munge:munge /etc/munge/munge.key; }
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged -F >/dev/null 2>&1 &
    echo $! >> "$W/pids"
    wait_for 20 bash -c "munge -n | unmunge" || die "munged did not start (see /var/log/munge/munged.log)"
  fi

  local H; H=$(hostname)
  local ACCT="AccountingStorageType=accounting_storage/none" GATHER=none
  if [ "$DBD" = 1 ]; then
    chown mysql:mysql "$W/db"
    runuser -u mysql -- test -x "$W/db" || die "user mysql cannot enter $W/db: make its parent directories world-executable"
    mariadb-install-db --user=mysql --datadir="$W/db/data" --auth-root-authentication-method=socket \
      > "$W/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $W/log/mariadb-install.log)"
    mariadbd --user=mysql --datadir="$W/db/data" --socket="$W/db/sock" --bind-address=127.0.0.1 \
      --port=$((PB + 6)) --pid-file="$W/db/pid" --log-error="$W/db/err.log" --skip-log-bin >/dev/null 2>&1 &
    echo $! >> "$W/pids"
    wait_for 60 mariadb -S "$W/db/sock" -e 'select 1' || die "MariaDB did not start (see $W/db/err.log)"
    mariadb -S "$W/db/sock" -e "DROP USER IF EXISTS ''@'localhost'; DROP USER IF EXISTS ''@'$H';
      CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    cat > "$W/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PB + 19))
SlurmUser=root
LogFile=$W/log/slurmdbd.log
PidFile=$W/state/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PB + 6))
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$W/etc/slurmdbd.conf"   # slurmdbd refuses a readable conf holding a password
    ACCT=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n'"AccountingStoragePort=$((PB + 19))"
    GATHER=linux
  fi

  cat > "$W/etc/slurm.conf" <<EOF
ClusterName=launchtest
SlurmctldHost=$H(127.0.0.1)
SlurmctldPort=$((PB + 17))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$CE
CredType=cred/munge
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool/%n
SlurmctldPidFile=$W/state/slurmctld.pid
SlurmdPidFile=$W/spool/slurmd.%n.pid
SlurmctldLogFile=$W/log/slurmctld.log
SlurmdLogFile=$W/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
$ACCT
JobAcctGatherType=jobacct_gather/$GATHER
$(for i in $(seq "$NN"); do echo "NodeName=n$i NodeHostname=$H NodeAddr=127.0.0.1 Port=$((PB + 20 + i)) CPUs=$NC RealMemory=4000"; done)
PartitionName=debug Nodes=n[1-$NN] Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$W/etc/slurm.conf

  if [ "$DBD" = 1 ]; then
    slurmdbd -D >/dev/null 2>&1 &
    echo $! >> "$W/pids"
    # slurmctld must not start before slurmdbd answers ("we have no TRES from it")
    wait_for 30 timeout 3 sacctmgr -n list cluster || die "slurmdbd did not answer (see $W/log/slurmdbd.log)"
  fi
  slurmctld -D -i >/dev/null 2>&1 &
  echo $! >> "$W/pids"
  wait_for 30 bash -c "timeout 3 scontrol ping | grep -q UP" || die "slurmctld did not come up (see $W/log/slurmctld.log)"
  for i in $(seq "$NN"); do
    slurmd -D -N "n$i" >/dev/null 2>&1 &
    echo $! >> "$W/pids"
  done
  wait_for 60 nodes_idle || { sinfo -N >&2; die "nodes not idle (see $W/log/slurmd.n1.log)"; }
  trap - EXIT
  echo "export SLURM_CONF=$W/etc/slurm.conf"
}

descendants() {  # PIDs below $1, deepest first
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do descendants "$c"; echo "$c"; done
}

stop() {
  local W=$1
  [ -s "$W/pids" ] || { echo "slurm_cluster: nothing running in $W" >&2; return 0; }
  W=$(cd "$W" && pwd)
  export SLURM_CONF=$W/etc/slurm.conf
  # end our jobs first, so no job step outlives its slurmd (KillWait=5 bounds the wait)
  if timeout 5 scancel --quiet --user=root 2>/dev/null; then
    for _ in $(seq 40); do [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  mapfile -t P < "$W/pids"
  # slurmstepd processes (and their tasks) that still belong to this cluster, by its config path
  local left=()
  for p in $(pgrep -x slurmstepd 2>/dev/null); do
    grep -qs "$W/etc/slurm.conf" "/proc/$p/environ" && left+=($(descendants "$p") "$p")
  done
  for ((i=${#P[@]}-1; i>=0; i--)); do kill "${P[$i]}" 2>/dev/null || true; done
  for p in "${P[@]}"; do
    for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$p" 2>/dev/null || true
  done
  for p in "${left[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -f "$W/pids"
}

case "${1:-}" in
  start) [ -n "${2:-}" ] || die "usage: $0 start DIR"; start "$2" ;;
  stop)  [ -n "${2:-}" ] || die "usage: $0 stop DIR"; stop "$2" ;;
  env)   [ -n "${2:-}" ] || die "usage: $0 env DIR"; echo "export SLURM_CONF=$(cd "$2" && pwd)/etc/slurm.conf" ;;
  *) die "usage: $0 {start|stop|env} DIR" ;;
esac
