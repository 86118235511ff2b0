#!/usr/bin/env bash
# Local certificates for trying TLS and mutual TLS (docs/security.md), made with openssl:
#   scripts/gen-certs.sh DIR [NAME...]
# writes DIR/ca.crt + ca.key (a CA), DIR/node.crt + node.key (a server certificate for
# 127.0.0.1, localhost and each NAME given), and DIR/client.crt + client.key (a client
# certificate, common name `client`). Valid for 30 days. For production, use your own CA.
set -euo pipefail

dir="${1:?usage: scripts/gen-certs.sh DIR [NAME...]}"
shift
mkdir -p "$dir"
cd "$dir"

san="IP:127.0.0.1,DNS:localhost"
for name in "$@"; do
    san="$san,DNS:$name"
done

ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 30 -subj "/CN=sagaflow local CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null

leaf() { # leaf NAME CN EXTENSIONS
    openssl req "${ec[@]}" -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
    printf '%b' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" \
        -days 30 -extfile "$1.ext" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
leaf node node "subjectAltName=$san\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
leaf client client "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
chmod 600 ca.key node.key client.key

echo "wrote $dir: ca.crt (give to clients: --ca), node.crt + node.key (--tls-cert, --tls-key),"
echo "client.crt + client.key (--cert, --key; --tls-client-ca ca.crt on the node); names: $san"
