#!/usr/bin/env bash
# Regenerates the TLS fixtures of walcore's replication client tests (conn/tls.rs, conn.rs):
# a CA, certificates it signs for a server and a client, and a second, unrelated CA. Valid for
# 100 years; the CA keys are not kept. Run from this directory.
set -euo pipefail
days=36500
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ca() { # name subject
    openssl req -x509 "${ec[@]}" -keyout "$tmp/$1.key" -out "$1.crt" -days $days -subj "/CN=$2" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
leaf() { # name ca subject extensions
    openssl req -new "${ec[@]}" -keyout "$1.key" -out "$tmp/$1.csr" -subj "/CN=$3"
    printf '%s\n' "$4" >"$tmp/$1.ext"
    openssl x509 -req -in "$tmp/$1.csr" -CA "$2.crt" -CAkey "$tmp/$2.key" -CAcreateserial \
        -CAserial "$tmp/$2.srl" -days $days -out "$1.crt" -extfile "$tmp/$1.ext"
    chmod 600 "$1.key"
}

ca ca "walcore test CA"
ca other-ca "walcore other test CA"
server_ext='basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth'
leaf server ca localhost "subjectAltName=DNS:localhost,IP:127.0.0.1
$server_ext"
leaf elsewhere ca db.example.test "subjectAltName=DNS:db.example.test
$server_ext"
leaf stranger other-ca db.example.test "subjectAltName=DNS:db.example.test
$server_ext"
leaf client ca tester 'basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth'
# The CA's own certificate and key as a server would misuse them.
cp "$tmp/ca.key" ca-as-server.key
chmod 600 ca-as-server.key
openssl pkey -in client.key -aes256 -passout pass:secret -out client-encrypted.key
chmod 600 client-encrypted.key
