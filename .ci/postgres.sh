#!/usr/bin/env bash
# The PostgreSQL server binaries (initdb, pg_ctl) the ledger tests start a throwaway server with, installed when
# absent; a machine where this cannot install them still runs the suite, those tests skip and say why.
set -uo pipefail
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
} || echo "postgresql not installed: the PostgreSQL ledger tests will skip" >&2
exit 0
