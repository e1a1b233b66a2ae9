#!/usr/bin/env bash
# Make a self-signed CA and a server certificate it signs, for Arceus' TLS:
#   scripts/make-tls-cert.sh [DIR] [NAME_OR_IP ...]
# writes DIR/ca.pem (give it to clients: --tls-ca), DIR/server.pem and
# DIR/server-key.pem (give them to the market and the workers: --tls-cert,
# --tls-key). DIR defaults to ./tls. The certificate covers localhost and
# 127.0.0.1 plus every NAME_OR_IP given: clients check that the host they dial
# is one of them, so list the names or addresses the servers are reached by.
# Needs the openssl command (Debian: openssl).
set -euo pipefail

dir="${1:-tls}"
[ $# -gt 0 ] && shift
command -v openssl >/dev/null 2>&1 || {
    echo "make-tls-cert: the openssl command is missing (Debian: apt-get install openssl)" >&2
    exit 1
}
mkdir -p "$dir"

san="DNS:localhost,IP:127.0.0.1"
for n in "$@"; do
    if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then
        san+=",IP:$n"
    else
        san+=",DNS:$n"
    fi
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# the CA: a key and a self-signed certificate that may sign others
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
    -subj "/CN=Arceus test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$tmp/ca-key.pem" -out "$dir/ca.pem" 2>/dev/null

# the server: a key, a request, and the certificate the CA signs
openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
    -keyout "$dir/server-key.pem" -out "$tmp/server.csr" 2>/dev/null
cat > "$tmp/ext.cnf" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
openssl x509 -req -in "$tmp/server.csr" -CA "$dir/ca.pem" -CAkey "$tmp/ca-key.pem" \
    -CAcreateserial -CAserial "$tmp/ca.srl" -days 825 -sha256 -extfile "$tmp/ext.cnf" \
    -out "$dir/server.pem" 2>/dev/null
chmod 600 "$dir/server-key.pem"

echo "make-tls-cert: wrote $dir/ca.pem (clients: --tls-ca), $dir/server.pem (--tls-cert)"
echo "make-tls-cert: and $dir/server-key.pem (--tls-key), for $san"
