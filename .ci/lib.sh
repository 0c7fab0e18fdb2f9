# Helpers for .ci/run: system packages, loopback services, the test run. Source it.
# shellcheck shell=bash

CI_SUMMARY=()

ci_log() {
  printf '==> %s\n' "$*"
}

ci_note() {
  # Remember a line for the summary printed at the end.
  CI_SUMMARY+=("$*")
}

# tcp_up PORT: true when something accepts a TCP connection on 127.0.0.1:PORT.
tcp_up() {
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# wait_for_port PORT SECONDS: poll once a second, at most SECONDS times.
wait_for_port() {
  local port=$1 seconds=$2 i
  for ((i = 0; i < seconds; i++)); do
    if tcp_up "$port"; then
      return 0
    fi
    sleep 1
  done
  tcp_up "$port"
}

# ensure_apt_packages PKG...: install the Debian packages that are missing, if any.
ensure_apt_packages() {
  local missing=() pkg status
  for pkg in "$@"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "installed" ]]; then
      missing+=("$pkg")
    fi
  done
  if ((${#missing[@]} == 0)); then
    ci_note "apt: already installed: $*"
    return 0
  fi
  ci_log "apt: installing ${missing[*]}"
  # Packages must not start their own daemons here (Dovecot would take port 110);
  # tests start the servers they need with their own configuration.
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
  fi
  local attempt rc=1
  for attempt in 1 2; do
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
      rc=0
      break
    fi
    ci_log "apt: attempt $attempt failed"
    sleep 5
  done
  if ((added_policy)); then
    rm -f "$policy"
  fi
  if ((rc != 0)); then
    ci_note "apt: FAILED to install ${missing[*]}"
    return 1
  fi
  ci_note "apt: installed ${missing[*]}"
}

# prepare_interop_lab: apt packages the interop servers need, then `apt-get download` +
# `dpkg-deb -x` of the conflicting ones into the cache (kept between runs). Never fails
# the run: the interop tests report what is missing.
prepare_interop_lab() {
  local lab=mailpipe/testing/servers/packages.py pkgs
  pkgs=$(python3 "$lab" apt-packages) || { ci_note "interop lab: FAILED to list packages"; return 0; }
  # shellcheck disable=SC2086  # one word per package
  ensure_apt_packages $pkgs || true
  local attempt
  for attempt in 1 2; do
    if python3 "$lab" prepare; then
      ci_note "interop lab: packages unpacked"
      return 0
    fi
    ci_log "interop lab: prepare attempt $attempt failed"
    apt-get update -qq || true
    sleep 5
  done
  ci_note "interop lab: FAILED to unpack the server packages"
}

# ensure_service NAME PORT SECONDS COMMAND...: start NAME with COMMAND unless PORT is up,
# then wait at most SECONDS for it. Never fails the run: tests report a missing server.
ensure_service() {
  local name=$1 port=$2 seconds=$3
  shift 3
  if tcp_up "$port"; then
    ci_note "service $name: up on 127.0.0.1:$port"
    return 0
  fi
  if ! command -v "$1" >/dev/null 2>&1; then
    ci_note "service $name: DOWN (no $1 on this machine)"
    return 0
  fi
  ci_log "service $name: starting"
  local log=/tmp/mailpipe-ci-$name.log
  if ! timeout "$seconds" "$@" >"$log" 2>&1; then
    ci_log "service $name: start command failed (see $log)"
  fi
  if wait_for_port "$port" "$seconds"; then
    ci_note "service $name: started, up on 127.0.0.1:$port"
  else
    ci_note "service $name: DOWN after ${seconds}s (see $log)"
    tail -n 20 "$log" 2>/dev/null || true
  fi
}

# run_tests COMMAND: run COMMAND with bash; pytest's exit 5 (no tests collected) becomes
# 0 with a loud message, everything else is returned as is.
run_tests() {
  local rc=0
  ci_log "running: $1"
  bash -o pipefail -c "$1" || rc=$?
  if ((rc == 5)); then
    printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n'
    printf '!!! pytest collected NO TESTS (exit 5); treated as success by .ci/run  !!!\n'
    printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n'
    ci_note "tests: NO TESTS COLLECTED (pytest exit 5, mapped to 0)"
    return 0
  fi
  if ((rc == 0)); then
    ci_note "tests: passed"
  else
    ci_note "tests: FAILED (exit $rc)"
  fi
  return "$rc"
}

ci_summary() {
  local line
  printf '\n==== .ci/run setup ====\n'
  for line in "${CI_SUMMARY[@]}"; do
    printf '  %s\n' "$line"
  done
}
