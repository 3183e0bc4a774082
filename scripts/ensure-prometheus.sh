#!/usr/bin/env bash
# Installs the Prometheus server and promtool (Debian package `prometheus`) when missing:
# tests/test_prometheus.py scrapes the real daemon with them, and checks the shipped
# rules (deploy/prometheus/vmpower-rules.yml) and a scrape with `promtool`.
# Only installs: the package's own service is not started here (without systemd it is
# not started at all), the tests run their own server on loopback with a private data
# directory. A second run does nothing. Exit 0: both commands are there; 1: they could
# not be installed (the tests then skip and say why).
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "vmpower: installing prometheus needs root; run this script as root" >&2
    exit 1
fi
echo "vmpower: installing the Debian package prometheus (server and promtool)"
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: the package's postinst must not start a system-wide server.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
fi
status=0
{ apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
    || status=$?
if [ "$own_policy" -eq 1 ]; then
    rm -f "$policy"
fi
if [ "$status" -ne 0 ] || ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null
then
    echo "vmpower: the package prometheus could not be installed (apt-get status $status)" >&2
    exit 1
fi
