#!/bin/sh
# Makes what deploy/base mounts from Secrets: a CA, the services' certificates and the
# grant secret, into DIR, then prints the `kubectl create secret` commands that load them.
#
#   deploy/make-certs.sh DIR            # then run the printed commands
#
# For a quick start or a test cluster. In production let cert-manager issue and renew the
# certificates (deploy/components/cert-manager makes the same Secrets); the services re-read their
# certificate files when the Secret changes.
#
# Environment:
#   NAMESPACE      the namespace the manifest is applied in (linkedblob); the services' DNS names
#                  in the certificates are <service>.<NAMESPACE>.svc[.cluster.local]
#   GATEWAY_NAMES  extra DNS names of the gateway for clients outside (e.g. registry.example.com)
#   BLOB_NAMES     extra DNS names of blobsvc's direct port for clients outside
#   LINK_NAMES     extra DNS names of linksvc (BLOB_NAMES, LINK_NAMES and GATEWAY_NAMES set to
#                  localhost make certificates for a protected stack on one machine)
#   DAYS           validity of the services' certificates (365); the CA's is 10 years
#
# Identities (what blobsvc's and linksvc's --allow-gateway / --allow-collector name) are DNS SANs
# of the client certificates: gateway.<NAMESPACE>.svc and collector.<NAMESPACE>.svc. Server
# certificates carry clientAuth too: the exec probe presents the pod's own certificate.
set -eu

DIR=${1:?usage: $0 DIR}
NAMESPACE=${NAMESPACE:-linkedblob}
DAYS=${DAYS:-365}
NS=$NAMESPACE

umask 077
mkdir -p "$DIR"

key() { # a P-256 key in PKCS#8 PEM
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

# The DNS names of a Service in the namespace: short, namespaced, and fully qualified.
svc_names() {
    printf 'DNS:%s,DNS:%s.%s,DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local' \
        "$1" "$1" "$NS" "$1" "$NS" "$1" "$NS"
}

# extra_names "a.example.com,b.example.com" -> ",DNS:a.example.com,DNS:b.example.com"
extra_names() {
    [ -n "$1" ] || return 0
    printf '%s\n' "$1" | tr ',' '\n' | while read -r name; do
        [ -n "$name" ] && printf ',DNS:%s' "$name"
    done
}

if [ ! -f "$DIR/ca.key" ]; then
    key "$DIR/ca.key"
    openssl req -x509 -new -key "$DIR/ca.key" -sha256 -days 3650 \
        -subj "/O=linkedblob/CN=linkedblob internal CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$DIR/ca.crt"
fi

# cert NAME CN SANS USAGE: DIR/NAME.key and DIR/NAME.crt signed by the CA.
cert() {
    key "$DIR/$1.key"
    openssl req -new -key "$DIR/$1.key" -subj "/O=linkedblob/CN=$2" -out "$DIR/$1.csr"
    cat >"$DIR/$1.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$4
subjectAltName=$3
EOF
    openssl x509 -req -in "$DIR/$1.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" -sha256 \
        -set_serial "0x$(openssl rand -hex 16)" -days "$DAYS" -extfile "$DIR/$1.ext" \
        -out "$DIR/$1.crt" 2>/dev/null
    rm -f "$DIR/$1.csr" "$DIR/$1.ext"
}

# Servers (serverAuth; clientAuth for the probe). blobsvc's certificate covers its direct port's
# Service too, where clients holding grants connect.
cert gateway linkedblob-gateway \
    "$(svc_names linkedblob-gateway)$(extra_names "${GATEWAY_NAMES:-}")" serverAuth,clientAuth
# The headless Services are the names the gateway and the collector dial (dns:///NAME:PORT).
cert blobsvc linkedblob-blobsvc \
    "$(svc_names linkedblob-blobsvc),$(svc_names linkedblob-blobsvc-headless),$(svc_names linkedblob-blobsvc-direct)$(extra_names "${BLOB_NAMES:-}")" \
    serverAuth,clientAuth
cert linksvc linkedblob-linksvc \
    "$(svc_names linkedblob-linksvc),$(svc_names linkedblob-linksvc-headless)$(extra_names "${LINK_NAMES:-}")" \
    serverAuth,clientAuth
# Clients of blobsvc and linksvc: the names their allow lists hold.
cert gateway-client "gateway.$NS.svc" "DNS:gateway.$NS.svc" clientAuth
cert collector-client "collector.$NS.svc" "DNS:collector.$NS.svc" clientAuth

[ -f "$DIR/grant-secret" ] || openssl rand -hex 32 >"$DIR/grant-secret"

secret() { # secret SECRET NAME
    echo "kubectl -n $NS create secret generic $1 --type=kubernetes.io/tls" \
        "--from-file=tls.crt=$DIR/$2.crt --from-file=tls.key=$DIR/$2.key" \
        "--from-file=ca.crt=$DIR/ca.crt"
}

echo "# made in $DIR; load them into namespace $NS with:"
echo "kubectl create namespace $NS"
secret linkedblob-gateway-tls gateway
secret linkedblob-gateway-client gateway-client
secret linkedblob-blobsvc-tls blobsvc
secret linkedblob-linksvc-tls linksvc
secret linkedblob-collector-client collector-client
echo "kubectl -n $NS create secret generic linkedblob-grant --from-file=secret=$DIR/grant-secret"
echo "# clients verify the gateway (and blobsvc's direct port) with $DIR/ca.crt:"
echo "#   linkedblob ls --tls --ca $DIR/ca.crt --token \$TOKEN"
echo "# keep $DIR/ca.key offline: it signs certificates the services trust."
